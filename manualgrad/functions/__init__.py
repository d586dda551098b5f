"""The autograd Functions: each backward (and jvp) is a formula from ``docs/derivations.md``."""

from .activations import (
    Elementwise,
    ELUFunction,
    GELUFunction,
    LeakyReLUFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftplusFunction,
    TanhFunction,
)
from .base import ManualFunction
from .dropout import DropoutFunction
from .linear import LinearFunction
from .losses import CrossEntropyFunction, MSELossFunction
from .mlp import MLPCrossEntropyFunction, MLPFunction, MLPSpec

__all__ = [
    "CrossEntropyFunction",
    "DropoutFunction",
    "ELUFunction",
    "Elementwise",
    "GELUFunction",
    "LeakyReLUFunction",
    "LinearFunction",
    "MLPCrossEntropyFunction",
    "MLPFunction",
    "MLPSpec",
    "MSELossFunction",
    "ManualFunction",
    "ReLUFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SoftplusFunction",
    "TanhFunction",
]
