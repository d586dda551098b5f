r"""The elementwise losses, each its forward (PyTorch's kernel) and partial derivatives, from which
:class:`~manualgrad.functions.losses.base.ElementwiseLoss` derives backward and jvp (``docs/derivations.md``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import _sigmoid
from ..base import recorded
from .base import ElementwiseLoss, PointwiseLoss, loss


class MSELossFunction(PointwiseLoss):
    r"""Mean squared error: :math:`\rho(d) = d^2`, :math:`\rho'(d) = 2d`."""

    @staticmethod
    def forward(input, target, weight, reduction, parameter):
        return F.mse_loss(input, target, reduction=reduction, weight=weight)

    @staticmethod
    def derivative(d, parameter, out):
        return d, 2.0


class L1LossFunction(PointwiseLoss):
    r"""Mean absolute error: :math:`\rho(d) = |d|`, :math:`\rho'(d) = \operatorname{sign} d` (0 at 0, as torch)."""

    @staticmethod
    def forward(input, target, weight, reduction, parameter):
        return F.l1_loss(input, target, reduction=reduction, weight=weight)

    @staticmethod
    def derivative(d, parameter, out):
        return torch.sign(d, out=out), 1.0


class SmoothL1LossFunction(PointwiseLoss):
    r""":math:`\rho(d) = d^2 / 2\beta` where :math:`|d| < \beta`, else :math:`|d| - \beta/2`; :math:`\rho'(d) =
    \operatorname{clamp}(d, -\beta, \beta)/\beta` (:math:`\operatorname{sign} d` for :math:`\beta = 0`, the L1 loss)."""

    @staticmethod
    def forward(input, target, weight, reduction, beta):
        return F.smooth_l1_loss(input, target, reduction=reduction, beta=beta)

    @staticmethod
    def derivative(d, beta, out):
        if beta == 0:
            return torch.sign(d, out=out), 1.0
        return torch.clamp(d, -beta, beta, out=out), 1 / beta


class HuberLossFunction(PointwiseLoss):
    r""":math:`\rho(d) = d^2/2` where :math:`|d| \le \delta`, else :math:`\delta(|d| - \delta/2)`; :math:`\rho'(d) =
    \operatorname{clamp}(d, -\delta, \delta)`. ``mean`` divides by the element count, weight or not (as PyTorch)."""

    mean_over_weights = False

    @staticmethod
    def forward(input, target, weight, reduction, delta):
        return F.huber_loss(input, target, reduction=reduction, delta=delta, weight=weight)

    @staticmethod
    def derivative(d, delta, out):
        return torch.clamp(d, -delta, delta, out=out), 1.0


_BCE_EPSILON = torch.tensor(1e-12, dtype=torch.float32).item()  # PyTorch's floor on (1 − x)x: 1e-12 in float32


class BinaryCrossEntropyFunction(ElementwiseLoss):
    r""":math:`\ell = -w\,(t \log x + (1 - t)\log(1 - x))` on probabilities :math:`x`, each log clamped at -100
    (PyTorch's forward); :math:`\partial\ell/\partial x = (x - t) / \max((1 - x)x, 10^{-12})` (PyTorch's floor:
    :math:`\pm 10^{12} (x - t)` at 0 or 1), :math:`\partial\ell/\partial t = -\operatorname{logit}(x)`.
    Shape: input, target ``(*)``, weight broadcastable to ``(*)``; output scalar, or ``(*)`` for ``"none"``."""

    @staticmethod
    def forward(input, target, weight, reduction):
        return F.binary_cross_entropy(input, target, weight, reduction=reduction)

    @staticmethod
    def d_input(x, t, in_place):
        if not in_place:
            return (x - t) / torch.clamp((1 - x) * x, min=_BCE_EPSILON), 1.0
        return (x - t).div_((1 - x).mul_(x).clamp_(min=_BCE_EPSILON)), 1.0

    @staticmethod
    def d_target(x, t, in_place):
        return _logit(x), -1.0


class BinaryCrossEntropyWithLogitsFunction(ElementwiseLoss):
    r"""``apply(input, target, weight, pos_weight, reduction)``: binary cross-entropy of :math:`\sigma(z)`,
    :math:`\ell = w\,((1 - t) z + (1 + (p - 1) t) \log(1 + e^{-z}))` (PyTorch's stable forward);
    :math:`\partial\ell/\partial z = \sigma(z)(1 + (p - 1)t) - p t`, :math:`\partial\ell/\partial t = p \log(1 + e^{-z})
    - \log(1 + e^{z})` (:math:`\sigma(z) - t` and :math:`-z` without ``pos_weight``, one per class, last dimension)."""

    tensors = 4

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    @staticmethod
    def d_input(z, t, p, in_place):
        s = _sigmoid(z)
        if p is None:
            return (s.sub_(t) if in_place else s - t), 1.0
        pt = p * t
        return s * (1 + pt - t) - pt, 1.0

    @staticmethod
    def d_target(z, t, p, in_place):
        return (-z if p is None else _log_sigmoid(-z) - p * _log_sigmoid(z)), 1.0  # log σ(−z) − p log σ(z)


# log(x / (1 − x)) and log σ(z) in a backward: PyTorch's kernels, or plain arithmetic when a double backward records
_logit = recorded(torch.logit, lambda x: torch.log(x) - torch.log1p(-x))
_log_sigmoid = recorded(F.logsigmoid, lambda z: -(torch.clamp(-z, min=0) + torch.log1p(torch.exp(-z.abs()))))

# the wrappers, with torch's signatures (losses.base.loss)
mse_loss = loss(MSELossFunction, torch.nn.MSELoss, "mse_loss")
l1_loss = loss(L1LossFunction, torch.nn.L1Loss, "l1_loss")
smooth_l1_loss = loss(SmoothL1LossFunction, torch.nn.SmoothL1Loss, "smooth_l1_loss")
huber_loss = loss(HuberLossFunction, torch.nn.HuberLoss, "huber_loss")
binary_cross_entropy = loss(BinaryCrossEntropyFunction, torch.nn.BCELoss, "binary_cross_entropy")
binary_cross_entropy_with_logits = loss(
    BinaryCrossEntropyWithLogitsFunction, torch.nn.BCEWithLogitsLoss, "binary_cross_entropy_with_logits"
)
