"""The test tables, derived from the registry: every operation and its examples, devices, dtypes, tolerances.

A new operation declared in the library appears in every table here, so the
whole suite (gradcheck, parity, OpInfo, derivative kernels, vmap, compile)
picks it up.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from manualgrad.registry import Op, ops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

#: Every device the parity and gradcheck tests run on; CUDA skips with a reason when absent.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

F64 = torch.float64

#: (rtol, atol) per dtype for comparisons with torch: float64 to rounding, float32 to a few ulps.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6)}


def op_params(kind: str | None = None, where=lambda op: True) -> list:
    """``pytest.param(op, id=op.name)`` for every registered operation (of one kind)."""
    return [pytest.param(op, id=op.name) for op in ops(kind) if where(op)]


def example_params(kind: str | None = None, where=lambda op: True) -> list:
    """``pytest.param(op, example_index, id="name-example")`` for every example of every operation.
    The examples themselves are made inside the test, on its device and in its dtype."""
    out = []
    for op in ops(kind):
        if where(op):
            for i, example in enumerate(op.examples(F64, "cpu")):
                out.append(pytest.param(op, i, id=f"{op.name}-{example.id}"))
    return out


def example(op: Op, index: int, dtype=F64, device="cpu", requires_grad=True, seed=0):
    """The op's ``index``-th example in ``dtype`` on ``device``: (args, kwargs), floating tensors made leaves
    that require grad (except non-floating ones and a loss's class-index target)."""
    manual_seed(seed)
    ex = op.examples(dtype, device)[index]
    args = tuple(
        a.detach().clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in ex.args
    )
    return args, dict(ex.kwargs)


def differentiable(args) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def manual_seed(seed: int) -> None:
    """``torch.manual_seed``, without its cost (~0.3 ms: it records where CUDA's lazy seeding was asked for)
    when there is no CUDA device to seed."""
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def seeded(fn, seed: int = 7):
    """``fn`` with the RNG reseeded on every call: a random operation (dropout) becomes one fixed function."""

    def call(*args, **kwargs):
        manual_seed(seed)
        return fn(*args, **kwargs)

    return call


def nudge_off_kinks(z: torch.Tensor, kinks, distance: float = 1e-2) -> torch.Tensor:
    """Move values within ``distance`` of a kink away from it, so finite differences see a smooth function."""
    for kink in kinks:
        z = torch.where((z - kink).abs() < distance, z + 5 * distance, z)
    return z


def grads_of(fn, inputs, grad_output):
    """The output of ``fn(*inputs)`` and the gradients of the inputs that require grad."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_output, allow_unused=True) if leaves else ()
    return out, grads


def non_contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A random tensor of ``t``'s shape laid out transposed in memory, as autograd may hand a gradient over."""
    g = torch.randn(*reversed(t.shape), dtype=t.dtype, device=t.device)
    return g.permute(*reversed(range(t.dim())))


class RecordOps(TorchDispatchMode):
    """Every aten op that runs inside it; ``derivative_kernels``: those that are PyTorch's own derivative
    kernels (named ``*backward*``: ``threshold_backward``, ``convolution_backward``, ``_softmax_backward_data``...)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def derivative_kernels(self) -> list[str]:
        return sorted({op for op in self.ops if "backward" in op})
