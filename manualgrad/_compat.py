"""Every private PyTorch API manualgrad uses, in one place.

Each is a leading-underscore name that PyTorch may rename or remove without
notice; ``tests/test_compat.py`` calls every function here, so a torch release
that changes one fails that test loudly instead of breaking a backward
somewhere else.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode  # every aten op, as it runs (manualgrad.testing)

__all__ = [
    "TorchDispatchMode",
    "assert_async",
    "batched",
    "forward_ad_enabled",
    "functorch_active",
    "graph_task_id",
    "has_call_hooks",
    "queue_callback",
    "traced",
]


def forward_ad_enabled() -> bool:
    """Whether a jvp can be called: inside a ``forward_ad.dual_level`` or a ``torch.func`` transform."""
    return _forward_ad._current_level >= 0 or functorch_active()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def traced(t: Tensor) -> bool:
    """True while ``torch.compile`` or a ``torch.func`` transform sees ``t``: its values cannot be read."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by a vmap: ``torch.func``'s, or the legacy one of gradcheck's batched check."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def assert_async(condition: Tensor, message: str) -> None:
    """A device-side assert: raises (asynchronously, on CUDA) when ``condition`` is false, without a host sync."""
    torch._assert_async(condition, message)


def queue_callback(callback) -> None:
    """Run ``callback()`` once the backward pass now running has finished (as DDP and FSDP do)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def graph_task_id() -> int:
    """An id of the backward pass now running in this thread (autograd's graph task), -1 outside one."""
    return torch._C._current_graph_task_id()


def has_call_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs hooks: its own forward, forward-pre or backward hooks (``register_*_hook``;
    ``torch.nn.utils.prune`` and the old ``weight_norm`` are forward-pre hooks), or a global module hook."""
    from torch.nn.modules import module as _module

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )
