"""The base class every manualgrad Function derives from.

It adds two things to :class:`torch.autograd.Function`:

* ``generate_vmap_rule = True``: forward and backward are written in plain
  tensor ops, so ``torch.func.vmap`` can batch them (per-sample gradients with
  ``vmap(grad(f))``, ``jacrev``, ``jvp`` under ``vmap``).
* A twin for ``torch.compile``. Dynamo refuses to trace a Function that
  defines a custom ``jvp`` (it graph-breaks with "Unsupported custom jvp"),
  yet forward-mode AD needs one. Every subclass that defines ``jvp`` therefore
  gets ``cls.traceable``: a subclass of itself whose ``jvp`` is the default
  one. :func:`applier` returns an ``apply`` that picks the twin while Dynamo
  is tracing and the class itself otherwise, so eager code keeps forward-mode
  AD and compiled code has no graph break. (Compiled code does not support
  forward-mode AD, just as for any Function without a jvp.)

It also caches ``forward.__signature__``: for a Function with
``setup_context``, ``apply`` binds the call's arguments to ``forward``'s
signature on every call, and building that signature is a third of the
Python cost of ``apply``.
"""

from __future__ import annotations

import inspect

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.autograd import Function

__all__ = ["ManualFunction", "applier", "cast", "save_for_forward"]

_DEFAULT_JVP = Function.jvp


class ManualFunction(Function):
    """A :class:`torch.autograd.Function` whose backward (and jvp) is a written-out formula."""

    generate_vmap_rule = True
    traceable: type[ManualFunction]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward.__signature__ = inspect.signature(cls.forward)
        if cls.jvp is _DEFAULT_JVP:
            cls.traceable = cls
        else:
            # Created here so that user subclasses (which may override backward) get their own twin.
            cls.traceable = type(
                cls.__name__, (cls,), {"jvp": staticmethod(_DEFAULT_JVP), "__module__": cls.__module__}
            )


def applier(function: type[ManualFunction]):
    """``function.apply``, or its compile twin's ``apply`` while ``torch.compile`` traces the caller.

    Both classes are bound here, outside any trace, because Dynamo cannot read
    an attribute off an autograd.Function class.
    """
    eager, traceable = function.apply, function.traceable.apply

    def apply(*args):
        return traceable(*args) if torch.compiler.is_compiling() else eager(*args)

    apply.__name__ = apply.__qualname__ = f"{function.__name__}.apply"
    return apply


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` already has it (always, outside autocast)."""
    return t if t.dtype == dtype else t.to(dtype)


def save_for_forward(ctx, *tensors) -> None:
    """``ctx.save_for_forward(*tensors)``, but only when forward-mode AD can call the jvp: inside a
    ``torch.autograd.forward_ad.dual_level`` or a ``torch.func`` transform. Outside them the call
    does nothing useful and costs ~2% of a small MLP's training step."""
    if _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        ctx.save_for_forward(*tensors)
