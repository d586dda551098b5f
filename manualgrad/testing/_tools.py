"""Small tools the checks and the test suite share: seeding, kinks, gradients, the aten-op recorder."""

from __future__ import annotations

import torch

from .._compat import TorchDispatchMode

__all__ = ["RecordOps", "grads_of", "manual_seed", "non_contiguous_like", "nudge_off_kinks", "saved_bytes", "seeded"]


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


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn(*args)`` (inputs included)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())
