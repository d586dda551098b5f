r"""NLL, and the softmax cross-entropy of :math:`P = \operatorname{softmax}(Z)` over the classes against a target
distribution :math:`q_n` per row (class weights, label smoothing and ``ignore_index`` shape it), :math:`s_n = \sum_c
q_{n,c}`: :math:`\ell_n = -\sum_c q_{n,c} \log P_{n,c}`, :math:`G_Z = (s \odot P - q) \odot \partial R/\partial \ell`
(unweighted, unsmoothed: :math:`(P - \mathrm{onehot}(t))/N`), for probabilities :math:`G_T = -(1 - \varepsilon)\, w
\odot \log P \odot \partial R/\partial \ell`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import ManualFunction, apply, cast, exp, opmath, recorded, save
from ..softmax import SoftmaxFunction
from . import base
from .base import ClassTarget, _minus_onehot, _reduce, _row_scale, _times, class_dim, loss

# P = exp(log P) in a backward; softmax(log P), our Function, when a double backward records it: the same values and,
# on log P, the same derivatives (they differ by P Σ_c g_c, which log P's own backward G − P Σ_c G takes away)
_probabilities = recorded(lambda logp, dim: exp(logp), lambda logp, dim: apply(SoftmaxFunction, logp, dim, None))


class NLLLossFunction(ManualFunction):
    r"""``apply(input, target, weight, ignore_index, reduction)``: :math:`\ell_n = -w_{t_n} X_{n, t_n}`, reduced;
    :math:`G_X[n, t_n] = -w_{t_n}\, \partial R/\partial\ell_n`, zero elsewhere; :math:`\dot\ell_n = -w_{t_n}
    \dot X_{n, t_n}`. Forward: PyTorch's ``nll_loss``. Shapes as :class:`CrossEntropyFunction` with class indices."""

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction):
        ignore_index = -100 if ignore_index is None else ignore_index  # None: the checks found every index a class
        return F.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ctx.ignore_index, ctx.reduction = inputs
        save(ctx, target, weight)
        ctx.input_shape, ctx.dim, ctx.dtype, ctx.device = input.shape, class_dim(input), input.dtype, input.device

    @staticmethod
    def backward(ctx, grad_output):
        g, dim = opmath(grad_output), ctx.dim
        rows = ClassTarget(*ctx.saved_tensors, ctx.ignore_index, g.dtype, dim)
        coefficient = _times(_row_scale(g, ctx.reduction, rows.divisor, rows.valid), rows.w_t, False)  # w_t ∂R/∂ℓ_n
        coefficient = coefficient.unsqueeze(dim) if coefficient.dim() else coefficient
        zeros = torch.zeros(ctx.input_shape, dtype=g.dtype, device=ctx.device)
        grad_input = _minus_onehot(zeros, rows.index, coefficient, dim, base._in_place(grad_output))  # −w_t g_n at t_n
        return cast(grad_input, ctx.dtype), None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        rows = ClassTarget(*ctx.saved_tensors, ctx.ignore_index, ctx.dtype, ctx.dim)
        terms = -rows.w_t * input_tangent.gather(ctx.dim, rows.index).squeeze(ctx.dim)  # ℓ̇_n = −w_{t_n} Ẋ[n, t_n]
        return _reduce(terms, ctx.reduction, rows.divisor, rows.valid)


class _CrossEntropyTerms:
    r"""One call's :math:`\log P` ``logp`` (float32 for half inputs; promoted by a probability target), ``valid`` and
    ``divisor`` (:class:`ClassTarget`'s), ``reduction``; q for class indices: :math:`q_n = a_n \mathrm{onehot}(t_n)
    + b w`, :math:`s_n = a_n + b \sum_c w_c`, :math:`a_n = (1 - \varepsilon) w_{t_n}`, :math:`b = \varepsilon/C`."""

    def __init__(self, logp, target, weight, ignore_index, reduction, eps):
        logp = opmath(logp)
        if target.is_floating_point():
            logp = cast(logp, torch.promote_types(logp.dtype, target.dtype))
        dim = class_dim(logp)
        classes = logp.shape[dim]
        self.logp, self.dim, self.eps, self.valid, self.reduction, self.q = logp, dim, eps, None, reduction, None
        self.w = None if weight is None else cast(weight, logp.dtype).reshape((-1,) + (1,) * (logp.dim() - dim - 1))
        if target.is_floating_point():
            T = cast(target, logp.dtype)
            q = (1 - eps) * T + eps / classes if eps else T
            self.q = q if self.w is None else q * self.w
            self.s = self.q.sum(dim, keepdim=True)
            self.divisor = logp.numel() // classes if classes else 0
            return
        rows = ClassTarget(target, weight, ignore_index, logp.dtype, dim)
        self.valid, self.index, self.divisor = rows.valid, rows.index, rows.divisor
        self.a, self.b = (1 - eps) * rows.w_t, eps / classes  # an ignored row's: class 0's, never counted (∂R/∂ℓ_n = 0)
        self.s = self.a + self.b * (classes if weight is None else cast(weight, logp.dtype).sum())

    def rows(self, v):
        """A number, or a tensor of the rows' shape made to broadcast along the class dimension."""
        return v.unsqueeze(self.dim) if isinstance(v, Tensor) and v.dim() else v

    def grad(self, P: Tensor, scale, in_place: bool) -> Tensor:
        """(s ⊙ P − q) ⊙ scale, ``scale`` = ∂R/∂ℓ_n per row (or a number); ``P`` may be overwritten if ``in_place``."""
        if self.q is not None:
            return (self.s * P - self.q) * self.rows(scale)
        g = _times(P, self.rows(self.s), in_place)  # s ⊙ P
        g = _minus_onehot(g, self.index, self.rows(self.a), self.dim, in_place)  # − a onehot(t)
        if self.eps:  # − b w
            g = g - (self.b if self.w is None else self.b * self.w)
        return _times(g, self.rows(scale), in_place)  # ⊙ scale

    def d_target(self) -> Tensor:
        """∂ℓ_n/∂T = −(1 − ε) w ⊙ log P (probability targets)."""
        return -(1 - self.eps) * (self.logp if self.w is None else self.logp * self.w)


class CrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, weight, ignore_index, reduction, label_smoothing)`` → ``(loss, log P)``: the softmax
    cross-entropy (module docstring) as PyTorch's ``cross_entropy`` computes it, and :math:`\log P`, which it keeps
    (as PyTorch does: the logits' bytes) for :math:`P = e^{\log P}` in one pass. Shape: input ``(C)``, ``(N, C)`` or
    ``(N, C, d1, ...)``, as log P; target class indices ``()``, ``(N)``, ``(N, d1, ...)`` or probabilities of the
    input's shape; weight ``(C)`` or None; loss scalar, or the rows' shape (``"none"``)."""

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing):
        dim, eps = class_dim(input), label_smoothing
        logp = torch.log_softmax(input, dim)
        w = None if weight is None else weight.reshape((-1,) + (1,) * (input.dim() - dim - 1))
        if target.is_floating_point():  # ℓ_n = −Σ_c w_c q_nc log P_nc, q = (1 − ε) T + ε/C
            q = target * (1 - eps) + eps / input.shape[dim] if eps else target
            rows = -(logp * q if w is None else logp * q * w).sum(dim)
            return _reduce(rows, reduction, rows.numel()), logp
        loss = NLLLossFunction.forward(logp, target, weight, ignore_index, reduction)  # −w_t log P_t
        if eps:  # (1 − ε) of it and ε/C of ℓ_n = −Σ_c w_c log P_nc (0 on ignored rows), reduced alike
            counted = ClassTarget(target, weight, ignore_index, logp.dtype, dim)
            smooth = _reduce(-(logp if w is None else logp * w).sum(dim), reduction, counted.divisor, counted.valid)
            loss = (1 - eps) * loss + smooth * (eps / input.shape[dim])
        return loss, logp

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, target, weight, *options), (loss, logp) = inputs, output
        save(ctx, logp, target, weight)
        ctx.options, ctx.dtype, ctx.input_dtype, ctx.target_dtype = options, loss.dtype, input.dtype, target.dtype
        ctx.set_materialize_grads(False)  # log P's gradient: None unless a double backward gives one

    @staticmethod
    def backward(ctx, grad_output, grad_logp):
        terms = _CrossEntropyTerms(*ctx.saved_tensors, *ctx.options)
        grad_input = grad_target = None
        if grad_output is not None:
            scale = _row_scale(opmath(grad_output), terms.reduction, terms.divisor, terms.valid)  # ∂R/∂ℓ_n
            if ctx.needs_input_grad[0]:  # G_Z = (s ⊙ P − q) ⊙ ∂R/∂ℓ
                grad_input = terms.grad(_probabilities(terms.logp, terms.dim), scale, base._in_place(grad_output))
            if ctx.needs_input_grad[1]:  # probabilities: G_T = −(1 − ε) w ⊙ log P ⊙ ∂R/∂ℓ
                grad_target = cast(terms.d_target() * terms.rows(scale), ctx.target_dtype)
        if grad_logp is not None and ctx.needs_input_grad[0]:  # log P's own: G_Z += G − P Σ_c G
            g = cast(grad_logp, terms.logp.dtype)
            own = g - _probabilities(terms.logp, terms.dim) * g.sum(terms.dim, keepdim=True)
            grad_input = own if grad_input is None else grad_input + own
        grad_input = None if grad_input is None else cast(grad_input, ctx.input_dtype)
        return grad_input, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        terms = _CrossEntropyTerms(*ctx.saved_tensors, *ctx.options)
        logp, dim, rows = terms.logp, terms.dim, 0
        if input_tangent is None:  # only the target has a tangent: log P has none
            logp_tangent = torch.zeros_like(ctx.saved_tensors[0])
        else:  # ℓ̇_n = Σ_c (s_n P_nc − q_nc) Ż_nc; (log P)˙ = Ż − Σ_c P Ż
            P, z_tangent = logp.exp(), cast(input_tangent, logp.dtype)
            rows = (terms.grad(P, 1.0, in_place=False) * z_tangent).sum(dim)
            logp_tangent = cast(z_tangent - (P * z_tangent).sum(dim, keepdim=True), ctx.input_dtype)
        if target_tangent is not None:  # ℓ̇_n = −(1 − ε) Σ_c w_c log P_nc Ṫ_nc
            rows = rows + (terms.d_target() * cast(target_tangent, logp.dtype)).sum(dim)
        return cast(_reduce(rows, terms.reduction, terms.divisor, terms.valid), ctx.dtype), logp_tangent


# the wrappers, with torch's signatures (losses.base.loss)
cross_entropy = loss(CrossEntropyFunction, torch.nn.CrossEntropyLoss, "cross_entropy")
nll_loss = loss(NLLLossFunction, torch.nn.NLLLoss, "nll_loss")
