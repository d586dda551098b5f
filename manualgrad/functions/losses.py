r"""Losses: the scalar :math:`R` at the top of the network, and the first gradient of every step.

Every loss here is a sum of terms :math:`\ell_n` (one per row, or one per
element), reduced: ``"sum"`` (:math:`R = \sum_n \ell_n`), ``"mean"``
(:math:`R = \sum_n \ell_n / D`) or ``"none"`` (the :math:`\ell_n` themselves).
So :math:`\partial R/\partial \ell_n` is :math:`g/D`, :math:`g`, or :math:`g_n`
(``_row_scale``), and each backward is that factor times
:math:`\partial \ell_n / \partial` (its inputs). Weights are constants: they
are not differentiated. The derivations, line by line, are in ``docs/derivations.md``.

Softmax cross-entropy
    :math:`P = \operatorname{softmax}(Z)` over the classes, a target distribution
    :math:`q_n` per row (class index, class weights, label smoothing and
    ``ignore_index`` all shape :math:`q`), :math:`s_n = \sum_c q_{n,c}`:
    :math:`\ell_n = -\sum_c q_{n,c} \log P_{n,c}`,
    :math:`G_Z = (s \odot P - q) \odot \partial R/\partial \ell`, and for a
    probability target :math:`G_T = -(1 - \varepsilon)\, w \odot \log P \odot \partial R/\partial \ell`.
    Unweighted and unsmoothed: :math:`G_Z = (P - \mathrm{onehot}(t))/N`.

Negative log-likelihood
    :math:`\ell_n = -w_{t_n} X_{n,t_n}`: :math:`G_X[n, t_n] = -w_{t_n}\, \partial R/\partial \ell_n`, zero elsewhere.

Losses of a difference :math:`D = \hat Y - T` (:class:`PointwiseLoss`)
    :math:`\ell = w \odot \rho(D)` elementwise, :math:`G_{\hat Y} = w \odot \rho'(D) \odot \partial R/\partial \ell`,
    :math:`G_T = -G_{\hat Y}`:

    * ``mse_loss``: :math:`\rho(d) = d^2`, :math:`\rho'(d) = 2d`;
    * ``l1_loss``: :math:`\rho(d) = |d|`, :math:`\rho'(d) = \operatorname{sign} d` (0 at :math:`d = 0`);
    * ``smooth_l1_loss``: :math:`\rho(d) = d^2/2\beta` where :math:`|d| < \beta`, else :math:`|d| - \beta/2`;
      :math:`\rho'(d) = \operatorname{clamp}(d, -\beta, \beta)/\beta`, and :math:`\operatorname{sign} d` for
      :math:`\beta = 0`;
    * ``huber_loss``: :math:`\rho(d) = d^2/2` where :math:`|d| \le \delta`, else :math:`\delta(|d| - \delta/2)`;
      :math:`\rho'(d) = \operatorname{clamp}(d, -\delta, \delta)`.

Binary cross-entropy, on probabilities :math:`x`
    :math:`\ell = -w\,(t \log x + (1 - t) \log(1 - x))` (each log clamped at -100, as in PyTorch):
    :math:`G_X = w \odot (x - t) / \max((1 - x)x, 10^{-12}) \odot \partial R/\partial \ell`,
    :math:`G_T = -w \odot \operatorname{logit}(x) \odot \partial R/\partial \ell`.

Binary cross-entropy on logits :math:`z`, positive-class weight :math:`p`
    :math:`\ell = w\,((1 - t) z + (1 + (p - 1) t) \log(1 + e^{-z}))`:
    :math:`G_Z = w \odot (\sigma(z)(1 + (p - 1)t) - p t) \odot \partial R/\partial \ell`,
    :math:`G_T = w \odot (p \log(1 + e^{-z}) - \log(1 + e^{z})) \odot \partial R/\partial \ell`
    (:math:`-z` for :math:`p = 1`).

Each Function's forward is PyTorch's own kernel; each backward and jvp is the
formula, in plain tensor operations (under ``create_graph``, the sigmoid and
softmax in them go through our own Functions). Half-precision inputs are
differentiated in float32 and rounded once (:func:`~manualgrad.functions.base.opmath`).
Where a backward makes a tensor only to scale it, it scales it in place while
nothing records it (``_in_place``; an operand batched by ``torch.func`` falls
back to a copy): the same formula, without allocating a second array of the
input's size, which costs as much as a pass over it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks, _compat
from ..registry import operation
from . import recorder
from .activations import _sigmoid
from .base import ManualFunction, apply, cast, opmath, save_for_forward
from .softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "BinaryCrossEntropyFunction",
    "BinaryCrossEntropyWithLogitsFunction",
    "CrossEntropyFunction",
    "HuberLossFunction",
    "L1LossFunction",
    "MSELossFunction",
    "NLLLossFunction",
    "PointwiseLoss",
    "SmoothL1LossFunction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "nll_loss",
    "smooth_l1_loss",
]


def class_dim(input: Tensor) -> int:
    """Where the classes are: ``(C)``: 0; ``(N, C, d1, ...)``: 1."""
    return 0 if input.dim() == 1 else 1


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """A length-C vector shaped to broadcast along the class dimension of an ndim-D input."""
    return v.reshape((-1,) + (1,) * (ndim - dim - 1))


def _row_scale(grad: Tensor, reduction: str, divisor, valid: Tensor | None = None) -> Tensor:
    """∂R/∂ℓ_n: g/D (mean), g (sum), or g_n itself (none); zero on rows that count nowhere (``~valid``),
    also where g/D is not finite (a mean over no rows). Tells a per_sample recorder the loss's reduction."""
    recorder.note_loss(reduction)
    scale = grad / divisor if reduction == "mean" else grad
    return scale if valid is None else torch.where(valid, scale, 0)


def _reduce(terms: Tensor, reduction: str, divisor) -> Tensor:
    if reduction == "none":
        return terms
    total = terms.sum()
    return total / divisor if reduction == "mean" else total


def _in_place(grad_output: Tensor) -> bool:
    """Whether a backward may overwrite the tensors it has just made: not while autograd records them (a double
    backward), nor while ``torch.compile`` traces it, nor when a vmap batches the incoming gradient (``torch.func``,
    gradcheck's batched check: a batched factor cannot go into an unbatched tensor)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not _compat.batched(grad_output)


def _times(t: Tensor, factor, in_place: bool) -> Tensor:
    """``t * factor``, written into ``t`` (a tensor the backward has just made, the shape of the result)
    when ``in_place``: one array of the input's size less to allocate."""
    return t.mul_(factor) if in_place else t * factor


def _softmax(z: Tensor, dim: int) -> Tensor:
    """softmax inside a backward; through our Function when a double backward records it."""
    return SoftmaxFunction.apply(z, dim, None) if torch.is_grad_enabled() else torch.softmax(z, dim)


def _log_softmax(z: Tensor, dim: int) -> Tensor:
    return LogSoftmaxFunction.apply(z, dim, None) if torch.is_grad_enabled() else torch.log_softmax(z, dim)


def _logit(x: Tensor) -> Tensor:
    """log(x / (1 − x)) inside a backward: PyTorch's kernel, or, when a double backward records it,
    log x − log(1 − x), whose derivative is plain arithmetic (not ``logit_backward``)."""
    return torch.logit(x) if not torch.is_grad_enabled() else torch.log(x) - torch.log1p(-x)


def _log_sigmoid(z: Tensor) -> Tensor:
    """log σ(z) = −(max(−z, 0) + log(1 + e^{−|z|})) inside a backward: PyTorch's kernel, or, when a double
    backward records it, that stable form in plain arithmetic (not ``log_sigmoid_backward``)."""
    if not torch.is_grad_enabled():
        return torch.nn.functional.logsigmoid(z)
    return -(torch.clamp(-z, min=0) + torch.log1p(torch.exp(-z.abs())))


def _minus_onehot(g: Tensor, index: Tensor, coefficient, dim: int, in_place: bool) -> Tensor:
    """g − onehot(t) ⊙ coefficient along ``dim`` (``index`` is t with ``dim`` kept, the coefficient a number or
    one per row, shaped like ``index``): the one-hot matrix is never built, the coefficients are added at the
    target classes (in ``g`` itself when ``in_place``)."""
    if not isinstance(coefficient, Tensor):
        coefficient = g.new_full((), coefficient)
    minus = (-coefficient).expand(index.shape)
    return g.scatter_add_(dim, index, minus) if in_place else g.scatter_add(dim, index, minus)


def _indices(target: Tensor) -> Tensor:
    """A uint8 class-index target (which torch takes for a 1-D or 2-D input) as int64, the index dtype."""
    return target.long() if target.dtype == torch.uint8 else target


def _without_size_warning(loss, input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
    """``loss(input, target, ...)``, PyTorch's own; its warning about a target of another shape is silenced,
    as the wrapper gave it already."""
    if input.shape == target.shape:
        return loss(input, target, *args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loss(input, target, *args, **kwargs)


def _broadcast_weight(layer: str, name: str, weight: Tensor | None, input: Tensor) -> None:
    """A weight that broadcasts to the input's shape (PyTorch computes ℓ ⊙ w in an output of the input's shape),
    on its device, not differentiated."""
    if weight is None:
        return
    _checks.tensor(layer, name, weight)
    try:
        fits = torch.broadcast_shapes(weight.shape, input.shape) == input.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise _checks.InputError(
            f"{layer}: {name} has shape {_checks.shape(weight)}, which does not broadcast to the input's shape "
            f"{_checks.shape(input)}"
        )
    _checks.same_device(layer, "input", input, name, weight)
    _checks.not_differentiated(layer, name, weight)


# ---- softmax cross-entropy ------------------------------------------------------------------------


class _CrossEntropyTerms:
    r"""For one call: the logits ``z`` in the precision of the formulas (float32 for half inputs, promoted with
    a probability target), the counted rows ``valid`` (None: all, for probabilities), the ``mean`` divisor, and
    the pieces of q.

    Class indices: :math:`q_n = a_n \mathrm{onehot}(t_n) + b w`, :math:`s_n = a_n + b \sum_c w_c`, with
    :math:`a_n = (1 - \varepsilon) w_{t_n}` and :math:`b = \varepsilon / C` (numbers without class weights).
    Probabilities: q itself.
    """

    def __init__(self, input, target, weight, ignore_index, label_smoothing):
        z = opmath(input)
        if target.is_floating_point():
            z = cast(z, torch.promote_types(z.dtype, target.dtype))
        dim = class_dim(z)
        classes = z.shape[dim]
        eps = label_smoothing
        self.z, self.dim, self.eps, self.valid = z, dim, eps, None
        self.w = None if weight is None else _along(cast(weight, z.dtype), dim, z.dim())
        if target.is_floating_point():
            T = cast(target, z.dtype)
            q = (1 - eps) * T + eps / classes if eps else T
            self.q = q if self.w is None else q * self.w
            self.s = self.q.sum(dim, keepdim=True)
            self.divisor = z.numel() // classes if classes else 0
            return
        self.q = None
        self.valid = target != ignore_index  # the rows that count: their ∂R/∂ℓ_n is the only per-row difference
        index = target.masked_fill(~self.valid, 0)  # an ignored row's index may be anything, e.g. -100
        self.index = index.unsqueeze(dim)
        if weight is None:
            w_t = 1.0
            self.divisor = self.valid.sum()  # the number of counted rows
        else:
            w_t = cast(weight, z.dtype)[index]
            self.divisor = (w_t * self.valid).sum()  # Σ_n w_{t_n} over the counted rows
        # (an ignored row's q and s are those of class 0: its ∂R/∂ℓ_n is 0, so they never count)
        self.a = (1 - eps) * w_t
        self.b = eps / classes
        w_sum = classes if weight is None else cast(weight, z.dtype).sum()
        self.s = self.a + self.b * w_sum

    def rows(self, v):
        """A number, or a tensor of the rows' shape made to broadcast along the class dimension."""
        return v.unsqueeze(self.dim) if isinstance(v, Tensor) and v.dim() else v

    def grad(self, P: Tensor, scale, in_place: bool) -> Tensor:
        """(s ⊙ P − q) ⊙ scale, ``scale`` = ∂R/∂ℓ_n per row (or a number); ``P`` may be overwritten if ``in_place``."""
        if self.q is not None:
            return (self.s * P - self.q) * self.rows(scale)
        g = P if _is_one(self.s) else _times(P, self.rows(self.s), in_place)  # s ⊙ P
        g = _minus_onehot(g, self.index, self.rows(self.a), self.dim, in_place)  # − a onehot(t)
        if self.eps:  # − b w
            g = g - (self.b if self.w is None else self.b * self.w)
        return g if _is_one(scale) else _times(g, self.rows(scale), in_place)  # ⊙ scale


def _is_one(v) -> bool:
    """``v`` is the number 1 (a factor to skip)."""
    return isinstance(v, float) and v == 1.0


class CrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, weight, ignore_index, reduction, label_smoothing)``: softmax cross-entropy.

    Forward: PyTorch's own ``cross_entropy``. Backward: :math:`G_Z = (s \odot P - q) \odot \partial R/\partial\ell`
    (module docstring), with :math:`P` recomputed from the saved logits (as many
    bytes as PyTorch's saved log-softmax), stable for logits of any magnitude;
    for class indices the one-hot matrix is never built.

    Shape:
        - input: ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``
        - target: class indices ``()``, ``(N)``, ``(N, d1, ...)``; or probabilities of the input's shape
        - weight: ``(C)`` or ``None``
        - output: scalar, or the rows' shape for ``reduction="none"``
    """

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing):
        return torch.nn.functional.cross_entropy(
            input,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
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
        scale = _row_scale(opmath(grad_output), reduction, terms.divisor, terms.valid)  # ∂R/∂ℓ_n
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:  # G_Z = (s ⊙ P − q) ⊙ ∂R/∂ℓ
            in_place = _in_place(grad_output)
            grad_input = cast(terms.grad(_softmax(terms.z, terms.dim), scale, in_place), input.dtype)
        if ctx.needs_input_grad[1]:  # probabilities: G_T = −(1 − ε) w ⊙ log P ⊙ ∂R/∂ℓ
            logp = _log_softmax(terms.z, terms.dim)
            if terms.w is not None:
                logp = logp * terms.w
            grad_target = cast(-(1 - label_smoothing) * logp * terms.rows(scale), target.dtype)
        return grad_input, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.options
        terms = _CrossEntropyTerms(input, target, weight, ignore_index, label_smoothing)
        dim = terms.dim
        rows = 0
        if input_tangent is not None:  # ℓ̇_n = Σ_c (s_n P_nc − q_nc) Ż_nc
            dl_dz = terms.grad(torch.softmax(terms.z, dim), 1.0, in_place=False)
            rows = (dl_dz * cast(input_tangent, terms.z.dtype)).sum(dim)
        if target_tangent is not None:  # ℓ̇_n = −(1 − ε) Σ_c w_c log P_nc Ṫ_nc
            logp = torch.log_softmax(terms.z, dim)
            if terms.w is not None:
                logp = logp * terms.w
            rows = rows - (1 - label_smoothing) * (logp * cast(target_tangent, terms.z.dtype)).sum(dim)
        if terms.valid is not None:  # ignored rows count nowhere
            rows = torch.where(terms.valid, rows, 0)
        return cast(_reduce(rows, reduction, terms.divisor), ctx.dtype)


@operation(torch.nn.CrossEntropyLoss, CrossEntropyFunction, kind="loss")
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
    target = _indices(target)
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
        """(counted rows, safe indices, w_{t_n} (a number without class weights), the mean divisor)."""
        target, weight = ctx.saved_tensors
        ignore_index, _ = ctx.options
        valid = target != ignore_index
        index = target.masked_fill(~valid, 0)  # an ignored row's index may be anything, e.g. -100
        if weight is None:
            return valid, index, 1.0, valid.sum()
        w_t = cast(weight, dtype)[index]
        return valid, index, w_t, (w_t * valid).sum()

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.input_like
        g = opmath(grad_output)
        valid, index, w_t, divisor = NLLLossFunction._terms(ctx, g.dtype)
        _, reduction = ctx.options
        dim = 0 if len(shape) == 1 else 1
        coefficient = w_t * _row_scale(g, reduction, divisor, valid)  # w_{t_n} ∂R/∂ℓ_n
        if coefficient.dim():
            coefficient = coefficient.unsqueeze(dim)
        zeros = torch.zeros(shape, dtype=g.dtype, device=device)
        in_place = _in_place(grad_output)
        grad_input = _minus_onehot(zeros, index.unsqueeze(dim), coefficient, dim, in_place)  # −w_t ∂R/∂ℓ_n at t_n
        return cast(grad_input, dtype), None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        shape, dtype, _ = ctx.input_like
        valid, index, w_t, divisor = NLLLossFunction._terms(ctx, dtype)
        _, reduction = ctx.options
        dim = 0 if len(shape) == 1 else 1
        rows = -w_t * input_tangent.gather(dim, index.unsqueeze(dim)).squeeze(dim)  # ℓ̇_n = −w_{t_n} Ẋ[n, t_n]
        rows = torch.where(valid, rows, 0)  # ignored rows count nowhere
        return _reduce(rows, reduction, divisor)


@operation(torch.nn.NLLLoss, NLLLossFunction, kind="loss")
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
    reduction = _checks.legacy_reduction("nll_loss", size_average, reduce, reduction)
    _checks.nll_loss(input, target, weight, ignore_index, reduction)
    target = _indices(target)
    return apply(NLLLossFunction, input, target, weight, ignore_index, reduction)


# ---- losses of a difference: mse, l1, smooth l1, huber --------------------------------------------


class PointwiseLoss(ManualFunction):
    r"""Base of the losses of the difference :math:`D = \hat Y - T`: :math:`\ell = w \odot \rho(D)` elementwise
    (:math:`w = 1` without a weight), reduced.

    .. math::

        G_{\hat Y} = w \odot \rho'(D) \odot \frac{\partial R}{\partial \ell} \qquad
        G_T = -G_{\hat Y} \qquad
        \dot\ell = w \odot \rho'(D) \odot (\dot{\hat Y} - \dot T)

    each gradient summed back to its own shape where input and target
    broadcast. ``apply(input, target, weight, reduction, parameter)``. A subclass defines

    * ``forward(input, target, weight, reduction, parameter)``: :math:`R`, PyTorch's own kernel;
    * ``derivative(d, parameter, out)``: ``(r, c)`` with :math:`\rho'(d) = c\, r(d)`, ``c`` a number (it joins
      :math:`\partial R/\partial\ell`, one number for ``mean`` and ``sum``); ``r`` may be written into ``out``
      (``d`` itself, or None);
    * ``mean_over_weights``: whether ``mean`` with a weight divides by :math:`\sum w` (default) or by the
      element count.

    The input and the target are kept (as PyTorch keeps them); :math:`D` is recomputed.

    Shape: input ``(*)``, target broadcastable with it, weight the input's shape or ``None``; output scalar,
    or the broadcast shape for ``"none"``.
    """

    mean_over_weights = True

    @staticmethod
    def derivative(d: Tensor, parameter, out: Tensor | None) -> tuple[Tensor, float]:
        raise NotImplementedError

    @classmethod
    def divisor(cls, d: Tensor, weight: Tensor | None):
        """D of ``mean``: the element count, or Σw."""
        return opmath(weight).sum() if weight is not None and cls.mean_over_weights else d.numel()

    def __init_subclass__(cls, **kwargs):
        # Bound to this subclass's ρ′ as closures (as Elementwise does), so that the stand-in ctx objects of
        # vmap and Dynamo need no attribute of ours.
        def setup_context(ctx, inputs, output):
            input, target, weight, ctx.reduction, ctx.parameter = inputs
            ctx.save_for_backward(input, target, weight)
            save_for_forward(ctx, input, target, weight)
            ctx.dtype = output.dtype

        def backward(ctx, grad_output):
            input, target, weight = ctx.saved_tensors
            in_place = _in_place(grad_output)
            d = opmath(input) - opmath(target)  # D = Ŷ − T
            scale = _row_scale(opmath(grad_output), ctx.reduction, cls.divisor(d, weight))  # ∂R/∂ℓ
            r, c = cls.derivative(d, ctx.parameter, d if in_place else None)  # ρ′(D) = c r(D)
            grad = _times(r, scale if c == 1 else c * scale, in_place)
            if weight is not None:
                grad = _times(grad, weight, in_place)  # G_Ŷ = w ⊙ ρ′(D) ⊙ ∂R/∂ℓ
            grad_input = cast(grad.sum_to_size(input.shape), input.dtype) if ctx.needs_input_grad[0] else None
            grad_target = cast(-grad.sum_to_size(target.shape), target.dtype) if ctx.needs_input_grad[1] else None
            return grad_input, grad_target, None, None, None

        def jvp(ctx, input_tangent, target_tangent, *_):
            input, target, weight = ctx.saved_tensors
            d = opmath(input) - opmath(target)
            r, c = cls.derivative(d, ctx.parameter, None)
            if input_tangent is None:
                d_tangent = -opmath(target_tangent)
            elif target_tangent is None:
                d_tangent = opmath(input_tangent)
            else:
                d_tangent = opmath(input_tangent) - opmath(target_tangent)
            terms = c * r * d_tangent if weight is None else c * r * weight * d_tangent  # ℓ̇ = w ⊙ ρ′(D) ⊙ Ḋ
            return cast(_reduce(terms, ctx.reduction, cls.divisor(d, weight)), ctx.dtype)

        cls.setup_context = staticmethod(setup_context)
        cls.backward = staticmethod(backward)
        if "jvp" not in cls.__dict__:  # the compile twin keeps its default jvp
            cls.jvp = staticmethod(jvp)
        super().__init_subclass__(**kwargs)


class MSELossFunction(PointwiseLoss):
    r"""``apply(input, target, weight, reduction, None)``: :math:`\ell = w (\hat Y - T)^2`, :math:`\rho'(d) = 2d`:
    :math:`G_{\hat Y} = 2 w (\hat Y - T) \odot \partial R/\partial\ell`, :math:`G_T = -G_{\hat Y}`.
    ``mean`` divides by the element count, or by :math:`\sum w`. Shapes as :class:`PointwiseLoss`."""

    @staticmethod
    def forward(input, target, weight, reduction, parameter):
        return _without_size_warning(torch.nn.functional.mse_loss, input, target, reduction=reduction, weight=weight)

    @staticmethod
    def derivative(d, parameter, out):
        return d, 2.0  # ρ′(d) = 2d


@operation(torch.nn.MSELoss, MSELossFunction, kind="loss")
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
    return apply(MSELossFunction, input, target, weight, reduction, None)


class L1LossFunction(PointwiseLoss):
    r"""``apply(input, target, weight, reduction, None)``: :math:`\ell = w |\hat Y - T|`,
    :math:`\rho'(d) = \operatorname{sign} d` (0 at :math:`d = 0`, as PyTorch's :math:`\partial|d|`):
    :math:`G_{\hat Y} = w \operatorname{sign}(\hat Y - T) \odot \partial R/\partial\ell`, :math:`G_T = -G_{\hat Y}`.
    ``mean`` divides by the element count, or by :math:`\sum w`. Shapes as :class:`PointwiseLoss`."""

    @staticmethod
    def forward(input, target, weight, reduction, parameter):
        return _without_size_warning(torch.nn.functional.l1_loss, input, target, reduction=reduction, weight=weight)

    @staticmethod
    def derivative(d, parameter, out):
        return torch.sign(d, out=out), 1.0  # ρ′(d) = sign d


@operation(torch.nn.L1Loss, L1LossFunction, kind="loss")
def l1_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Mean absolute error; see :class:`~manualgrad.functions.L1LossFunction`.

    Backward: :math:`G_{\hat Y} = \operatorname{sign}(\hat Y - T)/M`. A target of
    another shape broadcasts, with torch's warning.
    """
    reduction = _checks.legacy_reduction("l1_loss", size_average, reduce, reduction)
    _checks.pointwise_loss("l1_loss", input, target, reduction, weight)
    return apply(L1LossFunction, input, target, weight, reduction, None)


class SmoothL1LossFunction(PointwiseLoss):
    r"""``apply(input, target, None, reduction, beta)``: :math:`\rho(d) = d^2 / 2\beta` where
    :math:`|d| < \beta`, else :math:`|d| - \beta/2`; :math:`\rho'(d) = \operatorname{clamp}(d, -\beta, \beta)/\beta`
    (:math:`\operatorname{sign} d` for :math:`\beta = 0`, the L1 loss). Shapes as :class:`PointwiseLoss`."""

    @staticmethod
    def forward(input, target, weight, reduction, beta):
        return _without_size_warning(torch.nn.functional.smooth_l1_loss, input, target, reduction=reduction, beta=beta)

    @staticmethod
    def derivative(d, beta, out):
        if beta == 0:
            return torch.sign(d, out=out), 1.0  # ρ′(d) = sign d
        return torch.clamp(d, -beta, beta, out=out), 1 / beta  # ρ′(d) = clamp(d, −β, β)/β


@operation(
    torch.nn.SmoothL1Loss,
    SmoothL1LossFunction,
    kind="loss",
)
def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    r"""Smooth L1 loss; see :class:`~manualgrad.functions.SmoothL1LossFunction`.

    Backward: :math:`G_{\hat Y} = \operatorname{clamp}(\hat Y - T, -\beta, \beta)/(\beta M)`.
    A target of another shape broadcasts, with torch's warning.
    """
    layer = "smooth_l1_loss"
    reduction = _checks.legacy_reduction(layer, size_average, reduce, reduction)
    _checks.pointwise_loss(layer, input, target, reduction)
    if not beta >= 0:
        raise _checks.InputError(f"{layer}: beta must be >= 0, got {beta!r}")
    return apply(SmoothL1LossFunction, input, target, None, reduction, float(beta))


class HuberLossFunction(PointwiseLoss):
    r"""``apply(input, target, weight, reduction, delta)``: :math:`\rho(d) = d^2/2` where :math:`|d| \le \delta`,
    else :math:`\delta(|d| - \delta/2)`; :math:`\rho'(d) = \operatorname{clamp}(d, -\delta, \delta)`.
    ``mean`` divides by the element count, with or without a weight (as PyTorch does). Shapes as
    :class:`PointwiseLoss`."""

    mean_over_weights = False

    @staticmethod
    def forward(input, target, weight, reduction, delta):
        return _without_size_warning(
            torch.nn.functional.huber_loss, input, target, reduction=reduction, delta=delta, weight=weight
        )

    @staticmethod
    def derivative(d, delta, out):
        return torch.clamp(d, -delta, delta, out=out), 1.0  # ρ′(d) = clamp(d, −δ, δ)


@operation(
    torch.nn.HuberLoss,
    HuberLossFunction,
    kind="loss",
)
def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Huber loss; see :class:`~manualgrad.functions.HuberLossFunction`.

    Backward: :math:`G_{\hat Y} = \operatorname{clamp}(\hat Y - T, -\delta, \delta)/M`.
    A target of another shape broadcasts, with torch's warning.
    """
    layer = "huber_loss"
    _checks.pointwise_loss(layer, input, target, reduction, weight)
    if not delta > 0:
        raise _checks.InputError(f"{layer}: delta must be > 0, got {delta!r}")
    return apply(HuberLossFunction, input, target, weight, reduction, float(delta))


# ---- binary cross-entropy -------------------------------------------------------------------------

#: PyTorch's floor on (1 − x)x in the derivative: 1e-12 as a float32 constant, as in its kernel
_BCE_EPSILON = torch.tensor(1e-12, dtype=torch.float32).item()


class BinaryCrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, weight, reduction)``: :math:`\ell = -w\,(t \log x + (1 - t)\log(1 - x))`,
    each log clamped at -100 (PyTorch's forward).

    Backward: :math:`G_X = w \odot (x - t) / \max((1 - x)x, 10^{-12}) \odot \partial R/\partial\ell`
    (PyTorch's floor: at :math:`x = 0` or 1 the gradient is :math:`\pm 10^{12}` times :math:`x - t`, and 0
    where :math:`t = x`), :math:`G_T = -w \odot \operatorname{logit}(x) \odot \partial R/\partial\ell`
    (:math:`\pm\infty` at :math:`x = 0` or 1, as PyTorch's). Forward mode: :math:`\dot\ell` is the same
    two factors times :math:`\dot x` and :math:`\dot t`. The weight is not differentiated.

    Shape: input ``(*)`` probabilities, target ``(*)``, weight broadcastable to ``(*)`` or ``None``;
    output scalar, or ``(*)`` for ``"none"``.
    """

    @staticmethod
    def forward(input, target, weight, reduction):
        return torch.nn.functional.binary_cross_entropy(input, target, weight, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ctx.reduction = inputs
        ctx.save_for_backward(input, target, weight)
        save_for_forward(ctx, input, target, weight)
        ctx.dtype = output.dtype

    @staticmethod
    def _scale(ctx, x, grad, weight):
        """w ⊙ ∂R/∂ℓ."""
        scale = _row_scale(grad, ctx.reduction, x.numel())
        return scale if weight is None else scale * opmath(weight)

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight = ctx.saved_tensors
        x, t = opmath(input), opmath(target)
        scale = BinaryCrossEntropyFunction._scale(ctx, x, opmath(grad_output), weight)  # w ⊙ ∂R/∂ℓ
        in_place = _in_place(grad_output)
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:  # G_X = w ⊙ (x − t) / max((1 − x)x, ε) ⊙ ∂R/∂ℓ
            ratio = _bce_ratio(x, t, in_place)
            grad_input = cast(_times(ratio, scale, in_place), input.dtype)
        if ctx.needs_input_grad[1]:  # G_T = −w ⊙ logit(x) ⊙ ∂R/∂ℓ
            grad_target = cast(_times(_logit(x), -scale, in_place), target.dtype)
        return grad_input, grad_target, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight = ctx.saved_tensors
        x, t = opmath(input), opmath(target)
        terms = 0
        if input_tangent is not None:  # ℓ̇ = w ⊙ ((x − t)/max((1 − x)x, ε) ⊙ ẋ − logit(x) ⊙ ṫ)
            terms = _bce_ratio(x, t, False) * opmath(input_tangent)
        if target_tangent is not None:
            terms = terms - torch.logit(x) * opmath(target_tangent)
        if weight is not None:
            terms = terms * opmath(weight)
        return cast(_reduce(terms, ctx.reduction, x.numel()), ctx.dtype)


def _bce_ratio(x: Tensor, t: Tensor, in_place: bool) -> Tensor:
    """(x − t) / max((1 − x)x, ε), PyTorch's ∂ℓ/∂x of binary cross-entropy (ε = 1e-12 in float32); with
    ``in_place``, each step written into the tensor the previous one made."""
    if not in_place:
        return (x - t) / torch.clamp((1 - x) * x, min=_BCE_EPSILON)
    return (x - t).div_((1 - x).mul_(x).clamp_(min=_BCE_EPSILON))


def _probabilities(layer: str, input: Tensor) -> None:
    """Every element of ``input`` in [0, 1], as PyTorch's CPU kernel requires (a NaN is outside): on the CPU from
    two numbers; on CUDA a device-side assert (no host sync); not read under ``torch.compile`` or ``torch.func``."""
    if not input.numel() or _compat.traced(input):
        return
    if input.device.type != "cpu":
        _compat.assert_async(((input >= 0) & (input <= 1)).all(), f"{layer}: input values must be in [0, 1]")
        return
    low, high = (v.item() for v in torch.aminmax(input.detach()))
    if not (0 <= low and high <= 1):
        raise _checks.InputError(
            f"{layer}: input must hold probabilities in [0, 1], got values from {low} to {high}"
            " (for logits use binary_cross_entropy_with_logits)"
        )


@operation(torch.nn.BCELoss, BinaryCrossEntropyFunction, kind="loss")
def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Binary cross-entropy of probabilities ``input`` against ``target``; see
    :class:`~manualgrad.functions.BinaryCrossEntropyFunction`.

    Backward: :math:`G_X = (x - t) / (\max((1 - x)x, 10^{-12})\, M)`. ``weight``
    broadcasts to the input (e.g. one per class). Input values outside [0, 1]
    raise, as in PyTorch.
    """
    layer = "binary_cross_entropy"
    reduction = _checks.legacy_reduction(layer, size_average, reduce, reduction)
    _binary_checks(layer, input, target, reduction, weight)
    _checks.same_dtype(layer, "input", input, "target", target)  # torch's kernel takes no mixture
    _probabilities(layer, input)
    return apply(BinaryCrossEntropyFunction, input, target, weight, reduction)


def _binary_checks(layer: str, input, target, reduction: str, weight, pos_weight=None) -> None:
    _checks.tensor(layer, "input", input)
    _checks.tensor(layer, "target", target)
    _checks.reduction(layer, reduction)
    _checks.real_floating(layer, "input", input)
    _checks.real_floating(layer, "target", target)
    _checks.same_device(layer, "input", input, "target", target)
    if target.shape != input.shape:
        raise _checks.InputError(
            f"{layer}: target has shape {_checks.shape(target)}, input has shape {_checks.shape(input)} "
            "(they must match)"
        )
    _broadcast_weight(layer, "weight", weight, input)
    _broadcast_weight(layer, "pos_weight", pos_weight, input)


class BinaryCrossEntropyWithLogitsFunction(ManualFunction):
    r"""``apply(input, target, weight, pos_weight, reduction)``: binary cross-entropy of :math:`\sigma(z)`,
    :math:`\ell = w\,((1 - t) z + (1 + (p - 1) t) \log(1 + e^{-z}))` (PyTorch's stable forward).

    Backward: :math:`G_Z = w \odot (\sigma(z)(1 + (p - 1)t) - p t) \odot \partial R/\partial\ell`
    (:math:`\sigma(z) - t` without ``pos_weight``),
    :math:`G_T = w \odot (p \log(1 + e^{-z}) - \log(1 + e^{z})) \odot \partial R/\partial\ell`
    (:math:`-z` without). Forward mode: the same factors times :math:`\dot z` and :math:`\dot t`.
    Weights are not differentiated.

    Shape: input ``(*)`` logits, target ``(*)``, weight and pos_weight broadcastable to ``(*)`` (pos_weight
    one per class, along the last dimension) or ``None``; output scalar, or ``(*)`` for ``"none"``.
    """

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            input, target, weight, reduction=reduction, pos_weight=pos_weight
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, ctx.reduction = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        save_for_forward(ctx, input, target, weight, pos_weight)
        ctx.dtype = output.dtype

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight, pos_weight = ctx.saved_tensors
        z, t = opmath(input), opmath(target)
        scale = _row_scale(opmath(grad_output), ctx.reduction, z.numel())
        if weight is not None:
            scale = scale * opmath(weight)  # w ⊙ ∂R/∂ℓ
        in_place = _in_place(grad_output)
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:  # G_Z = w ⊙ (σ(z)(1 + (p − 1)t) − p t) ⊙ ∂R/∂ℓ
            grad_input = cast(_times(_bce_logits_dz(z, t, pos_weight, in_place), scale, in_place), input.dtype)
        if ctx.needs_input_grad[1]:  # G_T = w ⊙ (p log(1 + e^−z) − log(1 + e^z)) ⊙ ∂R/∂ℓ, or −z ⊙ w ⊙ ∂R/∂ℓ
            if pos_weight is None:
                grad_target = z * -scale
            else:
                grad_target = _times(_bce_logits_dt(z, pos_weight), scale, in_place)
            grad_target = cast(grad_target, target.dtype)
        return grad_input, grad_target, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight, pos_weight = ctx.saved_tensors
        z, t = opmath(input), opmath(target)
        terms = 0
        if input_tangent is not None:  # ℓ̇ = w ⊙ (∂ℓ/∂z ż + ∂ℓ/∂t ṫ)
            terms = _bce_logits_dz(z, t, pos_weight, False) * opmath(input_tangent)
        if target_tangent is not None:
            dt = -z if pos_weight is None else _bce_logits_dt(z, pos_weight)
            terms = terms + dt * opmath(target_tangent)
        if weight is not None:
            terms = terms * opmath(weight)
        return cast(_reduce(terms, ctx.reduction, z.numel()), ctx.dtype)


def _bce_logits_dz(z: Tensor, t: Tensor, pos_weight: Tensor | None, in_place: bool) -> Tensor:
    """∂ℓ/∂z / w = σ(z)(1 + (p − 1)t) − p t; σ(z) − t without pos_weight."""
    s = _sigmoid(z)
    if pos_weight is None:
        return s.sub_(t) if in_place else s - t
    pt = opmath(pos_weight) * t
    return s * (1 + pt - t) - pt


def _bce_logits_dt(z: Tensor, pos_weight: Tensor) -> Tensor:
    """∂ℓ/∂t / w = p log(1 + e^{−z}) − log(1 + e^{z}) = log σ(−z) − p log σ(z)."""
    return _log_sigmoid(-z) - opmath(pos_weight) * _log_sigmoid(z)


@operation(torch.nn.BCEWithLogitsLoss, BinaryCrossEntropyWithLogitsFunction, kind="loss")
def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Binary cross-entropy of logits ``input`` (a sigmoid, then the loss, in one stable formula); see
    :class:`~manualgrad.functions.BinaryCrossEntropyWithLogitsFunction`.

    Backward: :math:`G_Z = (\sigma(z) - t)/M` without weights. ``weight`` and
    ``pos_weight`` broadcast to the input (``pos_weight``: one per class, along
    the last dimension).
    """
    layer = "binary_cross_entropy_with_logits"
    reduction = _checks.legacy_reduction(layer, size_average, reduce, reduction)
    _binary_checks(layer, input, target, reduction, weight, pos_weight)
    return apply(BinaryCrossEntropyWithLogitsFunction, input, target, weight, pos_weight, reduction)
