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
from .dropout import DropoutFunction
from .linear import LinearFunction
from .losses import CrossEntropyFunction, MSELossFunction, NLLLossFunction
from .mlp import MLPCrossEntropyFunction, MLPFunction, MLPSpec
from .softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "CrossEntropyFunction",
    "DropoutFunction",
    "ELUFunction",
    "Elementwise",
    "GELUFunction",
    "LeakyReLUFunction",
    "LinearFunction",
    "LogSoftmaxFunction",
    "MLPCrossEntropyFunction",
    "MLPFunction",
    "MLPSpec",
    "MSELossFunction",
    "ManualFunction",
    "MishFunction",
    "NLLLossFunction",
    "ReLUFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SoftmaxFunction",
    "SoftplusFunction",
    "TanhFunction",
]
