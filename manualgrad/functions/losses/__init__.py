"""Losses: the scalar R at the top of the network, and the first gradient of every step.

:mod:`.base` holds what they share (the reduction, :class:`ElementwiseLoss`, :class:`ClassTarget`, the wrapper
helper); :mod:`.classification` cross-entropy and NLL; :mod:`.pointwise` the elementwise losses, each its forward
and its partial derivatives. Each forward is PyTorch's own kernel; each backward and jvp the formula.
"""

from .base import ClassTarget, ElementwiseLoss, PointwiseLoss, class_dim, pointwise_loss
from .classification import CrossEntropyFunction, NLLLossFunction, cross_entropy, nll_loss
from .pointwise import (
    BinaryCrossEntropyFunction,
    BinaryCrossEntropyWithLogitsFunction,
    HuberLossFunction,
    L1LossFunction,
    MSELossFunction,
    SmoothL1LossFunction,
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    huber_loss,
    l1_loss,
    mse_loss,
    smooth_l1_loss,
)

__all__ = [
    "BinaryCrossEntropyFunction",
    "BinaryCrossEntropyWithLogitsFunction",
    "ClassTarget",
    "CrossEntropyFunction",
    "ElementwiseLoss",
    "HuberLossFunction",
    "L1LossFunction",
    "MSELossFunction",
    "NLLLossFunction",
    "PointwiseLoss",
    "SmoothL1LossFunction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "class_dim",
    "cross_entropy",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "nll_loss",
    "pointwise_loss",
    "smooth_l1_loss",
]
