"""The base class every manualgrad Function derives from, and the small helpers the Functions share.

:class:`ManualFunction` adds two things to :class:`torch.autograd.Function`:

* ``generate_vmap_rule = True``: forward and backward are written in plain
  tensor ops, so ``torch.func.vmap`` can batch them (per-sample gradients with
  ``vmap(grad(f))``, ``jacrev``, ``jvp`` under ``vmap``).
* A twin for ``torch.compile``. Dynamo refuses to trace a Function that
  defines a custom ``jvp`` (it graph-breaks with "Unsupported custom jvp"),
  yet forward-mode AD needs one. Every subclass that defines ``jvp`` therefore
  gets ``cls.traceable``: a subclass of itself whose ``jvp`` is the default
  one. :func:`apply` picks the twin while Dynamo is tracing and the class
  itself otherwise, so eager code keeps forward-mode AD and compiled code has
  no graph break.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import Function

from .. import _compat

__all__ = ["ManualFunction", "apply", "cast", "exp", "opmath", "recorded", "save", "save_for_forward", "tangent_sum"]

_DEFAULT_JVP = Function.jvp
_HALF = (torch.float16, torch.bfloat16)
_LOG2E = math.log2(math.e)


class ManualFunction(Function):
    """A :class:`torch.autograd.Function` whose backward (and jvp) is a written-out formula."""

    generate_vmap_rule = True
    traceable: type[ManualFunction]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward.__signature__ = _Signature(inspect.signature(cls.forward))
        if cls.jvp is _DEFAULT_JVP:
            cls.traceable = cls
        else:  # made here, so that user subclasses (which may override backward) get their own twin
            cls.traceable = type(
                cls.__name__, (cls,), {"jvp": staticmethod(_DEFAULT_JVP), "__module__": cls.__module__}
            )
        cls.dispatch = _dispatcher(cls)


class _Signature(inspect.Signature):
    """``forward``'s signature, binding a call that passes every parameter positionally in one step.

    Speed (the one trick in this file): ``Function.apply`` binds every call to
    ``inspect.signature(cls.forward)`` when the Function has a ``setup_context``,
    and ``Signature.bind`` is general Python machinery, ~80% of ``apply``'s cost
    (~6x a Function with a ctx-style forward): a fifth of a small MLP's
    per-layer training step. Every wrapper here passes all of ``forward``'s
    parameters positionally, which needs no binding; any other call goes to
    ``inspect``. ``tests/test_gradcheck.py`` checks both bind alike.
    """

    __slots__ = ("_count", "_varargs")

    def __init__(self, signature: inspect.Signature):
        super().__init__(list(signature.parameters.values()), return_annotation=signature.return_annotation)
        kinds = [p.kind for p in signature.parameters.values()]
        self._varargs = inspect.Parameter.VAR_POSITIONAL in kinds  # forward(input, spec, *params): last
        self._count = len(kinds) - self._varargs

    def bind(self, *args, **kwargs):
        if kwargs or len(args) < self._count or (len(args) > self._count and not self._varargs):
            return super().bind(*args, **kwargs)
        return _Bound(args)


class _Bound:
    """What ``Signature.bind`` returns for a call that passes every parameter positionally."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple):
        self.args, self.kwargs = args, {}

    def apply_defaults(self) -> None:
        pass  # every parameter is given


def apply(function: type[ManualFunction], *args):
    """``function.apply(*args)``, or its compile twin's while ``torch.compile`` traces the caller."""
    return function.dispatch(*args)


def _dispatcher(function: type[ManualFunction]):
    """``function.dispatch``: both ``apply`` methods bound here, outside any trace, because Dynamo cannot call
    the ``apply`` of a class read off another (``function.traceable.apply`` graph-breaks)."""
    eager, traceable = function.apply, function.traceable.apply

    def dispatch(*args):
        return traceable(*args) if torch.compiler.is_compiling() else eager(*args)

    return staticmethod(dispatch)


def recorded(plain: Callable, ours: type[ManualFunction] | Callable) -> Callable:
    """``plain(*args)`` inside a backward, and ``ours`` (a Function, applied as :func:`apply` applies it, or a
    function of the same arguments) when a double backward records it (``create_graph=True``), so that second
    derivatives are our formulas too, never a PyTorch derivative kernel:
    ``_sigmoid = recorded(torch.sigmoid, SigmoidFunction)``."""
    if isinstance(ours, type):
        ours = ours.dispatch

    def call(*args):
        return ours(*args) if torch.is_grad_enabled() else plain(*args)

    return call


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` already has it (always, outside autocast)."""
    return t if t.dtype == dtype else t.to(dtype)


def opmath(t: Tensor) -> Tensor:
    """``t`` in the precision a formula is computed in: float32 for float16 and bfloat16 (as PyTorch's own
    kernels compute them; the result is rounded once, at the end), the tensor itself otherwise."""
    return t.float() if t.dtype in _HALF else t


def exp(x: Tensor, scale: float = 1.0, *, reuse: bool = False) -> Tensor:
    r""":math:`e^{\text{scale}\,x}` inside a formula; ``reuse``: ``x`` is a new tensor the caller gives up, whose
    memory then holds the result.

    Speed (a trick of this module): computed as :math:`2^{x\,\text{scale}\log_2 e}`, the constant folded into one
    scaling pass; on the CPU ``torch.exp2`` runs about 6x faster than ``torch.exp`` (1M float32, one thread: 0.2 ms
    against 1.2 ms), a third of GELU's backward and half of log_softmax's. The exponent carries one more rounding
    (relative error about :math:`|\text{scale}\,x| \log_2 e \cdot 2^{-24}` in float32, the order of the rounding of
    ``x`` itself). ``tests/test_gradcheck.py`` checks it against ``torch.exp``.
    """
    c = scale * _LOG2E
    return (x.mul_(c) if reuse else x * c).exp2_()


def save_for_forward(ctx, *tensors) -> None:
    """``ctx.save_for_forward(*tensors)`` when forward-mode AD can call the jvp (inside a
    ``forward_ad.dual_level`` or a ``torch.func`` transform); elsewhere the call does nothing useful."""
    if _compat.forward_ad_enabled():
        ctx.save_for_forward(*tensors)


def save(ctx, *tensors) -> None:
    """``ctx.save_for_backward(*tensors)`` and :func:`save_for_forward`: tensors both backward and jvp read."""
    ctx.save_for_backward(*tensors)
    save_for_forward(ctx, *tensors)


def tangent_sum(*terms: Tensor | None) -> Tensor | None:
    """A jvp's Ẏ: the sum of its ``terms``, left to right, each None where its input has no tangent (then it adds
    nothing); None when none has one. A term is written ``None if ẋ is None else <formula of ẋ>``."""
    given = [t for t in terms if t is not None]
    return sum(given[1:], given[0]) if given else None
