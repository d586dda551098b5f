r"""One pass per backward formula, opt-in: an activation's :math:`G_Z = G_Y \odot h'(S)` and LayerNorm's
:math:`G_X`, compiled by ``torch.compile``.

Speed (the one trick in this file): a backward written in tensor ops makes one pass over memory per operation
(GELU's :math:`h'` is an ``erf``, an ``exp`` and several multiply-adds; LayerNorm's :math:`G_X` a dozen passes),
where PyTorch's derivative kernel makes one. Under :func:`fused_backward` the same Python formula is compiled by
``torch.compile`` (inductor: a C++ loop on the CPU, Triton on CUDA) into one loop, so the code a reader sees is
still the formula. It is used only where it pays and can run: tensors of at least ``min_numel`` elements, no
double backward, forward-mode AD, vmap or enclosing ``torch.compile`` (there the plain formula runs). Cost: each
Function compiles once per process and dtype (about 1 s each on a CPU, several seconds for the first), hence
opt-in. ``tests/test_fused.py`` checks that both are equal; ``python -m benchmarks`` measures it.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .. import _compat

__all__ = ["fused_backward", "product", "run", "wanted"]

# below this the compiled call's fixed cost (~20-40 µs) outweighs the passes it saves: measured on MNIST-size
# steps (784-512-256-10, 1 thread), the compiled backward cost 1-5% of the step at batch 128 (65,536 elements)
# and bought 3-15% at batch 512 (262,144) for GELU, SiLU and ELU (ReLU's, one comparison, lost 2.5%)
MIN_NUMEL = 1 << 18


class _State:
    enabled = False
    min_numel = MIN_NUMEL
    compiled: ClassVar[dict] = {}  # Elementwise subclass -> its compiled G_Y ⊙ h'(S), or None where compiling failed


class fused_backward:
    """Switch the one-pass backwards (activations, LayerNorm) on or off, for the process or, in a ``with``, a block.

    Like ``torch.set_grad_enabled``, it takes effect when called and, used in a ``with``, restores the previous
    setting on exit.

    Args:
        enabled: compile each activation's ``G_Y ⊙ h'`` and LayerNorm's ``G_X`` with ``torch.compile`` (default True).
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
    """An activation's ``grad_output * cls.derivative(saved, *params)`` in one compiled pass, or None (then the
    caller evaluates the plain expression)."""
    if not wanted() or grad_output.shape != saved.shape:
        return None
    return run(cls, lambda g, s, *p: g * cls.derivative(s, *p), grad_output, saved, *params)  # G_Z = G_Y ⊙ h'


def wanted() -> bool:
    """Whether the compiled path is switched on and can run here (nothing records, traces or compiles)."""
    if not _State.enabled or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() or _compat.forward_ad_enabled())


def run(owner: type, formula: Callable, *args):
    """``formula(*args)`` compiled (once per ``owner``, the Function whose backward it is), or None where that path
    is off, the first tensor too small, or the call cannot run compiled: then the caller runs its plain code."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not wanted() or tensors[0].numel() < _State.min_numel:
        return None
    if any(_compat.batched(t) for t in tensors):
        return None
    if owner not in _State.compiled:
        _State.compiled[owner] = _compile(formula, owner.__name__)
    compiled = _State.compiled[owner]
    if compiled is None:
        return None
    try:
        return compiled(*args)
    except Exception as e:  # no compiler on this machine, or one that failed: the plain expression, said once
        _State.compiled[owner] = None
        warnings.warn(
            f"fused_backward: {owner.__name__} could not be compiled ({type(e).__name__}: {e}); "
            "its backward runs as plain tensor ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _compile(formula: Callable, name: str):
    # torch.compile keeps its compiled versions per code object: one code object per Function, so that the
    # activations (one lambda) do not count as recompilations of one function
    code = formula.__code__.replace(co_name=f"{name}_fused_backward")
    function = types.FunctionType(code, formula.__globals__, code.co_name, formula.__defaults__, formula.__closure__)
    return torch.compile(function, dynamic=True)
