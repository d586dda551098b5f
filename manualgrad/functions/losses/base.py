r"""What every loss shares. A loss reduces its terms :math:`\ell_n`: ``"sum"`` :math:`R = \sum_n \ell_n`, ``"mean"``
:math:`R = \sum_n \ell_n / D` or ``"none"``, so :math:`\partial R/\partial \ell_n` is :math:`g`, :math:`g/D` or
:math:`g_n` (:func:`_row_scale`). Weights are constants. A tensor a backward makes only to scale it is scaled in
place while nothing records it (:func:`_in_place`)."""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import _checks, _compat
from ...registry import _with_signature, operation
from .. import recorder
from ..base import ManualFunction, cast, opmath, save


def class_dim(input: Tensor) -> int:
    """Where the classes are: ``(C)``: 0; ``(N, C, d1, ...)``: 1."""
    return 0 if input.dim() == 1 else 1


def _row_scale(grad: Tensor, reduction: str, divisor, valid: Tensor | None = None) -> Tensor:
    """∂R/∂ℓ_n: g/D (mean), g (sum), or g_n itself (none); zero on rows that count nowhere (``~valid``),
    also where g/D is not finite (a mean over no rows). Tells a per_sample recorder the loss's reduction."""
    recorder.note_loss(reduction)
    scale = grad / divisor if reduction == "mean" else grad
    return scale if valid is None else torch.where(valid, scale, 0)


def _reduce(terms: Tensor, reduction: str, divisor, valid: Tensor | None = None) -> Tensor:
    """R of the terms ℓ_n, a row outside ``valid`` (None: every row counts) as 0."""
    terms = terms if valid is None else torch.where(valid, terms, 0)
    return terms if reduction == "none" else terms.sum() / divisor if reduction == "mean" else terms.sum()


def _in_place(grad_output: Tensor) -> bool:
    """Whether a backward may overwrite what it made: not while autograd records, compiles, or vmaps the gradient."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not _compat.batched(grad_output)


def _times(t: Tensor, factor, in_place: bool) -> Tensor:
    """``t * factor`` (``t`` for the number 1), written into ``t`` (just made by the backward) if ``in_place``."""
    if isinstance(factor, float) and factor == 1.0:
        return t
    return t.mul_(factor) if in_place else t * factor


class ElementwiseLoss(ManualFunction):
    r"""Base of the losses :math:`\ell = w \odot \ell(x, t)` elementwise (:math:`w = 1` without a weight), reduced:
    :math:`G_X = w \odot \partial_x\ell \odot \partial_\ell R`, :math:`G_T = w \odot \partial_t\ell \odot \partial_\ell
    R`, each summed to its own shape, :math:`\dot\ell = w \odot (\partial_x\ell\, \dot x + \partial_t\ell\, \dot t)`.
    ``apply(input, target, weight, <more tensors>, reduction, <options>)``, ``tensors`` (3) of them, all kept. A
    subclass defines ``forward`` (PyTorch's kernel), ``d_input(x, t, *rest, in_place)``: ``(r, c)`` with
    :math:`\partial\ell/\partial x = c\, r`, ``c`` a number, ``rest`` the other tensors and the options (``in_place``:
    it may overwrite what it makes, never x or t), and ``d_target`` the same for :math:`\partial\ell/\partial t`
    (None: a loss of :math:`x - t`). Half precision is computed in float32."""

    tensors = 3
    mean_over_weights = False
    d_target = None

    @classmethod
    def divisor(cls, input: Tensor, target: Tensor, weight: Tensor | None):
        """D of ``mean``: the element count, or Σw (``mean_over_weights``, with a weight)."""
        if weight is not None and cls.mean_over_weights:
            return opmath(weight).sum()
        return math.prod(torch.broadcast_shapes(input.shape, target.shape))

    @classmethod
    def reduce(cls, terms: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
        """R of ℓ = w ⊙ terms (D: :meth:`divisor`), in the terms' dtype; for a ``forward`` written out, and the jvp."""
        terms = terms if weight is None else terms * weight
        return cast(_reduce(terms, reduction, cls.divisor(terms, terms, weight)), terms.dtype)

    def __init_subclass__(cls, **kwargs):
        # closures over this subclass's ∂ℓ (as Elementwise's), so that vmap's and Dynamo's ctx need no attribute
        n = cls.tensors

        def setup_context(ctx, inputs, output):
            save(ctx, *inputs[:n])
            ctx.reduction, ctx.options, ctx.dtype = inputs[n], inputs[n + 1 :], output.dtype

        def partials(ctx, input, target, others, in_place, which):
            x, t = opmath(input), opmath(target)
            rest = (*(None if o is None else opmath(o) for o in others), *ctx.options, in_place)
            if which == 0 or cls.d_target is None:
                r, c = cls.d_input(x, t, *rest)
                return (r, c) if which == 0 else (r, -c)
            return cls.d_target(x, t, *rest)

        def backward(ctx, grad_output):
            input, target, weight, *others = ctx.saved_tensors
            in_place = _in_place(grad_output)
            scale = _row_scale(opmath(grad_output), ctx.reduction, cls.divisor(input, target, weight))  # ∂R/∂ℓ

            def grad(i):  # w ⊙ ∂ℓ/∂(x, t)[i] ⊙ ∂R/∂ℓ, in the broadcast shape
                r, c = partials(ctx, input, target, others, in_place, i)  # ∂ℓ = c r
                g = _times(r, scale if c == 1 else c * scale, in_place)
                return g if weight is None else _times(g, weight, in_place)

            g_x = grad(0) if ctx.needs_input_grad[0] else None
            difference = g_x is not None and cls.d_target is None  # a loss of x − t: G_T = −G_X
            g_t = (-g_x if difference else grad(1)) if ctx.needs_input_grad[1] else None
            g_x = None if g_x is None else cast(g_x.sum_to_size(input.shape), input.dtype)
            g_t = None if g_t is None else cast(g_t.sum_to_size(target.shape), target.dtype)
            return (g_x, g_t) + (None,) * (n - 1 + len(ctx.options))

        def jvp(ctx, input_tangent, target_tangent, *_):
            input, target, weight, *others = ctx.saved_tensors
            terms = 0
            for i, tangent in ((0, input_tangent), (1, target_tangent)):
                if tangent is not None:  # ℓ̇ = w ⊙ (∂ℓ/∂x ẋ + ∂ℓ/∂t ṫ)
                    r, c = partials(ctx, input, target, others, False, i)
                    terms = terms + c * r * opmath(tangent)
            return cast(cls.reduce(terms, weight, ctx.reduction), ctx.dtype)

        cls.setup_context = staticmethod(setup_context)
        cls.backward = staticmethod(backward)
        if "jvp" not in cls.__dict__:  # the compile twin keeps its default jvp
            cls.jvp = staticmethod(jvp)
        super().__init_subclass__(**kwargs)


class PointwiseLoss(ElementwiseLoss):
    r"""Base of the losses :math:`\ell = w \odot \rho(d)` of :math:`d = \hat y - t`, :math:`\partial\ell/\partial\hat y
    = \rho'(d) = -\partial\ell/\partial t`. ``apply(input, target, weight, reduction, parameter)``; a subclass gives
    ``forward`` and ``derivative(d, parameter, out)``: ``(r, c)``, :math:`\rho'(d) = c\, r(d)`, ``r`` into ``out`` if
    given. Shape: input ``(*)``, target broadcastable, weight ``(*)`` or None; output ``()``, or broadcast (none)."""

    mean_over_weights = True

    @classmethod
    def d_input(cls, x, t, parameter, in_place):
        d = x - t  # D = Ŷ − T
        return cls.derivative(d, parameter, d if in_place else None)


def loss(function: type[ManualFunction], module, name: str, check=None, *, reference=None):
    """Declare and return ``function``'s wrapper ``name``, with the signature of torch's function of that name (or
    ``mse_loss``'s): legacy ``size_average``/``reduce`` to ``reduction``, ``check(*forward's arguments, layer=name)``
    (default ``_checks.pointwise_loss`` or ``_checks.<name>``; it may return arguments it settled, by name, e.g.
    ``{"ignore_index": None}``), float options as floats, uint8 class indices as int64, then ``function``. No torch
    module nor ``reference``: the checks compare with ``function.forward``."""
    params = list(inspect.signature(getattr(F, name, F.mse_loss)).parameters.values())[1:]
    names, order = ["input", *(p.name for p in params)], list(inspect.signature(function.forward).parameters)
    take = [names.index(k) if k in names else len(names) for k in order]  # forward's arguments among torch's
    floats = [j for j, i in enumerate(take) if 0 < i < len(names) and isinstance(params[i - 1].default, float)]
    legacy = "reduce" in names and (names.index("size_average"), names.index("reduce"), order.index("reduction"))
    check = check or (_checks.pointwise_loss if issubclass(function, PointwiseLoss) else getattr(_checks, name))

    def wrapper(callee):
        def call(*values):
            values = (*values, None)  # None: a parameter torch's function has not
            args = [values[i] for i in take]
            if legacy:
                args[legacy[2]] = _checks.legacy_reduction(name, values[legacy[0]], values[legacy[1]], args[legacy[2]])
            for parameter, value in (check(*args, layer=name) or {}).items():  # what the checks found out
                args[order.index(parameter)] = value
            for j in floats:
                args[j] = float(args[j])
            if args[1].dtype == torch.uint8:  # class indices, which torch takes for a 1-D or 2-D input
                args[1] = args[1].long()
            if check is _checks.pointwise_loss and args[0].shape != args[1].shape:  # it warned: torch would again
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Using a target size")
                    return callee(*args)
            out = callee(*args)
            return out[0] if isinstance(out, tuple) else out  # the loss (CrossEntropyFunction's log P after it)

        return _with_signature(name, params, call, function.__doc__)

    if reference is None and module is None:
        reference = wrapper(function.forward)
    return operation(module, function, kind="loss", reference=reference)(wrapper(function.dispatch))


class ClassTarget:
    """A class-index target's rows: ``valid`` (not ``ignore_index``; None: all), ``index`` (t, ignored rows at 0, class
    dimension kept), ``w_t`` (:math:`w_{t_n}`; 1.0 without class weights), ``divisor`` (rows counted, or Σw_t)."""

    def __init__(self, target: Tensor, weight: Tensor | None, ignore_index: int | None, dtype: torch.dtype, dim: int):
        self.valid = None if ignore_index is None else target != ignore_index  # the rows that count
        index = target if ignore_index is None else target.masked_fill(~self.valid, 0)  # an ignored row's: e.g. -100
        self.index = index.unsqueeze(dim)
        self.w_t = 1.0 if weight is None else cast(weight, dtype)[index]
        counts = self.valid if weight is None else self.w_t if self.valid is None else self.w_t * self.valid
        self.divisor = target.numel() if counts is None else counts.sum()


def _minus_onehot(g: Tensor, index: Tensor, coefficient, dim: int, in_place: bool) -> Tensor:
    """g − onehot(t) ⊙ coefficient along ``dim`` (``index``: t with ``dim`` kept; the coefficient a number or shaped
    like ``index``), without the one-hot matrix: added at the target classes (in ``g`` itself when ``in_place``)."""
    minus = (-coefficient if isinstance(coefficient, Tensor) else g.new_full((), -coefficient)).expand(index.shape)
    return g.scatter_add_(dim, index, minus) if in_place else g.scatter_add(dim, index, minus)
