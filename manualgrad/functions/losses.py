r"""Losses: the scalar :math:`R` at the top of the network, and the first gradient of every step.

Softmax cross-entropy
---------------------

With :math:`P = \operatorname{softmax}(Z)` over the class dimension and a
per-row target distribution :math:`q_n` (defined below), the loss of row
:math:`n` is :math:`\ell_n = -\sum_c q_{n,c} \log P_{n,c}`. Its gradient, with
:math:`s_n = \sum_c q_{n,c}`, is

.. math::

    \frac{\partial \ell_n}{\partial Z_{n,c}} = s_n P_{n,c} - q_{n,c}
    \qquad\text{so}\qquad G_Z = (s \odot P - q)\,\frac{g}{D}

where :math:`g` is the incoming gradient and :math:`D` the ``mean`` divisor.
For class indices :math:`t_n`, class weights :math:`w` (ones by default) and
label smoothing :math:`\varepsilon` over :math:`C` classes, as PyTorch defines them,

.. math::

    q_n = (1 - \varepsilon)\, w_{t_n}\, \mathrm{onehot}(t_n) + \tfrac{\varepsilon}{C}\, w,
    \qquad D = \textstyle\sum_n w_{t_n}

and rows whose target is ``ignore_index`` have :math:`q_n = 0` and count
nowhere. Unweighted and unsmoothed this is the notes' :math:`G_Z = (P - \mathrm{onehot}(t))/N`.
For class probabilities :math:`T`, :math:`q = w \odot ((1 - \varepsilon) T + \varepsilon / C)`
and :math:`D` is the number of rows; the target gets
:math:`G_T = -(1 - \varepsilon)\, w \odot \log P \cdot g / D`.

Forward mode contracts the same matrix with the tangent:
:math:`\dot\ell_n = \sum_c (s_n P_{n,c} - q_{n,c})\,\dot Z_{n,c}`.

Mean squared error
------------------

:math:`R = \frac1M \sum (\hat Y - T)^2`, :math:`G_{\hat Y} = 2(\hat Y - T)\, g / M`, :math:`G_T = -G_{\hat Y}`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ManualFunction, cast, save_for_forward

__all__ = ["CrossEntropyFunction", "MSELossFunction"]


def _autocast_float32(t: Tensor | None) -> Tensor | None:
    """torch runs its losses in float32 under autocast; so do we (the inputs stay as they are)."""
    if t is not None and t.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(t.device.type):
        return t.float()
    return t


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _softmax(z: Tensor, dim: int) -> Tensor:
    """softmax inside a backward: exp(z - logsumexp z) when a double backward records the graph,
    so that its derivative is autograd's exp/sum arithmetic rather than a softmax-backward kernel."""
    if torch.is_grad_enabled():
        return torch.exp(z - torch.logsumexp(z, dim, keepdim=True))
    return torch.softmax(z, dim)


def _log_softmax(z: Tensor, dim: int) -> Tensor:
    if torch.is_grad_enabled():
        return z - torch.logsumexp(z, dim, keepdim=True)
    return torch.log_softmax(z, dim)


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """A length-C vector shaped to broadcast along the class dimension of an ndim-D input."""
    return v.reshape((-1,) + (1,) * (ndim - dim - 1))


class _Targets:
    """The pieces of q_n (see the module docstring) for one call.

    Class indices: ``a`` (coefficient of onehot(t)), ``b`` (coefficient of w),
    ``s`` = rowsum(q), each a tensor of the target's shape or a number.
    Probabilities: ``q`` and ``s``. ``divisor`` is D of the ``mean`` reduction.
    ``ignore_index=None`` means the caller has checked that no row is ignored,
    which with no class weights makes every row's q the same simple form.
    """

    def __init__(self, input, target, weight, ignore_index, label_smoothing):
        dim = _class_dim(input)
        classes = input.shape[dim]
        eps = label_smoothing
        self.dim, self.eps, self.classes, self.target = dim, eps, classes, target
        self.w = None if weight is None else _along(weight.to(input.dtype), dim, input.dim())
        self.index = None
        if target.is_floating_point():  # class probabilities, the input's shape
            q = target if eps == 0 else target * (1 - eps) + eps / classes
            self.q = q if self.w is None else q * self.w
            self.s = self.q.sum(dim)
            self.divisor = input.numel() // classes if classes else 0
            return
        self.index = target.unsqueeze(dim)
        if weight is None and ignore_index is None:  # q_n = (1 - ε) onehot(t_n) + ε/C
            self.a, self.b, self.s = 1 - eps, eps / classes, 1.0
            self.divisor = target.numel()
            return
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        w_t = valid.to(input.dtype) if weight is None else weight.to(input.dtype)[target.masked_fill(~valid, 0)] * valid
        self.index = target.masked_fill(~valid, 0).unsqueeze(dim)
        self.a = w_t * (1 - eps) if eps else w_t
        self.b = valid.to(input.dtype) * (eps / classes)
        w_sum = classes if weight is None else weight.to(input.dtype).sum()
        self.s = self.a + self.b * w_sum if eps else self.a
        self.divisor = w_t.sum()

    def row_losses(self, logp: Tensor) -> Tensor:
        """ℓ_n = -Σ_c q_nc log P_nc."""
        dim = self.dim
        if self.index is None:
            return -(self.q * logp).sum(dim)
        loss = -logp.gather(dim, self.index).squeeze(dim) * self.a
        if self.eps:
            smooth = logp if self.w is None else logp * self.w
            loss = loss - self.b * smooth.sum(dim)
        return loss

    def dloss_dlogits(self, p: Tensor, scale: Tensor) -> Tensor:
        """(s P - q) ⊙ scale, scale per row (broadcast along the class dimension)."""
        dim = self.dim
        scale = scale.unsqueeze(dim)
        if self.index is None:
            return (p * self.s.unsqueeze(dim) - self.q) * scale
        if isinstance(self.a, float):  # no weights, no ignored rows: P - (1 - ε) onehot - ε/C
            grad = p.scatter_add(dim, self.index, p.new_full((), -self.a).expand(self.index.shape))
            return (grad - self.b if self.eps else grad) * scale
        a, b, s = (t.unsqueeze(dim) for t in (self.a, self.b, self.s))
        grad = (p * (s * scale)).scatter_add(dim, self.index, -(a * scale))
        if self.eps:
            grad = grad - (b * scale) * (1.0 if self.w is None else self.w)
        return grad


def _reduce(rows: Tensor, reduction: str, divisor) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / divisor if reduction == "mean" else total


def _row_scale(grad: Tensor, reduction: str, divisor, shape) -> Tensor:
    """∂R/∂ℓ_n for every row: g/D (mean), g (sum), or g_n itself (none); shaped like the rows."""
    if reduction == "none":
        return grad
    scale = grad / divisor if reduction == "mean" else grad
    return scale.reshape((1,) * len(shape)) if len(shape) else scale


class CrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, weight, ignore_index, reduction, label_smoothing)``: softmax cross-entropy.

    Forward: :math:`\ell_n = -\sum_c q_{n,c} \log \operatorname{softmax}(Z)_{n,c}`, reduced.
    Backward: :math:`G_Z = (s \odot P - q)\, g / D` (module docstring), with
    :math:`P` recomputed from the saved logits (as many bytes as PyTorch's saved
    log-softmax). Stable for logits of any magnitude (log-softmax and softmax
    subtract the row maximum).

    Shape:
        - input: ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``
        - target: class indices ``()``, ``(N)``, ``(N, d1, ...)``; or probabilities of the input's shape
        - weight: ``(C)`` or ``None``
        - output: scalar, or the target's (index) shape for ``reduction="none"``
    """

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing):
        input = _autocast_float32(input)
        if target.is_floating_point():
            target = target.to(input.dtype)
        logp = torch.log_softmax(input, _class_dim(input))
        if (
            not target.is_floating_point() and not label_smoothing
        ):  # -Σ w_t log P[t] (/ Σ w_t): torch's nll_loss forward
            ignore = -100 if ignore_index is None else ignore_index
            return torch.nn.functional.nll_loss(logp, target, weight, ignore_index=ignore, reduction=reduction)
        targets = _Targets(input, target, weight, ignore_index, label_smoothing)
        return _reduce(targets.row_losses(logp), reduction, targets.divisor)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing = inputs
        ctx.save_for_backward(input, target, weight)
        save_for_forward(ctx, input, target, weight)
        ctx.options = (ignore_index, reduction, label_smoothing)
        ctx.dtype = output.dtype  # the compute dtype: float32 under autocast

    @staticmethod
    def backward(ctx, grad_output):
        saved_input, saved_target, weight = ctx.saved_tensors
        input, target = (
            cast(saved_input, ctx.dtype),
            cast(saved_target, ctx.dtype) if saved_target.is_floating_point() else saved_target,
        )
        ignore_index, reduction, label_smoothing = ctx.options
        targets = _Targets(input, target, weight, ignore_index, label_smoothing)
        rows = input.shape[: targets.dim] + input.shape[targets.dim + 1 :]
        scale = _row_scale(grad_output, reduction, targets.divisor, rows)
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_input = cast(targets.dloss_dlogits(_softmax(input, targets.dim), scale), saved_input.dtype)
        if ctx.needs_input_grad[1]:  # probability targets only: G_T = -(1 - ε) w ⊙ log P · scale
            logp = _log_softmax(input, targets.dim)
            if targets.w is not None:
                logp = logp * targets.w
            grad_target = cast(logp * (-(1 - label_smoothing) * scale).unsqueeze(targets.dim), saved_target.dtype)
        return grad_input, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight = ctx.saved_tensors
        input = cast(input, ctx.dtype)
        if target.is_floating_point():
            target = cast(target, ctx.dtype)
        ignore_index, reduction, label_smoothing = ctx.options
        targets = _Targets(input, target, weight, ignore_index, label_smoothing)
        rows = input.shape[: targets.dim] + input.shape[targets.dim + 1 :]
        ones = input.new_ones(rows)
        tangent = None
        if input_tangent is not None:  # ℓ̇_n = Σ_c (s_n P_nc - q_nc) Ż_nc
            dl = targets.dloss_dlogits(torch.softmax(input, targets.dim), ones)
            tangent = (dl * cast(input_tangent, ctx.dtype)).sum(targets.dim)
        if target_tangent is not None:  # ℓ̇_n = -(1 - ε) Σ_c w_c log P_nc Ṫ_nc
            logp = torch.log_softmax(input, targets.dim)
            if targets.w is not None:
                logp = logp * targets.w
            term = -(1 - label_smoothing) * (logp * cast(target_tangent, ctx.dtype)).sum(targets.dim)
            tangent = term if tangent is None else tangent + term
        return _reduce(tangent, reduction, targets.divisor)


class MSELossFunction(ManualFunction):
    r"""``apply(input, target, weight, reduction)``: :math:`R = \frac1M\sum(\hat Y - T)^2` (or the sum, or elementwise).

    With elementwise weights :math:`w`: :math:`R = \sum w (\hat Y - T)^2 / \sum w`.
    Backward: :math:`G_{\hat Y} = 2 w (\hat Y - T)\, g / M` (:math:`M` = the element
    count, or :math:`\sum w`), :math:`G_T = -G_{\hat Y}`, each summed back to its
    own shape when input and target broadcast. The weight is not differentiated.
    Forward mode: :math:`\dot R = \frac1M \sum 2 w (\hat Y - T)(\dot{\hat Y} - \dot T)`.

    Shape: input ``(*)``, target broadcastable to it, weight the input's shape or
    ``None``; output scalar, or ``(*)`` for ``"none"``.
    """

    @staticmethod
    def forward(input, target, weight, reduction):
        diff = _autocast_float32(input) - _autocast_float32(target)
        squares = diff * diff if weight is None else diff * diff * weight
        return _reduce(squares, reduction, _mse_divisor(diff, weight))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        save_for_forward(ctx, input, target, weight)
        ctx.reduction = reduction
        ctx.dtype = output.dtype  # the compute dtype: float32 under autocast

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight = ctx.saved_tensors
        diff = cast(input, ctx.dtype) - cast(target, ctx.dtype)
        scale = grad_output / _mse_divisor(diff, weight) if ctx.reduction == "mean" else grad_output
        grad = 2 * diff * scale if weight is None else 2 * diff * weight * scale  # G_Ŷ = 2 w (Ŷ - T) g / M
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
        diff = cast(input, ctx.dtype) - cast(target, ctx.dtype)
        diff_tangent = cast(diff_tangent, ctx.dtype)
        terms = 2 * diff * diff_tangent if weight is None else 2 * diff * weight * diff_tangent
        return _reduce(terms, ctx.reduction, _mse_divisor(diff, weight))


def _mse_divisor(diff: Tensor, weight: Tensor | None):
    return diff.numel() if weight is None else weight.sum()
