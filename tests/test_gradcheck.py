"""Numerical gradient checks in float64 for every registered operation and every one of its examples:
backward (gradcheck), jvp (check_forward_ad), batched (vmap) backward and jvp, undefined incoming
gradients, and double backward (gradgradcheck, reverse over reverse and forward over reverse)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from support import DEVICES, F64, differentiable, example, example_params, has_kinks, nudge_off_kinks, op_params, seeded
from torch.autograd import gradcheck, gradgradcheck

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import testing
from manualgrad.functions import MLPCrossEntropyFunction, MLPFunction

FULL = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True, check_undefined_grad=True)


def check(fn, inputs, random=False, **extra):
    """gradcheck with every option, then gradgradcheck forward-over-reverse and reverse-over-reverse.
    (A random operation's forward cannot run under vmap: its batched jvp is not checked.)"""
    assert gradcheck(fn, inputs, **{**FULL, "check_batched_forward_grad": not random}, **extra)
    assert gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_batched_grad=True, **extra)


def as_function_of_leaves(op, args, kwargs):
    """``op.functional`` as a function of the example's differentiable inputs only (reseeded per call)."""
    positions = differentiable(args)

    def fn(*leaves):
        full = list(args)
        for i, leaf in zip(positions, leaves):
            full[i] = leaf
        return op.functional(*full, **kwargs)

    return seeded(fn), [args[i] for i in positions]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,index", example_params())
def test_every_example(device, op, index):
    args, kwargs = example(op, index, F64, device)
    if op.kind == "activation":  # keep finite differences off the kinks
        args = (nudge_off_kinks(args[0].detach(), testing.kinks(op, kwargs)).requires_grad_(),)
    fn, leaves = as_function_of_leaves(op, args, kwargs)
    check(fn, leaves, random=testing.is_random(op))


@pytest.mark.parametrize("op", op_params("activation", where=has_kinks))
def test_activation_near_kink(op):
    """Both sides of each kink, a finite-difference step away: each one-sided derivative is right."""
    offsets = torch.tensor([-1e-3, -1e-4, 1e-4, 1e-3], dtype=F64)
    for variant in testing.examples(op, F64, "cpu"):
        for kink in testing.kinks(op, variant.kwargs):
            z = (kink + offsets).requires_grad_()
            check(lambda t, kw=variant.kwargs: op.functional(t, **kw), (z,), eps=1e-6)


@pytest.mark.parametrize("op", op_params("activation"))
@pytest.mark.parametrize("shape", [(7,), (2, 3, 5)], ids=["1d", "3d"])
def test_activation_shapes(op, shape):
    z = nudge_off_kinks(torch.randn(*shape, dtype=F64) * 3, testing.kinks(op, {})).requires_grad_()
    check(op.functional, (z,))


@pytest.mark.parametrize("needs", [m for m in itertools.product([False, True], repeat=3) if any(m)], ids=str)
def test_linear_subsets_of_needs_input_grad(needs):
    x, w, b = (torch.randn(*s, dtype=F64).requires_grad_(n) for s, n in zip([(4, 5), (3, 5), (3,)], needs))
    check(MF.linear, (x, w, b))
    grads = torch.autograd.grad(MF.linear(x, w, b).sum(), [t for t in (x, w, b) if t.requires_grad])
    assert len(grads) == sum(needs)


@pytest.mark.parametrize(
    "shape,features", [((4, 0), (3, 0)), ((2, 5, 0), (3, 0)), ((4, 5), (0, 5)), ((2, 0, 5), (0, 5))]
)
def test_linear_with_a_feature_dimension_of_zero(shape, features):
    """in_features = 0 or out_features = 0, with any leading shape: the docstring promises (*, q)."""
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    w = torch.randn(*features, dtype=F64, requires_grad=True)
    b = torch.randn(features[0], dtype=F64, requires_grad=True)
    out = MF.linear(x, w, b)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, w, b), g)
    theirs = torch.autograd.grad(torch.nn.functional.linear(x, w, b), (x, w, b), g)
    for a, r in zip(ours, theirs):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r)
    check(MF.linear, (x, w, b))


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
    logits = torch.tensor([[1e3, -1e3, 0.5], [2e3, 1e3, 0.0]], dtype=F64, requires_grad=True)
    check(lambda t: MF.cross_entropy(t, torch.tensor([1, 0])), (logits,))


def test_mse_loss_broadcast():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.randn(1, 3, dtype=F64, requires_grad=True)
    with pytest.warns(UserWarning, match="different to the input size"):
        check(lambda a, b: MF.mse_loss(a, b), (x, t))


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp(activation, bias):
    model = mnn.MLP([5, 4, 3, 2], activation=activation, bias=bias).double()
    params = list(model.parameters())
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    target = torch.tensor([0, 1, 1])
    spec, _ = model._structure("MLP", 0.1)

    def logits(x, *ps):
        return MLPFunction.apply(x, spec, *_with_biases(ps, bias))[0]

    def loss(x, *ps):
        return MLPCrossEntropyFunction.apply(x, target, spec, True, *_with_biases(ps, bias))[0]

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


def test_a_subclass_can_change_the_derivative():
    """A researcher's own backward rule: a subclass overrides h' and keeps the rest of the mechanism."""
    from manualgrad.functions import ReLUFunction

    class LeakyGradReLU(ReLUFunction):  # a "straight-through"-style rule: let 10% through where y = 0
        @staticmethod
        def derivative(y, *_):
            return (y > 0).to(y.dtype) * 0.9 + 0.1

    z = torch.tensor([-1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(LeakyGradReLU.apply(z).sum(), z)
    assert grad.tolist() == pytest.approx([0.1, 1.0])
    assert LeakyGradReLU.traceable is not LeakyGradReLU and issubclass(LeakyGradReLU.traceable, LeakyGradReLU)


def test_a_derivative_returning_the_saved_tensor_is_not_overwritten():
    """exp' = exp, kept as the output: two backward passes through the same graph give the same gradient."""
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


def test_the_fast_indicator_equals_the_plain_comparison():
    """indicator() writes a comparison straight into floats: the same 0/1 as the plain comparison converted,
    in every dtype, at 0, -0, NaN and ±inf, and under torch.func (where it is the plain comparison)."""
    from torch.func import vmap

    from manualgrad.functions.activations import indicator

    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        s = torch.randn(64, 33).to(dtype)
        s[0, :6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30]).to(dtype)
        for compare, value in ((torch.gt, 0), (torch.ne, 0), (torch.gt, 1.5)):
            plain = compare(s, value).to(dtype)
            assert indicator(compare, s, value).dtype == dtype
            torch.testing.assert_close(indicator(compare, s, value), plain, rtol=0, atol=0)
            torch.testing.assert_close(vmap(lambda t, c=compare, v=value: indicator(c, t, v))(s), plain, rtol=0, atol=0)


def test_times_writes_into_a_fresh_derivative_only_where_nothing_records():
    """activations.times(): G ⊙ h' written into h' (our own derivatives, a new tensor), equal to the plain
    product; out of place for a derivative it may not own, a broadcast, a wider gradient dtype, or while autograd
    records (double backward) or vmap batches."""
    from torch.func import vmap

    from manualgrad.functions.activations import times

    g, h = torch.randn(8, 5), torch.randn(8, 5)
    plain = g * h
    with torch.no_grad():  # as in a backward without create_graph
        result = times(g, h.clone(), True)
        torch.testing.assert_close(result, plain, rtol=0, atol=0)
        kept = h.clone()
        assert times(g, kept, True) is kept  # reused
        for args in ((g, h, False), (g, h[:1].clone(), True), (g.double(), h.clone(), True)):
            before = args[1].clone()
            out = times(*args)
            assert out is not args[1]
            torch.testing.assert_close(args[1], before, rtol=0, atol=0)
            torch.testing.assert_close(out, args[0] * before, rtol=0, atol=0)
        half = g.half()
        torch.testing.assert_close(times(half, h.clone(), True), half * h, rtol=0, atol=0)  # float32 h' keeps its dtype
    recorded = h.clone().requires_grad_()
    with torch.enable_grad():
        h_prime = recorded * 1
        assert times(g, h_prime, True) is not h_prime  # a double backward records the product out of place
    with torch.no_grad():
        torch.testing.assert_close(vmap(lambda a, b: times(a, b * 1, True))(g, h), plain, rtol=0, atol=0)


def test_exp_through_exp2_equals_exp():
    """activations.exp(x, scale) = e^(scale x) via exp2: torch.exp's values to within the one extra rounding of the
    exponent (relative |scale x| log2(e) eps, plus a few eps for the two kernels), in float64 and float32, over the
    range where the result is a normal number, at 0 and at ±inf; its derivative under a double backward too."""
    from manualgrad.functions.base import exp

    for dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps / 2
        x = torch.cat([torch.linspace(-80, 80, 1001), torch.tensor([0.0, float("inf"), -float("inf")])]).to(dtype)
        for scale in (1.0, -0.5):
            expected = torch.exp(scale * x)
            bound = (scale * x).abs().nan_to_num(posinf=0) * math.log2(math.e) * eps + 4 * eps
            kept = x.clone()
            error = ((exp(x, scale) - expected).abs() / expected).nan_to_num(nan=0.0)
            assert (error <= bound).all(), (dtype, scale, (error / bound).max())
            assert torch.equal(x, kept)  # not overwritten unless reuse=True
            assert torch.equal(exp(x[-3:].clone(), scale, reuse=True), expected[-3:])
    x = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: exp(t * 1, -0.5, reuse=True), (x,))
    assert torch.autograd.gradgradcheck(lambda t: exp(t * 1, -0.5, reuse=True), (x,))


def test_in_place_derivatives_equal_their_formulas():
    """Each derivative reuses its temporaries (fewer fresh tensors); the values must be the docstring's formula,
    written plainly, at ordinary and extreme inputs and in float64, float32 and under a double backward."""
    from manualgrad.functions import activations as A

    def sigmoid(z):
        return torch.sigmoid(z)

    c, k = math.sqrt(2 / math.pi), 0.044715
    plain = {
        (A.LeakyReLUFunction, (0.2,)): lambda z: torch.where(z > 0, 1.0, 0.2).to(z.dtype),
        (A.SigmoidFunction, ()): lambda y: y * (1 - y),
        (A.TanhFunction, ()): lambda y: 1 - y * y,
        (A.GELUFunction, ("none",)): lambda z: (
            0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        ),
        (A.GELUFunction, ("tanh",)): lambda z: (
            0.5 * (1 + torch.tanh(c * (z + k * z**3)))
            + 0.5 * z * (1 - torch.tanh(c * (z + k * z**3)) ** 2) * c * (1 + 3 * k * z * z)
        ),
        (A.SiLUFunction, ()): lambda z: sigmoid(z) * (1 + z * (1 - sigmoid(z))),
        (A.MishFunction, ()): lambda z: (
            torch.tanh(torch.nn.functional.softplus(z))
            + z * sigmoid(z) * (1 - torch.tanh(torch.nn.functional.softplus(z)) ** 2)
        ),
    }
    for dtype in (torch.float64, torch.float32):
        z = torch.cat([torch.randn(200, dtype=dtype) * 3, torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-8], dtype=dtype)])
        for (function, params), formula in plain.items():
            s = (
                torch.tanh(z)
                if function is A.TanhFunction
                else torch.sigmoid(z)
                if function is A.SigmoidFunction
                else z
            )
            expected = formula(s)
            torch.testing.assert_close(function.derivative(s.clone(), *params), expected)
            with torch.enable_grad():  # recorded for a double backward: the same values
                recorded = s.clone().requires_grad_()
                torch.testing.assert_close(function.derivative(recorded, *params).detach(), expected)


def test_forwards_signature_binds_like_inspects():
    """base._Signature binds a call passing every parameter positionally in one step (Function.apply binds every
    call); the result must be what inspect's binding gives, and any other call must go to inspect."""
    import inspect

    from manualgrad.functions import Conv2dFunction, LinearFunction, MLPFunction, ReLUFunction

    calls = [
        (LinearFunction, (1, 2, None)),
        (ReLUFunction, ("z", False)),
        (ReLUFunction, ("z",)),  # a default left out
        (MLPFunction, ("x", "spec", "w1", "b1", "w2", "b2")),  # *params
        (Conv2dFunction, ("x", "w", None, "geometry")),
    ]
    for function, args in calls:
        ours = inspect.signature(function.forward).bind(*args)
        ours.apply_defaults()
        plain = inspect.Signature(list(inspect.signature(function.forward).parameters.values())).bind(*args)
        plain.apply_defaults()
        assert (ours.args, ours.kwargs) == (plain.args, plain.kwargs)
    assert type(inspect.signature(ReLUFunction.forward).bind("z")).__name__ == "BoundArguments"
    with pytest.raises(TypeError):
        inspect.signature(LinearFunction.forward).bind(1, 2, 3, 4)
