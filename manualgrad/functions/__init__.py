"""The autograd Functions: each backward (and jvp) is a formula from ``docs/derivations.md``."""

from .activations import (
    ELUFunction,
    Elementwise,
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
    "ManualFunction",
    "LinearFunction",
    "Elementwise",
    "ReLUFunction",
    "LeakyReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "GELUFunction",
    "SiLUFunction",
    "ELUFunction",
    "SoftplusFunction",
    "CrossEntropyFunction",
    "MSELossFunction",
    "DropoutFunction",
    "MLPSpec",
    "MLPFunction",
    "MLPCrossEntropyFunction",
]
