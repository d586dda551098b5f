"""manualgrad: PyTorch autograd Functions whose backward passes are the derived formulas, written by hand.

* :mod:`manualgrad.functions`: the ``torch.autograd.Function`` subclasses;
* :mod:`manualgrad.functional`: ``torch.nn.functional``-style wrappers;
* :mod:`manualgrad.nn`: drop-in twins of ``torch.nn`` modules.
"""

from . import functional, functions, nn
from ._checks import InputError

__version__ = "0.1.0"

__all__ = ["functional", "functions", "nn", "InputError", "__version__"]
