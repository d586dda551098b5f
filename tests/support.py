"""The test tables, derived from the registry and manualgrad.testing: every operation and its examples, devices,
dtypes, tolerances.

A new operation declared in the library (and its samples in
``manualgrad/testing/samples.py``) appears in every table here, so the whole
suite (gradcheck, parity, OpInfo, derivative kernels, vmap, compile) picks it
up. The examples, seeding, kink handling and the aten recorder are
:mod:`manualgrad.testing`'s: one implementation for our tests and users'.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from manualgrad import testing
from manualgrad.registry import Op, ops
from manualgrad.testing import (  # noqa: F401 (re-exported for the test files)
    RecordOps,
    grads_of,
    manual_seed,
    non_contiguous_like,
    nudge_off_kinks,
    seeded,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

#: Every device the parity and gradcheck tests run on; CUDA skips with a reason when absent.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

F64 = torch.float64

#: (rtol, atol) per dtype for comparisons with torch: float64 to rounding, float32 to a few ulps.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6)}


def outputs_and_grads(fn, args, kwargs=None, grad_output=torch.randn_like, leaves=None, seed=None):
    """``fn(*args, **kwargs)`` (the first output of a tuple; reseeded with ``seed``) and the gradients, for
    ``grad_output`` (a tensor, or a function of the output: random by default, ``torch.ones_like`` for its sum),
    of the tensor arguments at the indices ``leaves`` (default: those that require grad). The arguments are
    cloned; torch's warning about a target of another shape is silenced."""
    args = [
        a.detach().clone().requires_grad_(a.requires_grad if leaves is None else i in leaves)
        if isinstance(a, torch.Tensor)
        else a
        for i, a in enumerate(args)
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a target size")
        out = (fn if seed is None else seeded(fn, seed))(*args, **(kwargs or {}))
    out = out[0] if isinstance(out, tuple) else out
    if callable(grad_output):
        grad_output = grad_output(out)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out.detach(), torch.autograd.grad(out, inputs, grad_output, allow_unused=True) if inputs else ()


def op_params(kind: str | None = None, where=lambda op: True) -> list:
    """``pytest.param(op, id=op.name)`` for every registered operation (of one kind)."""
    return [pytest.param(op, id=op.name) for op in ops(kind) if where(op)]


def example_params(kind: str | None = None, where=lambda op: True) -> list:
    """``pytest.param(op, example_index, id="name-example")`` for every example of every operation.
    The examples themselves are made inside the test, on its device and in its dtype."""
    out = []
    for op in ops(kind):
        if where(op):
            for i, example in enumerate(testing.examples(op, F64, "cpu")):
                out.append(pytest.param(op, i, id=f"{op.name}-{example.id}"))
    return out


def example(op: Op, index: int, dtype=F64, device="cpu", requires_grad=True, seed=0):
    """The op's ``index``-th example in ``dtype`` on ``device``: (args, kwargs), floating tensors made leaves
    that require grad (except non-floating ones and a loss's class-index target)."""
    manual_seed(seed)
    ex = testing.examples(op, dtype, device)[index]
    args = tuple(
        a.detach().clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in ex.args
    )
    return args, dict(ex.kwargs)


def differentiable(args) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def has_kinks(op: Op) -> bool:
    """Whether the table declares kinks for ``op`` (for some variant)."""
    return any(testing.kinks(op, e.kwargs) for e in testing.examples(op))
