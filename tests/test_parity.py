"""Parity with torch.nn / torch.nn.functional: outputs and gradients, float32/float64/bfloat16,
non-contiguous incoming gradients, empty batches, module interfaces and signatures."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch
from conftest import ACTIVATION_IDS, ACTIVATIONS, DEVICES

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn

# (rtol, atol) per dtype: float64 to rounding, float32 to a few ulps, half types to their short mantissas
# (torch.testing's own defaults for float16 and bfloat16 are (1e-3, 1e-5) and (1.6e-2, 1e-5)).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def grads_of(fn, inputs, grad_output):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_output)
    return out, grads


def assert_parity(ours, theirs, inputs, grad_output, dtype):
    rtol, atol = TOL[dtype]
    out, grads = grads_of(ours, inputs, grad_output)
    ref, ref_grads = grads_of(theirs, inputs, grad_output)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def assert_as_accurate(ours, theirs, inputs, grad_output, dtype):
    """In low precision, ours is as close to the float64 truth as torch's own kernel (within 2x or 4 ulps).

    Where a derivative cancels (GELU-tanh far left: 0.5(1 + t) with t near -1)
    two correct float32 implementations differ by more than a fixed tolerance;
    the honest test is distance from the exact value.
    """
    truth, truth_grads = grads_of(theirs, [t.double() for t in inputs], grad_output.double())
    for fn in (ours, theirs):
        out, grads = grads_of(fn, inputs, grad_output)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    for a, b in [(grads_of(ours, inputs, grad_output), grads_of(theirs, inputs, grad_output))]:
        for mine, reference, exact in zip((a[0], *a[1]), (b[0], *b[1]), (truth, *truth_grads)):
            scale = exact.abs().max().clamp(min=1).item()
            our_error = (mine.double() - exact).abs().max().item()
            their_error = (reference.double() - exact).abs().max().item()
            assert our_error <= max(2 * their_error, 4 * eps * scale), (our_error, their_error)


def non_contiguous(shape, dtype, device):
    """A gradient laid out transposed in memory, as autograd may hand one over."""
    g = torch.randn(*reversed(shape), dtype=dtype, device=device).permute(*reversed(range(len(shape))))
    assert not g.is_contiguous() or len(shape) < 2 or 0 in shape or 1 in shape
    return g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5,), (8, 5), (2, 3, 5), (0, 5)], ids=["1d", "2d", "3d", "empty"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(device, dtype, shape, bias):
    x = torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(4, 5, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(4, dtype=dtype, device=device, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    out_shape = (*shape[:-1], 4)
    for g in (torch.randn(out_shape, dtype=dtype, device=device), non_contiguous(out_shape, dtype, device)):
        assert_parity(MF.linear, torch.nn.functional.linear, inputs, g, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,ours,theirs,kwargs,kink", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_activation(device, dtype, name, ours, theirs, kwargs, kink):
    z = torch.randn(6, 7, dtype=dtype, device=device) * 3
    if kink is not None:
        z[0, :3] = kink  # exactly at the kink: the derivative follows PyTorch's convention
    z.requires_grad_()
    check = assert_parity if dtype == torch.float64 else assert_as_accurate
    for g in (torch.randn(6, 7, dtype=dtype, device=device), non_contiguous((6, 7), dtype, device)):
        check(lambda t: ours(t, **kwargs), lambda t: theirs(t, **kwargs), [z], g, dtype)
    empty = torch.randn(0, 7, dtype=dtype, device=device, requires_grad=True)
    assert_parity(
        lambda t: ours(t, **kwargs),
        lambda t: theirs(t, **kwargs),
        [empty],
        torch.randn(0, 7, dtype=dtype, device=device),
        dtype,
    )


@pytest.mark.parametrize(
    "name,ours,theirs,kwargs",
    [
        ("relu", MF.relu, torch.nn.functional.relu, {}),
        ("leaky_relu", MF.leaky_relu, torch.nn.functional.leaky_relu, {"negative_slope": 0.1}),
        ("elu", MF.elu, torch.nn.functional.elu, {"alpha": 0.7}),
        ("silu", MF.silu, torch.nn.functional.silu, {}),
    ],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_inplace_activation(name, ours, theirs, kwargs, compiled):
    """inplace=True overwrites the input (a non-leaf) and still differentiates correctly, eager and compiled."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (ours, theirs):

        def step(x):
            z = x * 1.5  # non-leaf
            out = fn(z, inplace=True, **kwargs)
            return out, z

        if compiled and fn is ours:
            torch._dynamo.reset()
            step = torch.compile(step, backend="aot_eager", fullgraph=True)
        out, z = step(x)
        torch.testing.assert_close(z, out)  # the input now holds the result
        results.append((out.detach().clone(), *torch.autograd.grad(out.sum(), x)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_inplace_silu_function_refuses_to_lose_its_input():
    """The Function itself cannot overwrite what its derivative needs; the functional wrapper keeps a copy."""
    from manualgrad.functions import SiLUFunction

    z = torch.randn(3, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match="inplace"):
        SiLUFunction.apply(z, True)
    with torch.no_grad():  # without autograd there is nothing to keep
        y = torch.randn(3)
        expected = torch.nn.functional.silu(y)
        assert MF.silu(y, inplace=True) is y
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"weight": True}, {"ignore": True}],
    ids=["plain", "smoothing", "weight", "ignore_index"],
)
def test_cross_entropy(device, dtype, reduction, options):
    x = (torch.randn(6, 5, device=device) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 5, (6,), device=device)
    kwargs = {"reduction": reduction, "label_smoothing": options.get("label_smoothing", 0.0)}
    if options.get("weight"):
        kwargs["weight"] = (torch.rand(5, device=device) + 0.5).to(dtype)
    if options.get("ignore"):
        target[1] = 3
        kwargs["ignore_index"] = 3
    g = torch.rand((6,) if reduction == "none" else (), dtype=dtype, device=device)
    assert_parity(
        lambda t: MF.cross_entropy(t, target, **kwargs),
        lambda t: torch.nn.functional.cross_entropy(t, target, **kwargs),
        [x],
        g,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_probabilities_and_spatial(dtype):
    x = torch.randn(3, 4, 2, 2).to(dtype).requires_grad_()
    target = torch.randint(0, 4, (3, 2, 2))
    probs = torch.softmax(torch.randn(3, 4, 2, 2), 1).to(dtype)
    g = torch.tensor(1.0, dtype=dtype)
    assert_parity(
        lambda t: MF.cross_entropy(t, target), lambda t: torch.nn.functional.cross_entropy(t, target), [x], g, dtype
    )
    assert_parity(
        lambda t: MF.cross_entropy(t, probs, label_smoothing=0.05),
        lambda t: torch.nn.functional.cross_entropy(t, probs, label_smoothing=0.05),
        [x],
        g,
        dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(device, dtype, reduction):
    x = torch.randn(4, 3, device=device).to(dtype).requires_grad_()
    t = torch.randn(4, 3, device=device).to(dtype).requires_grad_()
    g = torch.rand((4, 3) if reduction == "none" else (), device=device).to(dtype)
    assert_parity(
        lambda a, b: MF.mse_loss(a, b, reduction=reduction),
        lambda a, b: torch.nn.functional.mse_loss(a, b, reduction=reduction),
        [x, t],
        g,
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout_draws_torchs_mask_on_cpu(dtype):
    """Same seed, same mask, same output and gradient as torch.nn.functional.dropout on the CPU."""
    x = torch.randn(50, 40, dtype=dtype, requires_grad=True)
    g = torch.randn(50, 40, dtype=dtype)
    outs = []
    for fn in (MF.dropout, torch.nn.functional.dropout):
        torch.manual_seed(3)
        outs.append(grads_of(lambda t: fn(t, 0.3), [x], g))
    (ours, (our_grad,)), (theirs, (their_grad,)) = outs
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    kept = ours != 0
    assert 0.6 < kept.double().mean() < 0.8  # p = 0.3 drops about 30%
    torch.testing.assert_close(ours[kept], x.detach()[kept] / 0.7)


def test_dropout_eval_and_zero_p_are_identity():
    x = torch.randn(4, 4)
    assert MF.dropout(x, 0.5, training=False) is x
    assert MF.dropout(x, 0.0) is x
    layer = mnn.Dropout(0.5).eval()
    assert layer(x) is x


def test_dropout_inplace():
    x = torch.randn(6, 6, requires_grad=True)
    z = x * 1
    torch.manual_seed(1)
    out = MF.dropout(z, 0.5, inplace=True)
    assert out.data_ptr() == z.data_ptr()
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).float() / 0.5)


# --- modules ---------------------------------------------------------------------------------

MODULE_PAIRS = [
    (mnn.Linear, torch.nn.Linear, (5, 3)),
    (mnn.ReLU, torch.nn.ReLU, ()),
    (mnn.LeakyReLU, torch.nn.LeakyReLU, (0.2,)),
    (mnn.Sigmoid, torch.nn.Sigmoid, ()),
    (mnn.Tanh, torch.nn.Tanh, ()),
    (mnn.GELU, torch.nn.GELU, ("tanh",)),
    (mnn.SiLU, torch.nn.SiLU, ()),
    (mnn.ELU, torch.nn.ELU, (0.5,)),
    (mnn.Softplus, torch.nn.Softplus, (2.0, 10.0)),
    (mnn.Dropout, torch.nn.Dropout, (0.25,)),
    (mnn.CrossEntropyLoss, torch.nn.CrossEntropyLoss, ()),
    (mnn.MSELoss, torch.nn.MSELoss, ()),
]


@pytest.mark.parametrize("ours,theirs,args", MODULE_PAIRS, ids=[p[0].__name__ for p in MODULE_PAIRS])
def test_module_interface(ours, theirs, args):
    """Same constructor signature, repr, parameters, state_dict keys; an isinstance of torch's class."""
    assert parameters(inspect.signature(ours)) == parameters(inspect.signature(theirs))
    torch.manual_seed(0)
    a = ours(*args)
    torch.manual_seed(0)
    b = theirs(*args)
    assert isinstance(a, theirs)
    assert repr(a) == repr(b)
    assert list(a.state_dict()) == list(b.state_dict())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and pa.shape == pb.shape
        torch.testing.assert_close(pa, pb)  # same initialisation from the same seed
    pickle.loads(pickle.dumps(a))


def test_linear_checkpoint_round_trip():
    ours = mnn.Linear(6, 4, bias=False, dtype=torch.float64)
    theirs = torch.nn.Linear(6, 4, bias=False, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.load_state_dict(torch.nn.Linear(6, 4, bias=False, dtype=torch.float64).state_dict())
    assert repr(ours) == "Linear(in_features=6, out_features=4, bias=False)"


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "relu",
        "leaky_relu",
        "sigmoid",
        "tanh",
        "gelu",
        "silu",
        "elu",
        "softplus",
        "cross_entropy",
        "mse_loss",
        "dropout",
    ],
)
def test_functional_signature(name):
    """Same parameter names, order and defaults as torch.nn.functional (where torch exposes them)."""
    ours = inspect.signature(getattr(MF, name))
    try:
        theirs = inspect.signature(getattr(torch.nn.functional, name))
    except ValueError:  # a C builtin (linear, gelu, softplus): compare with the documented signature
        theirs = {
            "linear": "(input, weight, bias=None)",
            "gelu": "(input, approximate='none')",
            "softplus": "(input, beta=1.0, threshold=20.0)",
        }[name]
        assert (
            str(
                ours.replace(
                    return_annotation=inspect.Signature.empty,
                    parameters=[p.replace(annotation=inspect.Parameter.empty) for p in ours.parameters.values()],
                )
            )
            == theirs
        )
        return
    assert parameters(ours) == parameters(theirs)


def parameters(signature):
    """Names, defaults and kinds (annotations may be strings on one side)."""
    return [(p.name, p.default, p.kind) for p in signature.parameters.values()]


def test_sequential_model_parity_float32():
    """A whole model of our modules against the same torch.nn model: loss and every gradient."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(mnn.Linear(10, 16), mnn.GELU(), mnn.Linear(16, 8), mnn.Tanh(), mnn.Linear(8, 3))
    theirs = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.GELU(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    MF.cross_entropy(ours(x), y).backward()
    torch.nn.functional.cross_entropy(theirs(x), y).backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert manualgrad.manual_coverage(MF.cross_entropy(ours(x), y)).complete
