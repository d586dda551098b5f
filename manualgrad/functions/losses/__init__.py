"""Losses, the scalar R atop a network: :mod:`.base` what they share, :mod:`.classification` cross-entropy and NLL,
:mod:`.pointwise` the elementwise losses. Each forward is PyTorch's own kernel; each backward and jvp the formula."""

from . import classification, pointwise
from .base import ClassTarget, ElementwiseLoss, PointwiseLoss, class_dim, loss

__all__ = ["ClassTarget", "ElementwiseLoss", "PointwiseLoss", "class_dim", "classification", "loss", "pointwise"]
