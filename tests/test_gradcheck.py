"""Numerical gradient checks, float64: backward (gradcheck), jvp (check_forward_ad), batched
(vmap) backward and jvp, undefined incoming gradients, and double backward (gradgradcheck)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ACTIVATION_IDS, ACTIVATIONS, DEVICES
from torch.autograd import gradcheck, gradgradcheck

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad.functions import MLPCrossEntropyFunction, MLPFunction

F64 = torch.float64
FULL = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True, check_undefined_grad=True)
SHAPES = [(7,), (4, 5), (2, 3, 5)]


def check(fn, inputs, **extra):
    """gradcheck with every option, then gradgradcheck forward-over-reverse and reverse-over-reverse."""
    assert gradcheck(fn, inputs, **FULL, **extra)
    assert gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_batched_grad=True, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(device, shape, bias):
    x = torch.randn(*shape, dtype=F64, device=device, requires_grad=True)
    w = torch.randn(3, shape[-1], dtype=F64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=F64, device=device, requires_grad=True) if bias else None
    check(lambda *a: MF.linear(*a), (x, w, b) if bias else (x, w))


@pytest.mark.parametrize("needs", [m for m in itertools.product([False, True], repeat=3) if any(m)], ids=str)
def test_linear_subsets_of_needs_input_grad(needs):
    x, w, b = (torch.randn(*s, dtype=F64).requires_grad_(n) for s, n in zip([(4, 5), (3, 5), (3,)], needs))
    check(MF.linear, (x, w, b))
    grads = torch.autograd.grad(MF.linear(x, w, b).sum(), [t for t in (x, w, b) if t.requires_grad])
    assert len(grads) == sum(needs)


def test_linear_empty_batch():
    x = torch.randn(0, 5, dtype=F64, requires_grad=True)
    w = torch.randn(3, 5, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    check(MF.linear, (x, w, b))
    gx, gw, gb = torch.autograd.grad(MF.linear(x, w, b).sum(), (x, w, b))
    assert gx.shape == (0, 5) and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("name,ours,_torch,kwargs,kink", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_activation(device, shape, name, ours, _torch, kwargs, kink):
    z = torch.randn(*shape, dtype=F64, device=device)
    if kink is not None:  # keep finite differences off the kink itself
        z = torch.where((z - kink).abs() < 1e-2, z + 0.05, z)
    check(lambda t: ours(t, **kwargs), (z.requires_grad_(),))


@pytest.mark.parametrize(
    "name,ours,_torch,kwargs,kink",
    [a for a in ACTIVATIONS if a[4] is not None],
    ids=[a[0] for a in ACTIVATIONS if a[4] is not None],
)
def test_activation_near_kink(name, ours, _torch, kwargs, kink):
    """Both sides of the kink, a finite-difference step away: each one-sided derivative is right."""
    offsets = torch.tensor([-1e-3, -1e-4, 1e-4, 1e-3], dtype=F64)
    check(lambda t: ours(t, **kwargs), ((kink + offsets).requires_grad_(),), eps=1e-6)


@pytest.mark.parametrize("weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 5, 2)], ids=lambda s: f"{len(s)}d")
def test_cross_entropy_class_indices(weight, reduction, label_smoothing, shape):
    classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, classes, target_shape)
    if target.dim():
        target.view(-1)[0] = -100  # an ignored row
    w = torch.rand(classes, dtype=F64) + 0.5 if weight else None
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    check(lambda t: MF.cross_entropy(t, target, w, reduction=reduction, label_smoothing=label_smoothing), (x,))


@pytest.mark.parametrize("weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_probabilities(weight, reduction):
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    target = torch.softmax(torch.randn(4, 5, dtype=F64), 1).requires_grad_()
    w = torch.rand(5, dtype=F64) + 0.5 if weight else None
    check(lambda t, p: MF.cross_entropy(t, p, w, reduction=reduction, label_smoothing=0.1), (x, target))


def test_cross_entropy_large_logits():
    """Stable where exp overflows: logits of 1e3 and more, in float64 and float32."""
    for dtype in (F64, torch.float32):
        x = (torch.randn(4, 5, dtype=dtype) * 1e4).requires_grad_()
        target = torch.randint(0, 5, (4,))
        loss = MF.cross_entropy(x, target)
        (grad,) = torch.autograd.grad(loss, x)
        expected = torch.nn.functional.cross_entropy(x, target)
        (expected_grad,) = torch.autograd.grad(expected, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
    check(
        lambda t: MF.cross_entropy(t, torch.tensor([1, 0])),
        (torch.tensor([[1e3, -1e3, 0.5], [2e3, 1e3, 0.0]], dtype=F64, requires_grad=True),),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_mse_loss(reduction, weighted):
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.randn(4, 3, dtype=F64, requires_grad=True)
    w = torch.rand(4, 3, dtype=F64) if weighted else None
    check(lambda a, b: MF.mse_loss(a, b, reduction=reduction, weight=w), (x, t))


def test_mse_loss_broadcast():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.randn(1, 3, dtype=F64, requires_grad=True)
    with pytest.warns(UserWarning, match="different to the input size"):
        check(lambda a, b: MF.mse_loss(a, b), (x, t))


def test_dropout():
    """A fixed mask per call (reseeded), so finite differences see one smooth function."""
    x = torch.randn(6, 5, dtype=F64, requires_grad=True)

    def fn(t):
        torch.manual_seed(7)
        return MF.dropout(t, 0.4)

    assert gradcheck(fn, (x,), check_forward_ad=True, check_undefined_grad=True)
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp(activation, bias):
    model = mnn.MLP([5, 4, 3, 2], activation=activation, bias=bias).double()
    params = list(model.parameters())
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    target = torch.tensor([0, 1, 1])

    def logits(x, *ps):
        return MLPFunction.apply(x, model._spec(), *_with_biases(ps, bias))[0]

    def loss(x, *ps):
        return MLPCrossEntropyFunction.apply(x, target, model._spec(0.1), True, *_with_biases(ps, bias))[0]

    assert gradcheck(logits, (x, *params), check_undefined_grad=True)
    assert gradcheck(loss, (x, *params))


def _with_biases(params, bias):
    return params if bias else [t for w in params for t in (w, None)]


def test_mlp_is_first_order_only():
    model = mnn.MLP([3, 4, 2]).double()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        gx.sum().backward()


def test_user_subclasses_get_the_mechanism():
    """The README's recipe: a new activation is a forward and a derivative; a subclass can change h'."""
    from manualgrad.functions import Elementwise, ReLUFunction
    from manualgrad.functions.base import applier

    class SquarePlusFunction(Elementwise):
        @staticmethod
        def forward(z, b=4.0):
            return (z + torch.sqrt(z * z + b)) / 2

        @staticmethod
        def derivative(z, b=4.0):
            return (1 + z / torch.sqrt(z * z + b)) / 2

    squareplus = applier(SquarePlusFunction)
    check(squareplus, (torch.randn(6, dtype=F64, requires_grad=True),))
    assert SquarePlusFunction.traceable is not SquarePlusFunction and issubclass(
        SquarePlusFunction.traceable, SquarePlusFunction
    )

    class LeakyGradReLU(ReLUFunction):  # a "straight-through"-style rule: let 10% through where y = 0
        @staticmethod
        def derivative(y, *_):
            return y.sign() * 0.9 + 0.1

    z = torch.tensor([-1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(LeakyGradReLU.apply(z).sum(), z)
    assert grad.tolist() == pytest.approx([0.1, 1.0])


def test_a_derivative_returning_the_saved_tensor_is_not_overwritten():
    """The backward writes G_Z into h' only when h' is its own new tensor: exp' = exp, kept as the output."""
    from manualgrad.functions import Elementwise

    class ExpFunction(Elementwise):
        @staticmethod
        def forward(z):
            return torch.exp(z)

        @staticmethod
        def saves_output(*_):
            return True

        @staticmethod
        def derivative(y):
            return y  # the saved output itself

    z = torch.randn(5, dtype=F64, requires_grad=True)
    y = ExpFunction.apply(z)
    g = torch.randn(5, dtype=F64)
    first = torch.autograd.grad(y, z, g, retain_graph=True)[0]
    second = torch.autograd.grad(y, z, g)[0]
    torch.testing.assert_close(first, g * torch.exp(z.detach()))
    torch.testing.assert_close(second, first)
