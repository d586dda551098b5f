"""The autograd Functions: each backward (and jvp) is a formula from ``docs/derivations.md``.

Importing this package registers every operation (:mod:`manualgrad.registry`):
each module declares its Functions' wrappers next to them.
"""

from .activations import (
    Elementwise,
    ELUFunction,
    GELUFunction,
    LeakyReLUFunction,
    MishFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftplusFunction,
    TanhFunction,
)
from .base import ManualFunction
from .conv import Conv1dFunction, Conv2dFunction, Conv2dWeightFunction, ConvTranspose2dFunction
from .dropout import DropoutFunction
from .embedding import EmbeddingFunction
from .linear import LinearFunction
from .losses import PointwiseLoss
from .losses.classification import CrossEntropyFunction, NLLLossFunction
from .losses.pointwise import (
    BinaryCrossEntropyFunction,
    BinaryCrossEntropyWithLogitsFunction,
    HuberLossFunction,
    L1LossFunction,
    MSELossFunction,
    SmoothL1LossFunction,
)
from .mlp import MLPCrossEntropyFunction, MLPFunction, MLPSpec
from .normalization import GroupNormFunction, LayerNormFunction
from .pooling import AdaptiveAvgPool2dFunction, AvgPool2dFunction, MaxPool2dFunction
from .shape import PadFunction, ReshapeFunction
from .softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "AdaptiveAvgPool2dFunction",
    "AvgPool2dFunction",
    "BinaryCrossEntropyFunction",
    "BinaryCrossEntropyWithLogitsFunction",
    "Conv1dFunction",
    "Conv2dFunction",
    "Conv2dWeightFunction",
    "ConvTranspose2dFunction",
    "CrossEntropyFunction",
    "DropoutFunction",
    "ELUFunction",
    "Elementwise",
    "EmbeddingFunction",
    "GELUFunction",
    "GroupNormFunction",
    "HuberLossFunction",
    "L1LossFunction",
    "LayerNormFunction",
    "LeakyReLUFunction",
    "LinearFunction",
    "LogSoftmaxFunction",
    "MLPCrossEntropyFunction",
    "MLPFunction",
    "MLPSpec",
    "MSELossFunction",
    "ManualFunction",
    "MaxPool2dFunction",
    "MishFunction",
    "NLLLossFunction",
    "PadFunction",
    "PointwiseLoss",
    "ReLUFunction",
    "ReshapeFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SmoothL1LossFunction",
    "SoftmaxFunction",
    "SoftplusFunction",
    "TanhFunction",
]
