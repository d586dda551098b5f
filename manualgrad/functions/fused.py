r"""One pass per activation backward, opt-in: :math:`G_Z = G_Y \odot h'(S)` compiled by ``torch.compile``.

Speed (the one trick in this file): an activation's backward written in tensor ops makes one pass over memory
per operation (GELU's :math:`h'` is an ``erf``, an ``exp`` and several multiply-adds), where PyTorch's derivative
kernel makes one. Under :func:`fused_backward` the same Python expression, ``G_Y * derivative(S)``, is compiled
by ``torch.compile`` (inductor: a C++ loop on the CPU, Triton on CUDA) into one loop, so the code a reader sees
is still the formula. It is used only where it pays and can run: tensors of at least ``min_numel`` elements,
no double backward, forward-mode AD, vmap or enclosing ``torch.compile`` (there the plain expression runs).
Cost: each activation compiles once per process and dtype (about 1 s each on a CPU, several seconds for the
first), hence opt-in. ``tests/test_fused.py`` checks that both are equal; ``python -m benchmarks`` measures it.
"""

from __future__ import annotations

import types
import warnings
from typing import ClassVar

import torch
from torch import Tensor

from .. import _compat

__all__ = ["fused_backward", "product"]

# below this the compiled call's fixed cost (~20-40 µs) outweighs the passes it saves: measured on MNIST-size
# steps (784-512-256-10, 1 thread), the compiled backward cost 1-5% of the step at batch 128 (65,536 elements)
# and bought 3-15% at batch 512 (262,144) for GELU, SiLU and ELU (ReLU's, one comparison, lost 2.5%)
MIN_NUMEL = 1 << 18


class _State:
    enabled = False
    min_numel = MIN_NUMEL
    compiled: ClassVar[dict] = {}  # Elementwise subclass -> its compiled G_Y ⊙ h'(S), or None where compiling failed


class fused_backward:
    """Switch the one-pass activation backwards on (or off), for the process or, as a context manager, for a block.

    Like ``torch.set_grad_enabled``, it takes effect when called and, used in a ``with``, restores the previous
    setting on exit.

    Args:
        enabled: compile each activation's ``G_Y ⊙ h'`` with ``torch.compile`` (default True).
        min_numel: the smallest tensor that takes the compiled path (default 262,144 elements).

    Example::

        >>> import manualgrad
        >>> with manualgrad.fused_backward():
        ...     loss.backward()  # doctest: +SKIP
    """

    def __init__(self, enabled: bool = True, min_numel: int = MIN_NUMEL):
        if not isinstance(enabled, bool):
            raise TypeError(f"fused_backward: enabled must be True or False, got {enabled!r}")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise TypeError(f"fused_backward: min_numel must be an integer >= 0, got {min_numel!r}")
        self._previous = (_State.enabled, _State.min_numel)
        _State.enabled, _State.min_numel = enabled, min_numel

    def __enter__(self) -> fused_backward:
        return self

    def __exit__(self, *exc) -> None:
        _State.enabled, _State.min_numel = self._previous


def product(cls, grad_output: Tensor, saved: Tensor, params) -> Tensor | None:
    """``grad_output * cls.derivative(saved, *params)`` in one compiled pass, or None where that path is off,
    too small, or cannot run (then the caller evaluates the plain expression)."""
    if not _State.enabled or grad_output.numel() < _State.min_numel or grad_output.shape != saved.shape:
        return None
    if torch.is_grad_enabled() or _compat.forward_ad_enabled() or torch.compiler.is_compiling():
        return None
    if _compat.batched(grad_output) or _compat.batched(saved):
        return None
    if cls not in _State.compiled:
        _State.compiled[cls] = _compile(cls)
    compiled = _State.compiled[cls]
    if compiled is None:
        return None
    try:
        return compiled(grad_output, saved, *params)
    except Exception as e:  # no compiler on this machine, or one that failed: the plain expression, said once
        _State.compiled[cls] = None
        warnings.warn(
            f"fused_backward: {cls.__name__} could not be compiled ({type(e).__name__}: {e}); "
            "its backward runs as plain tensor ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _compile(cls):
    def body(grad_output, saved, *params):
        return grad_output * cls.derivative(saved, *params)  # G_Z = G_Y ⊙ h'

    # torch.compile keeps its compiled versions per code object: one code object per activation, so that nine
    # activations do not count as recompilations of one function
    code = body.__code__.replace(co_name=f"{cls.__name__}_fused_backward")
    return torch.compile(types.FunctionType(code, body.__globals__, code.co_name, None, body.__closure__), dynamic=True)
