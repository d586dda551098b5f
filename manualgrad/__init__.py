"""manualgrad: PyTorch autograd Functions whose backward passes are the derived formulas, written by hand.

* :mod:`manualgrad.functions`: the ``torch.autograd.Function`` subclasses;
* :mod:`manualgrad.registry`: every operation, declared once next to its Function;
* :mod:`manualgrad.functional`: ``torch.nn.functional``-style wrappers;
* :mod:`manualgrad.nn`: drop-in twins of ``torch.nn`` modules, and the fused :class:`~manualgrad.nn.MLP`;
* :func:`convert` switches a torch.nn model's layers to those twins in place;
* :func:`manual_coverage` shows which backward nodes behind a tensor are ours;
* :func:`fused_backward`: opt-in, each activation's backward as one compiled pass (``torch.compile``);
* :func:`per_sample`: per-sample gradient norms, gradients and DP-SGD's clipped sum from the same backward;
* :mod:`manualgrad.testing`: ``check`` a hand-written backward (yours or ours), with a diagnosis of a wrong one;
  ``python -m manualgrad.check file.py:Name``.
* :mod:`manualgrad.privacy`: DP-SGD with Opacus's interface (``PrivacyEngine``, ``BatchMemoryManager``).
"""

from . import functional, functions, nn, privacy, registry
from .convert import ConversionWarning, convert
from .coverage import Coverage, manual_coverage
from .errors import InputError
from .functions.fused import fused_backward
from .per_sample import per_sample

__version__ = "0.1.0"

__all__ = [
    "ConversionWarning",
    "Coverage",
    "InputError",
    "__version__",
    "convert",
    "functional",
    "functions",
    "fused_backward",
    "manual_coverage",
    "nn",
    "per_sample",
    "privacy",
    "registry",
]
