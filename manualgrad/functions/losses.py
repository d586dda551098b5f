r"""Losses: the scalar :math:`R` at the top of the network, and the first gradient of every step.

Every loss here is a sum of row terms :math:`\ell_n`, reduced: ``"sum"``
(:math:`R = \sum_n \ell_n`), ``"mean"`` (:math:`R = \sum_n \ell_n / D`) or
``"none"`` (the :math:`\ell_n` themselves). So :math:`\partial R/\partial \ell_n`
is :math:`g/D`, :math:`g`, or :math:`g_n` (``_row_scale``), and each backward
is that factor times :math:`\partial \ell_n / \partial` (its inputs).
The derivations are in ``docs/derivations.md``, section 3.

Softmax cross-entropy
---------------------

With :math:`P = \operatorname{softmax}(Z)` over the class dimension and a
per-row target distribution :math:`q_n`, :math:`\ell_n = -\sum_c q_{n,c} \log P_{n,c}`
and, with :math:`s_n = \sum_c q_{n,c}`,

.. math::

    \frac{\partial \ell_n}{\partial Z_{n,c}} = s_n P_{n,c} - q_{n,c}
    \qquad\text{so}\qquad G_Z = (s \odot P - q) \odot \frac{\partial R}{\partial \ell}.

For class weights :math:`w` (ones by default) and label smoothing
:math:`\varepsilon` over :math:`C` classes, as PyTorch defines them,
:math:`q_n = w \odot ((1 - \varepsilon) T_n + \varepsilon / C)`, where :math:`T_n`
is the target's class probabilities, or :math:`\mathrm{onehot}(t_n)` for a
class index; rows whose index is ``ignore_index`` have :math:`q_n = 0` and
count nowhere. The ``mean`` divisor :math:`D` is :math:`\sum_n w_{t_n}` over
the counted rows (class indices) or the number of rows (probabilities).
Unweighted and unsmoothed this is the notes' :math:`G_Z = (P - \mathrm{onehot}(t))/N`.
A probability target gets :math:`G_T = -(1 - \varepsilon)\, w \odot \log P \odot \partial R/\partial \ell`.

Negative log-likelihood
-----------------------

:math:`\ell_n = -w_{t_n} X_{n,t_n}` on log-probabilities :math:`X`:
:math:`G_X[n, t_n] = -w_{t_n}\, \partial R/\partial \ell_n`, zero elsewhere.

Mean squared error
------------------

:math:`\ell = w (\hat Y - T)^2` elementwise, :math:`G_{\hat Y} = 2 w (\hat Y - T) \odot \partial R/\partial \ell`,
:math:`G_T = -G_{\hat Y}`; the ``mean`` divisor is the element count, or :math:`\sum w`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks
from ..registry import Example, operation
from .base import ManualFunction, apply, cast, opmath, save_for_forward
from .softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "CrossEntropyFunction",
    "MSELossFunction",
    "NLLLossFunction",
    "cross_entropy",
    "mse_loss",
    "nll_loss",
]


def class_dim(input: Tensor) -> int:
    """Where the classes are: ``(C)``: 0; ``(N, C, d1, ...)``: 1."""
    return 0 if input.dim() == 1 else 1


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """A length-C vector shaped to broadcast along the class dimension of an ndim-D input."""
    return v.reshape((-1,) + (1,) * (ndim - dim - 1))


def _row_scale(grad: Tensor, reduction: str, divisor, valid: Tensor | None = None, dim: int | None = None) -> Tensor:
    """∂R/∂ℓ_n: g/D (mean), g (sum), or g_n itself (none); zero on rows that count nowhere (``~valid``),
    also where g/D is not finite (a mean over no rows). With ``dim``, shaped to broadcast along the class
    dimension of the input."""
    scale = grad if reduction == "none" else grad / divisor if reduction == "mean" else grad
    if valid is not None:
        scale = torch.where(valid, scale, 0)
    return scale.unsqueeze(dim) if dim is not None and scale.dim() else scale


def _reduce(rows: Tensor, reduction: str, divisor) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / divisor if reduction == "mean" else total


def _softmax(z: Tensor, dim: int) -> Tensor:
    """softmax inside a backward; through our Function when a double backward records it."""
    return SoftmaxFunction.apply(z, dim, None) if torch.is_grad_enabled() else torch.softmax(z, dim)


def _log_softmax(z: Tensor, dim: int) -> Tensor:
    return LogSoftmaxFunction.apply(z, dim, None) if torch.is_grad_enabled() else torch.log_softmax(z, dim)


def _onehot(target: Tensor, like: Tensor, dim: int, valid: Tensor) -> Tensor:
    """onehot(t) along ``dim``, shaped like ``like``; rows with ``~valid`` all zero."""
    index = target.masked_fill(~valid, 0).unsqueeze(dim)  # an ignored row's index may be anything, e.g. -100
    return torch.zeros_like(like).scatter(dim, index, 1.0) * valid.unsqueeze(dim)


# ---- softmax cross-entropy ------------------------------------------------------------------------


class _CrossEntropyTerms:
    """For one call: the logits in the precision of the formulas (float32 for half inputs, promoted with a
    probability target), the target distribution ``q``, the counted rows ``valid`` (None: all), the
    ``mean`` divisor, and the weight along the class dimension (None: ones)."""

    def __init__(self, input, target, weight, ignore_index, label_smoothing):
        z = opmath(input)
        if target.is_floating_point():
            z = cast(z, torch.promote_types(z.dtype, target.dtype))
        dim = class_dim(z)
        classes = z.shape[dim]
        self.z, self.dim, self.eps = z, dim, label_smoothing
        self.w = None if weight is None else _along(cast(weight, z.dtype), dim, z.dim())
        if target.is_floating_point():
            T, self.valid = cast(target, z.dtype), None
            self.divisor = z.numel() // classes if classes else 0
        else:
            self.valid = target != ignore_index
            T = _onehot(target, z, dim, self.valid)
            self.divisor = (T if self.w is None else T * self.w).sum()  # Σ_n w_{t_n} over the counted rows
        q = (1 - label_smoothing) * T + label_smoothing / classes if label_smoothing else T
        if self.valid is not None and label_smoothing:
            q = q * self.valid.unsqueeze(dim)
        self.q = q if self.w is None else q * self.w


class CrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, weight, ignore_index, reduction, label_smoothing)``: softmax cross-entropy.

    Forward: PyTorch's own ``cross_entropy``. Backward: :math:`G_Z = (s \odot P - q) \odot \partial R/\partial\ell`
    (module docstring), with :math:`P` recomputed from the saved logits (as many
    bytes as PyTorch's saved log-softmax), stable for logits of any magnitude.

    Shape:
        - input: ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``
        - target: class indices ``()``, ``(N)``, ``(N, d1, ...)``; or probabilities of the input's shape
        - weight: ``(C)`` or ``None``
        - output: scalar, or the rows' shape for ``reduction="none"``
    """

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing):
        return torch.nn.functional.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, *options = inputs
        ctx.save_for_backward(input, target, weight)
        save_for_forward(ctx, input, target, weight)
        ctx.options, ctx.dtype = options, output.dtype

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.options
        terms = _CrossEntropyTerms(input, target, weight, ignore_index, label_smoothing)
        dim = terms.dim
        scale = _row_scale(opmath(grad_output), reduction, terms.divisor, terms.valid, dim)
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:  # G_Z = (s ⊙ P − q) ⊙ ∂R/∂ℓ
            s = terms.q.sum(dim, keepdim=True)
            grad_input = cast((s * _softmax(terms.z, dim) - terms.q) * scale, input.dtype)
        if ctx.needs_input_grad[1]:  # probabilities: G_T = −(1 − ε) w ⊙ log P ⊙ ∂R/∂ℓ
            logp = _log_softmax(terms.z, dim)
            if terms.w is not None:
                logp = logp * terms.w
            grad_target = cast(-(1 - label_smoothing) * logp * scale, target.dtype)
        return grad_input, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.options
        terms = _CrossEntropyTerms(input, target, weight, ignore_index, label_smoothing)
        dim = terms.dim
        rows = 0
        if input_tangent is not None:  # ℓ̇_n = Σ_c (s_n P_nc − q_nc) Ż_nc
            s = terms.q.sum(dim, keepdim=True)
            rows = ((s * torch.softmax(terms.z, dim) - terms.q) * cast(input_tangent, terms.z.dtype)).sum(dim)
        if target_tangent is not None:  # ℓ̇_n = −(1 − ε) Σ_c w_c log P_nc Ṫ_nc
            logp = torch.log_softmax(terms.z, dim)
            if terms.w is not None:
                logp = logp * terms.w
            rows = rows - (1 - label_smoothing) * (logp * cast(target_tangent, terms.z.dtype)).sum(dim)
        return cast(_reduce(rows, reduction, terms.divisor), ctx.dtype)


def _cross_entropy_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).mul_(3).to(dtype)

    if bench:
        return [Example(f"256x{c}", (make(256, c), torch.randint(0, c, (256,), device=device)), {}) for c in (10, 1000)]
    target = torch.randint(0, 5, (6,), device=device)
    target[1] = -100  # an ignored row
    weight = (torch.rand(5, device=device) + 0.5).to(dtype)
    probs = torch.softmax(torch.randn(6, 5, device=device), 1).to(dtype)
    spatial = torch.randint(0, 5, (3, 2, 2), device=device)
    return [Example(f"{r}", (make(6, 5), target), {"reduction": r}) for r in ("mean", "sum", "none")] + [
        Example("smoothing", (make(6, 5), target), {"label_smoothing": 0.2}),
        Example(
            "weight,smoothing,sum", (make(6, 5), target), {"weight": weight, "label_smoothing": 0.1, "reduction": "sum"}
        ),
        Example("weight", (make(6, 5), target), {"weight": weight}),
        Example("ignore_index=3", (make(6, 5), target.clamp(min=0)), {"ignore_index": 3}),
        Example("1d", (make(5), target[0]), {}),
        Example("spatial", (make(3, 5, 2, 2), spatial), {"label_smoothing": 0.1}),
        Example("probabilities", (make(6, 5), probs), {"weight": weight, "label_smoothing": 0.1}),
        Example("probabilities,none", (make(6, 5), probs), {"reduction": "none"}),
    ]


@operation(torch.nn.CrossEntropyLoss, CrossEntropyFunction, kind="loss", examples=_cross_entropy_examples)
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Softmax cross-entropy; see :class:`~manualgrad.functions.CrossEntropyFunction`.

    Backward: :math:`G_Z = (\operatorname{softmax}(Z) - \mathrm{onehot}(t))/N` when
    unweighted and unsmoothed (the general form is in ``docs/derivations.md``).
    ``target`` holds class indices (``ignore_index`` rows count nowhere) or
    class probabilities of the input's shape. A class index outside
    ``[0, C)`` raises (on CUDA, a device-side assert, to avoid a host sync).
    """
    reduction = _checks.legacy_reduction("cross_entropy", size_average, reduce, reduction)
    _checks.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    return apply(CrossEntropyFunction, input, target, weight, ignore_index, reduction, float(label_smoothing))


# ---- negative log-likelihood ----------------------------------------------------------------------


class NLLLossFunction(ManualFunction):
    r"""``apply(input, target, weight, ignore_index, reduction)``: :math:`\ell_n = -w_{t_n} X_{n, t_n}`, reduced.

    Forward: PyTorch's own ``nll_loss``. Backward: :math:`G_X[n, t_n] = -w_{t_n}\, \partial R/\partial\ell_n`,
    zero elsewhere (module docstring). Forward mode: :math:`\dot\ell_n = -w_{t_n} \dot X_{n, t_n}`.
    Shapes as :class:`CrossEntropyFunction` with class indices.
    """

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction):
        return torch.nn.functional.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, *options = inputs
        ctx.save_for_backward(target, weight)
        save_for_forward(ctx, target, weight)
        ctx.options, ctx.input_like = options, (input.shape, input.dtype, input.device)

    @staticmethod
    def _terms(ctx, dtype):
        """(valid rows, safe indices, w_{t_n} on counted rows, mean divisor)."""
        target, weight = ctx.saved_tensors
        ignore_index, _ = ctx.options
        valid = target != ignore_index
        index = target.masked_fill(~valid, 0)
        w_t = valid.to(dtype) if weight is None else cast(weight, dtype)[index] * valid
        return valid, index, w_t, w_t.sum()

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.input_like
        valid, index, w_t, divisor = NLLLossFunction._terms(ctx, opmath(grad_output).dtype)
        _, reduction = ctx.options
        dim = 0 if len(shape) == 1 else 1
        coefficient = -w_t * _row_scale(opmath(grad_output), reduction, divisor, valid)  # −w_{t_n} ∂R/∂ℓ_n
        zeros = torch.zeros(shape, dtype=coefficient.dtype, device=device)
        grad_input = zeros.scatter(dim, index.unsqueeze(dim), coefficient.unsqueeze(dim))  # at t_n, zero elsewhere
        return cast(grad_input, dtype), None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        shape, dtype, _ = ctx.input_like
        _, index, w_t, divisor = NLLLossFunction._terms(ctx, dtype)
        _, reduction = ctx.options
        dim = 0 if len(shape) == 1 else 1
        rows = -w_t * input_tangent.gather(dim, index.unsqueeze(dim)).squeeze(dim)  # ℓ̇_n = −w_{t_n} Ẋ[n, t_n]
        return _reduce(rows, reduction, divisor)


def _nll_examples(dtype, device, bench=False):
    examples = _cross_entropy_examples(dtype, device, bench)
    log_probs = [
        Example(e.id, (torch.log_softmax(e.args[0].float(), class_dim(e.args[0])).to(dtype), e.args[1]), e.kwargs)
        for e in examples
        if not e.args[1].is_floating_point() and "label_smoothing" not in e.kwargs
    ]
    return log_probs


@operation(torch.nn.NLLLoss, NLLLossFunction, kind="loss", examples=_nll_examples)
def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of class indices under log-probabilities ``input``; see
    :class:`~manualgrad.functions.NLLLossFunction`. ``nll_loss(log_softmax(z, 1), t)`` is ``cross_entropy(z, t)``."""
    layer = "nll_loss"
    reduction = _checks.legacy_reduction(layer, size_average, reduce, reduction)
    _checks.tensor(layer, "input", input)
    _checks.tensor(layer, "target", target)
    _checks.reduction(layer, reduction)
    if input.dim() == 0:
        raise _checks.InputError(f"{layer}: input must be (C), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    _checks.real_floating(layer, "input", input)
    _checks.same_device(layer, "input", input, "target", target)
    dim = class_dim(input)
    _checks.class_weight(layer, weight, input, input.shape[dim])
    _checks.class_index_target(layer, input, target, dim)
    _checks.class_values(layer, target, input.shape[dim], ignore_index)
    return apply(NLLLossFunction, input, target, weight, ignore_index, reduction)


# ---- mean squared error ---------------------------------------------------------------------------


class MSELossFunction(ManualFunction):
    r"""``apply(input, target, weight, reduction)``: :math:`R = \frac1M\sum w(\hat Y - T)^2`, the sum, or elementwise.

    Backward: :math:`G_{\hat Y} = 2 w (\hat Y - T) \odot \partial R/\partial\ell` (:math:`M` = the element
    count, or :math:`\sum w`), :math:`G_T = -G_{\hat Y}`, each summed back to its
    own shape when input and target broadcast. The weight is not differentiated.
    Forward mode: :math:`\dot R = \frac1M \sum 2 w (\hat Y - T)(\dot{\hat Y} - \dot T)`.

    Shape: input ``(*)``, target broadcastable to it, weight the input's shape or
    ``None``; output scalar, or ``(*)`` for ``"none"``.
    """

    @staticmethod
    def forward(input, target, weight, reduction):
        if input.shape == target.shape:
            return torch.nn.functional.mse_loss(input, target, reduction=reduction, weight=weight)
        with warnings.catch_warnings():  # the wrapper warned already about a target of another shape
            warnings.simplefilter("ignore")
            return torch.nn.functional.mse_loss(input, target, reduction=reduction, weight=weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        save_for_forward(ctx, input, target, weight)
        ctx.reduction, ctx.dtype = reduction, output.dtype

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight = ctx.saved_tensors
        diff = opmath(input) - opmath(target)
        scale = _row_scale(opmath(grad_output), ctx.reduction, _mse_divisor(diff, weight))
        grad = 2 * diff * scale if weight is None else 2 * weight * diff * scale  # G_Ŷ = 2 w (Ŷ − T) ⊙ ∂R/∂ℓ
        grad_input = cast(grad.sum_to_size(input.shape), input.dtype) if ctx.needs_input_grad[0] else None
        grad_target = cast((-grad).sum_to_size(target.shape), target.dtype) if ctx.needs_input_grad[1] else None
        return grad_input, grad_target, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight = ctx.saved_tensors
        if input_tangent is None:
            diff_tangent = -target_tangent
        elif target_tangent is None:
            diff_tangent = input_tangent
        else:
            diff_tangent = input_tangent - target_tangent
        diff = opmath(input) - opmath(target)
        terms = 2 * diff * diff_tangent if weight is None else 2 * weight * diff * diff_tangent
        return cast(_reduce(terms, ctx.reduction, _mse_divisor(diff, weight)), ctx.dtype)


def _mse_divisor(diff: Tensor, weight: Tensor | None):
    return diff.numel() if weight is None else weight.sum()


def _mse_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:
        return [Example("256x4096", (make(256, 4096), make(256, 4096)), {})]
    return [Example(r, (make(4, 3), make(4, 3)), {"reduction": r}) for r in ("mean", "sum", "none")] + [
        Example("weight", (make(4, 3), make(4, 3)), {"weight": torch.rand(4, 3, device=device).to(dtype)}),
    ]


@operation(torch.nn.MSELoss, MSELossFunction, kind="loss", examples=_mse_examples)
def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Mean squared error; see :class:`~manualgrad.functions.MSELossFunction`.

    Backward: :math:`G_{\hat Y} = 2(\hat Y - T)/M`. A target of another shape
    broadcasts, with torch's warning.
    """
    reduction = _checks.legacy_reduction("mse_loss", size_average, reduce, reduction)
    _checks.pointwise_loss("mse_loss", input, target, reduction, weight)
    return apply(MSELossFunction, input, target, weight, reduction)
