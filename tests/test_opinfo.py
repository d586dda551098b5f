"""Conformance with PyTorch's own test database: every registered operation against its OpInfo entries
(``torch.testing._internal.common_methods_invocations.op_db``): the outputs and gradients of every
``sample_inputs`` and ``reference_inputs`` sample, in float64 and float32, equal torch's; the float64 samples
pass gradcheck; every ``error_inputs`` case raises an error of the type torch raises.

The database takes ~10 s to import, so it is imported by the first test that needs it, and the whole module is
marked slow (``python -m pytest -m "not slow"`` skips it; CI runs it).
"""

from __future__ import annotations

import functools

import pytest
import torch
from support import op_params
from torch.autograd import gradcheck

from manualgrad import testing

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:dropout2d:UserWarning")]


def _torch_inconsistency(op, sample):
    """Where torch's own CPU kernel disagrees with itself, the positions to compare separately: ELU at a NaN
    input gives NaN in torch's vectorized loop and 1 in its scalar tail; manualgrad gives NaN everywhere."""
    if op.name == "elu" and sample.input.isnan().any():
        return sample.input.isnan()
    return None


@functools.cache
def opinfos() -> dict[str, list]:
    from torch.testing._internal.common_methods_invocations import op_db

    table: dict[str, list] = {}
    for info in op_db:
        for name in (info.name, info.name.removeprefix("nn.functional.")):
            table.setdefault(name, []).append(info)
    return table


def entries(op):
    found = [info for info in opinfos().get(op.name, []) if info.name in (op.name, f"nn.functional.{op.name}")]
    assert found, f"{op.name}: no OpInfo entry in PyTorch's database"
    return found


def _ours(op):
    """Our functional, taking its arguments in the OpInfo entry's order (embedding's entry passes the weight
    first: ``lambda weight, idx, **kwargs: F.embedding(idx, weight, **kwargs)``)."""
    if op.name == "embedding":
        return lambda weight, index, **kwargs: op.functional(index, weight, **kwargs)
    return op.functional


def _call(fn, sample):
    return fn(sample.input, *sample.args, **sample.kwargs)


def _leaves(sample):
    tensors = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _compare(op, info, sample, dtype):
    """Ours and torch's on one sample: outputs, then gradients of every input that requires grad."""
    rtol, atol = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}[dtype]
    if testing.is_random(op):  # torch's entry draws from seed 42 (wrapper_set_seed); so do we
        from torch.testing._internal.common_methods_invocations import wrapper_set_seed

        ours = _first(wrapper_set_seed(_ours(op), sample.input, *sample.args, **sample.kwargs))
    else:
        ours = _first(_call(_ours(op), sample))
    theirs = _first(_call(info.op, sample))
    if theirs.grad_fn is None and theirs.requires_grad:  # torch returned its input leaf itself (flatten of 1-D)
        theirs = theirs.view_as(theirs)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=True)
    leaves = _leaves(sample)
    if not leaves or not theirs.requires_grad or not theirs.is_floating_point():
        return
    g = torch.randn_like(theirs)
    our_grads = torch.autograd.grad(ours, leaves, g, allow_unused=True)
    their_grads = torch.autograd.grad(theirs, leaves, g, allow_unused=True)
    apart = _torch_inconsistency(op, sample)
    for a, b in zip(our_grads, their_grads):
        if b is None:
            assert a is None or not a.any()
            continue
        if apart is not None and a.shape == apart.shape:
            assert a[apart].isnan().all()
            a, b = a[~apart], b[~apart]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def _samples(info, dtype, reference: bool):
    samples = list(info.sample_inputs("cpu", dtype, requires_grad=True))
    if reference and info.reference_inputs_func is not None:
        samples += list(info.reference_inputs("cpu", dtype, requires_grad=True))
    return samples


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", op_params())
def test_samples_match_torch(op, dtype):
    """Every sample_inputs and reference_inputs sample: the same outputs and gradients as torch."""
    count = 0
    for info in entries(op):
        if dtype not in info.dtypes:
            continue
        for sample in _samples(info, dtype, reference=True):
            _compare(op, info, sample, dtype)
            count += 1
    assert count, f"{op.name}: PyTorch's database has no {dtype} sample"


@pytest.mark.parametrize("op", op_params(where=lambda op: not testing.is_random(op)))
def test_float64_samples_pass_gradcheck(op):
    """Every float64 sample_inputs sample passes gradcheck (with forward-mode AD) through our backward."""
    for info in entries(op):
        for sample in _samples(info, torch.float64, reference=False):
            leaves = _leaves(sample)
            if not leaves:
                continue

            def fn(*values, sample=sample, leaves=leaves):
                replace = dict(zip(map(id, leaves), values))
                pick = lambda t: replace.get(id(t), t)  # noqa: E731
                args = [pick(a) for a in sample.args]
                kwargs = {k: pick(v) for k, v in sample.kwargs.items()}
                return _first(_ours(op)(pick(sample.input), *args, **kwargs))

            assert gradcheck(fn, leaves, check_forward_ad=True, check_batched_grad=True)


@pytest.mark.parametrize("op", op_params())
def test_error_inputs_raise_what_torch_raises(op):
    """Every error_inputs case: an error of the type torch raises (ours is an InputError, a ValueError and a
    RuntimeError, naming the layer; the messages differ)."""
    for info in entries(op):
        if info.error_inputs_func is None:
            continue
        for error in info.error_inputs("cpu"):
            with pytest.raises(error.error_type):
                _call(_ours(op), error.sample_input)
