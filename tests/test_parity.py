"""Parity with torch.nn / torch.nn.functional for every registered operation: outputs and gradients in
float64/float32 (to rounding), float16/bfloat16 (at least as close to the float64 truth as torch's own
kernels), non-contiguous incoming gradients, NaN inputs, kinks, module interfaces and signatures."""

from __future__ import annotations

import ast
import inspect
import pickle
import warnings

import pytest
import torch
from support import (
    DEVICES,
    DTYPES,
    TOL,
    example,
    example_params,
    grads_of,
    non_contiguous_like,
    op_params,
    outputs_and_grads,
    seeded,
)

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import testing
from manualgrad.registry import ops


def _outputs_and_grads(fn, args, kwargs, grad_output=None, seed=0):
    """``fn(*args, **kwargs)`` (reseeded) and the gradients of its floating inputs for ``grad_output``."""
    return outputs_and_grads(fn, args, kwargs, torch.randn_like if grad_output is None else grad_output, seed=seed)


def assert_parity(op, args, kwargs, grad_output, dtype):
    rtol, atol = TOL.get(dtype, (0, 0))
    out, grads = _outputs_and_grads(op.functional, args, kwargs, grad_output)
    ref, ref_grads = _outputs_and_grads(op.reference, args, kwargs, grad_output)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, equal_nan=True)


def assert_as_accurate(op, args, kwargs, grad_output, dtype):
    """In float32 and half precision, ours is at least as close to the float64 truth as torch's own kernel is:
    within 10% of torch's error, or within two units of the dtype's precision at the result's magnitude
    (what a formula of a few rounded operations may be off by, however it is grouped): the criterion of
    ``manualgrad.testing.check``'s parity, :func:`manualgrad.testing.compare`.

    Two correct implementations round differently (where a derivative cancels,
    GELU-tanh far left: 0.5(1 + t) with t near -1, they differ by more than any
    fixed tolerance); the honest test is the distance from the exact value,
    which float64 gives.
    """
    exact = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    exact_kwargs = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()
    }
    truth, truth_grads = _outputs_and_grads(op.reference, exact, exact_kwargs, grad_output.double())
    ours = _outputs_and_grads(op.functional, args, kwargs, grad_output)
    theirs = _outputs_and_grads(op.reference, args, kwargs, grad_output)
    for mine, reference, true in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]), (truth, *truth_grads)):
        assert mine.dtype == reference.dtype
        if true.numel() == 0:
            continue
        # 2 units: stricter than check()'s float32 default (8, for any op and seed); these examples are within 2
        _, failure = testing.compare(mine, reference, true, dtype, units=2)
        assert failure is None, failure


def _with_kinks(op, args, kwargs):
    """An activation's example with a few values exactly at its kinks (where PyTorch has a convention)."""
    kinks = testing.kinks(op, kwargs) if op.kind == "activation" else ()
    if not kinks or args[0].dim() < 2 or not args[0].shape[0]:
        return args
    z = args[0].detach().clone()
    z[0, : len(kinks)] = torch.tensor(kinks, dtype=z.dtype)
    return (z.requires_grad_(),) + args[1:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,index", example_params())
def test_parity_with_torch(device, dtype, op, index):
    args, kwargs = example(op, index, dtype, device)
    args = _with_kinks(op, args, kwargs)
    out, _ = _outputs_and_grads(op.reference, args, kwargs, grad_output=None)
    gradients = [torch.randn_like(out)]
    if out.dim() >= 2 and out.numel():
        gradients.append(non_contiguous_like(out))
    for g in gradients:
        if dtype != torch.float64 and not testing.is_random(op):
            assert_as_accurate(op, args, kwargs, g, dtype)
        else:
            assert_parity(op, args, kwargs, g, dtype)


@pytest.mark.parametrize("op", op_params("activation"))
def test_activation_gradient_at_nan_and_inf_is_torchs(op):
    """Where the input is NaN or ±inf the gradient is what PyTorch's kernel gives (e.g. ReLU passes G_Y on at NaN).

    The values sit in the part of a long tensor that torch's CPU kernels run vectorized: for ELU at NaN its
    vectorized loop gives NaN and its scalar tail 1; we follow the vectorized result.
    """
    for variant in testing.examples(op, torch.float64, "cpu"):
        z = torch.linspace(-3, 3, 32, dtype=torch.float64)
        z[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        g = torch.linspace(1, 2, 32, dtype=torch.float64)
        assert_parity(op, (z.requires_grad_(),), variant.kwargs, g, torch.float64)


@pytest.mark.parametrize(
    "op", op_params("activation", where=lambda op: "inplace" in inspect.signature(op.functional).parameters)
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_inplace_activation(op, compiled):
    """inplace=True overwrites the input (a non-leaf) and still differentiates correctly, eager and compiled."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (op.functional, op.reference):

        def step(x, fn=fn):
            z = x * 1.5  # non-leaf
            return fn(z, inplace=True), z

        if compiled and fn is op.functional:
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


# ---- losses: what torch does at the edges ---------------------------------------------------------


def test_cross_entropy_where_every_target_is_ignored():
    """A padding-only batch: the mean loss is NaN (0/0) as in torch, and the gradients are zeros, not NaN."""
    for label_smoothing in (0.0, 0.1):
        for fn in (MF.cross_entropy, MF.nll_loss):
            if fn is MF.nll_loss and label_smoothing:
                continue
            kwargs = {"label_smoothing": label_smoothing} if label_smoothing else {}
            x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
            target = torch.full((3,), -100)
            loss = fn(x, target, **kwargs)
            ref = getattr(torch.nn.functional, fn.__name__)(x, target, **kwargs)
            torch.testing.assert_close(loss, ref, equal_nan=True)
            (grad,) = torch.autograd.grad(loss, x)
            assert torch.equal(grad, torch.zeros_like(grad))


def test_cross_entropy_with_zero_weights_is_nan_like_torch():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target, weight = torch.tensor([1, 1, 2]), torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    for name in ("cross_entropy", "nll_loss"):
        out, grads = grads_of(
            lambda t, n=name: getattr(MF, n)(t, target, weight), [x], torch.tensor(1.0, dtype=torch.float64)
        )
        ref, ref_grads = grads_of(
            lambda t, n=name: getattr(torch.nn.functional, n)(t, target, weight),
            [x],
            torch.tensor(1.0, dtype=torch.float64),
        )
        torch.testing.assert_close(out, ref, equal_nan=True)
        torch.testing.assert_close(grads[0], ref_grads[0], equal_nan=True)


def test_cross_entropy_promotes_like_torch():
    """A float64 probability target with a float32 input: torch computes and returns float64."""
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    ours, theirs = MF.cross_entropy(x, target), torch.nn.functional.cross_entropy(x, target)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)
    (grad,) = torch.autograd.grad(ours, x)
    assert grad.dtype == torch.float32


# ---- dropout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dropout", "dropout2d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout_draws_torchs_mask_on_cpu(name, dtype):
    """Same seed, same mask, same output and gradient as torch.nn.functional on the CPU."""
    x = torch.randn(50, 40, 2, 2, dtype=dtype, requires_grad=True)
    g = torch.randn(50, 40, 2, 2, dtype=dtype)
    outs = []
    for fn in (getattr(MF, name), getattr(torch.nn.functional, name)):
        torch.manual_seed(3)
        outs.append(grads_of(lambda t, fn=fn: fn(t, 0.3), [x], g))
    (ours, (our_grad,)), (theirs, (their_grad,)) = outs
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    kept = ours != 0
    assert 0.6 < kept.double().mean() < 0.8  # p = 0.3 drops about 30%
    torch.testing.assert_close(ours[kept], x.detach()[kept] / 0.7)


def test_dropout_eval_zero_p_and_p_one():
    x = torch.randn(4, 4)
    assert MF.dropout(x, 0.5, training=False) is x
    assert MF.dropout(x, 1.0, training=False) is x  # p = 1 is fine outside training
    assert MF.dropout(x, 0.0) is x
    assert mnn.Dropout(0.5).eval()(x) is x
    z = torch.randn(4, 4, requires_grad=True)
    out = MF.dropout(z, 1.0)  # everything dropped: the zero function, gradient zero (as in torch)
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_dropout_inplace():
    x = torch.randn(6, 6, requires_grad=True)
    z = x * 1
    torch.manual_seed(1)
    out = MF.dropout(z, 0.5, inplace=True)
    assert out.data_ptr() == z.data_ptr()
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).float() / 0.5)


VIEWS = {
    "flatten": lambda t: torch.flatten(t, 1),
    "view": lambda t: t.view(t.shape[0], -1),
    "slice": lambda t: t[:, 1:3],
    "transpose": lambda t: t.transpose(2, 3),
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("module", ["Dropout", "Dropout2d"])
def test_inplace_dropout_on_a_view_works_as_torchs(module, view):
    """Dropout(inplace=True) on a view of a tensor autograd records: the view and its base overwritten, the
    same mask, output and gradient as torch.nn's (no autograd error about views of multi-output Functions)."""
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for layer in (getattr(mnn, module)(0.4, inplace=True), getattr(torch.nn, module)(0.4, inplace=True)):
        base = x * 1.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dropout2d on the 2-D views: torch's and our deprecation warning
            torch.manual_seed(5)
            out = layer(VIEWS[view](base))
        (grad,) = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(), x)
        results.append((out.detach(), base.detach(), grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "layout",
    {
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "transposed": lambda t: t.transpose(1, 3),
        "strided": lambda t: t[:, :, ::2],
    }.items(),
    ids=lambda item: item[0],
)
@pytest.mark.parametrize("name", ["dropout", "dropout2d"])
def test_dropout_draws_torchs_mask_whatever_the_inputs_layout(name, layout):
    x = layout[1](torch.randn(6, 5, 4, 4))
    outs = []
    for fn in (getattr(MF, name), getattr(torch.nn.functional, name)):
        torch.manual_seed(2)
        outs.append(fn(x, 0.5))
    torch.testing.assert_close(*outs, rtol=0, atol=0)


# ---- modules and signatures -----------------------------------------------------------------------

#: Values for a module constructor's required parameters, by parameter name.
CONSTRUCTOR_VALUES = {
    "in_features": 5,
    "out_features": 3,
    "in_channels": 2,
    "out_channels": 4,
    "kernel_size": 3,
    "output_size": 2,
    "dim": 1,
    "unflattened_size": (2, 3),
    "num_embeddings": 5,
    "embedding_dim": 3,
    "normalized_shape": 5,
    "num_groups": 2,
    "num_channels": 4,
}


def _construct(cls, **kwargs):
    required = [p.name for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    values = {name: CONSTRUCTOR_VALUES[name] for name in required if name not in ("args", "kwargs")}
    return cls(**{**values, **kwargs})


@pytest.mark.parametrize("op", op_params(where=lambda op: op.module is not None))
def test_module_interface(op):
    """Same constructor signature, repr, parameters, state_dict keys; an isinstance of torch's class; pickles."""
    ours, theirs = mnn.twin(op), op.module
    assert ours is getattr(mnn, theirs.__name__) and ours.__module__ == "manualgrad.nn"
    assert parameters(inspect.signature(ours)) == parameters(inspect.signature(theirs))
    torch.manual_seed(0)
    a = _construct(ours)
    torch.manual_seed(0)
    b = _construct(theirs)
    assert isinstance(a, theirs)
    assert repr(a) == repr(b)
    assert list(a.state_dict()) == list(b.state_dict())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and pa.shape == pb.shape
        torch.testing.assert_close(pa, pb)  # same initialisation from the same seed
    assert type(pickle.loads(pickle.dumps(a))) is ours


@pytest.mark.parametrize("op,index", example_params(where=lambda op: op.module is not None))
def test_module_forward_matches_torch(op, index):
    """The twin passes its own settings on: built with an example's keyword arguments, it computes what
    torch's module built with them does."""
    args, kwargs = example(op, index, torch.float64)
    if not set(kwargs) <= set(inspect.signature(op.module).parameters):
        return  # the example's keywords are not all constructor arguments (e.g. mse_loss's weight)
    modules = []
    for cls in (mnn.twin(op), op.module):
        torch.manual_seed(0)
        modules.append(_construct(cls, **kwargs).double())
    inputs = args[:2] if op.kind == "loss" else args[:1]
    ours, theirs = (seeded(m)(*inputs) for m in modules)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_linear_checkpoint_round_trip():
    ours = mnn.Linear(6, 4, bias=False, dtype=torch.float64)
    theirs = torch.nn.Linear(6, 4, bias=False, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.load_state_dict(torch.nn.Linear(6, 4, bias=False, dtype=torch.float64).state_dict())
    assert repr(ours) == "Linear(in_features=6, out_features=4, bias=False)"


def _torch_signature(fn) -> list[tuple]:
    """torch's signature: from inspect, or for a C builtin (and a boolean_dispatch wrapper like max_pool2d's, which
    inspect sees as ``(*args, **kwargs)``) the first line of its docstring (``gelu(input, approximate='none')``)."""
    try:
        found = parameters(inspect.signature(fn))
    except ValueError:
        found = None
    if found is not None and [kind for *_, kind in found] != [
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ]:
        return found
    first = fn.__doc__.strip().splitlines()[0].split("->")[0].replace(" = ", "=")
    args = ast.parse(f"def {first}: pass").body[0].args
    required = len(args.args) - len(args.defaults)
    defaults = [inspect.Parameter.empty] * required + [ast.literal_eval(d) for d in args.defaults]
    return [(a.arg, d, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a, d in zip(args.args, defaults)]


@pytest.mark.parametrize("op", op_params())
def test_functional_signature(op):
    """Same parameter names, order, defaults and kinds as torch's function of the same name (keyword-only
    ``out=`` of ``torch.*`` functions aside)."""
    theirs = [p for p in _torch_signature(op.reference) if p[0] != "out"]
    assert parameters(inspect.signature(op.functional)) == theirs
    assert getattr(MF, op.name) is op.functional


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


def test_every_registered_module_has_a_twin_and_every_function_a_wrapper():
    for op in ops():
        assert getattr(MF, op.name) is op.functional
        if op.module is not None:
            assert issubclass(getattr(mnn, op.module.__name__), op.module)
