"""``torch.nn.functional``, with manualgrad's hand-written backward passes.

Every operation of the registry (:mod:`manualgrad.registry`) is here under
torch's name, with torch's signature and defaults: it checks its input (errors
name the layer and the offending shapes, dtypes or devices) and applies a
Function from :mod:`manualgrad.functions`. Every other name of
``torch.nn.functional`` (``pad``, ``one_hot``, ...) is handed on to torch, so
swapping ``import torch.nn.functional as F`` for ``import manualgrad.functional as F``
never breaks a script; :func:`manualgrad.manual_coverage` shows which backward
nodes are still torch's. ``dir()`` and ``from manualgrad.functional import *``
list only what is ours.
"""

from __future__ import annotations

import torch.nn.functional as _torch_functional

from . import functions as _functions  # noqa: F401  (importing it registers every operation)
from .registry import OPS as _OPS

globals().update({name: op.functional for name, op in _OPS.items()})


def __getattr__(name: str):
    op = _OPS.get(name)  # registered after this module was imported (a user's own operation)
    if op is not None:
        return op.functional
    if name == "__all__":
        return sorted(_OPS)
    if not name.startswith("__") and hasattr(_torch_functional, name):
        return getattr(_torch_functional, name)  # not ours: torch's own, with torch's backward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (nor has torch.nn.functional)")


def __dir__() -> list[str]:
    return sorted(_OPS)
