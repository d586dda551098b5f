"""Losses: the scalar R at the top of the network, and the first gradient of every step.

:mod:`.base` holds what they share (the reduction, :class:`ElementwiseLoss`, :class:`ClassTarget`, the wrapper
helper :func:`loss`); :mod:`.classification` cross-entropy and NLL; :mod:`.pointwise` the elementwise losses, each its
forward and its partial derivatives. Each forward is PyTorch's own kernel; each backward and jvp the formula.
"""

from . import base, classification, pointwise
from .base import *  # noqa: F403
from .classification import *  # noqa: F403
from .pointwise import *  # noqa: F403

__all__ = base.__all__ + classification.__all__ + pointwise.__all__
