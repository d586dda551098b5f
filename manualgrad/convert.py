"""``convert``: turn the torch.nn layers of any model (or a loss module) into their manualgrad twins, in place.

Every manualgrad module subclasses its torch.nn namesake and adds no state, so
a converted module is the *same object* with its class switched (the way
``torch.nn.utils.parametrize`` switches classes): parameters, buffers, hooks,
device, dtype and any optimizer built before the call all stay as they were.
"""

from __future__ import annotations

import dis
import types
import warnings

import torch

from . import nn as mnn
from .errors import InputError
from .registry import OPS, ops

__all__ = ["ConversionWarning", "convert", "twins"]


class ConversionWarning(UserWarning):
    """Some modules or function calls of a converted model still run torch's own backward."""


def twins() -> dict[type[torch.nn.Module], type[torch.nn.Module]]:
    """torch.nn class -> manualgrad twin, for every registered operation that backs a module."""
    return {op.module: mnn.twin(op) for op in ops() if op.module is not None}


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
_NO_BACKWARD_NODE = (torch.nn.Identity,)  # layers that return their input: nothing to convert


def convert(module: torch.nn.Module, *, strict: bool = False) -> torch.nn.Module:
    """Switch every torch.nn layer and loss in ``module`` that has a manualgrad twin (recursively, ``module``
    included: ``convert(loss_fn)`` converts a loss module) to that twin, in place, and return ``module``.

    What still runs torch's backward is listed in one :class:`ConversionWarning`
    (an :class:`~manualgrad.InputError` with ``strict=True``):

    * layers without a twin (``BatchNorm2d``, ``Conv3d``, ...), and modules that
      hold parameters of their own;
    * subclasses: a subclass of a torch.nn layer is left alone (convert
      switches exact classes), and a subclass of a twin with its own
      ``forward`` is reported;
    * ``torch.nn.functional`` (and ``torch``) calls in a custom module's
      ``forward``, found by name in its code (``F.relu``, ``F.max_pool2d``...):
      convert cannot reach function calls; ``import manualgrad.functional as F``
      in that file does, and :func:`manualgrad.manual_coverage` shows what is left.

    Layers that add no backward node (``Identity``) and containers are not reported.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> manualgrad.convert(model)   # same Parameters: the optimizer keeps working
    """
    table = twins()
    ours = (*table.values(), mnn.MLP)
    left_alone, calls = [], {}
    for name, child in module.named_modules():
        label = f"{name or '<root>'} ({type(child).__name__})"
        cls = type(child)
        if cls in table:
            child.__class__ = table[cls]
        elif isinstance(child, ours):
            if cls.forward is not _base_forward(cls, ours):
                left_alone.append(f"{label}: a subclass of {_base(cls, ours).__name__} with its own forward")
        elif isinstance(child, (*_CONTAINERS, *_NO_BACKWARD_NODE)):
            pass
        else:
            base = next((c for c in table if isinstance(child, c)), None)
            own_params = next(child.parameters(recurse=False), None) is not None
            if base is not None:
                left_alone.append(f"{label}: a subclass of torch.nn.{base.__name__} (convert switches exact classes)")
            elif next(child.children(), None) is None or own_params:
                left_alone.append(label)
            found = _torch_calls(cls)
            if found:
                calls[cls.__name__] = found
    if not left_alone and not calls:
        return module
    parts = []
    if left_alone:
        parts.append("left torch's own backward in " + ", ".join(left_alone))
    if calls:
        listed = "; ".join(f"{cls}.forward calls {', '.join(names)}" for cls, names in calls.items())
        parts.append(
            f"cannot reach function calls: {listed} (import manualgrad.functional as F where they are written; "
            "manualgrad.manual_coverage(loss) lists every backward node that is not ours)"
        )
    message = "convert: " + "; ".join(parts)
    if strict:
        raise InputError(message)
    warnings.warn(message, ConversionWarning, stacklevel=2)
    return module


def _base(cls: type, ours: tuple) -> type:
    return next(c for c in cls.__mro__ if c in ours)


def _base_forward(cls: type, ours: tuple):
    return _base(cls, ours).forward


def _torch_calls(cls: type) -> list[str]:
    """The torch functions a module's own ``forward`` calls by name: ``F.relu`` where ``F`` is
    ``torch.nn.functional``, and ``torch.flatten``-style calls of registered operations (read from its
    bytecode, not run: a call made elsewhere is not seen, hence the pointer to manual_coverage)."""
    forward = cls.__dict__.get("forward")
    if getattr(forward, "__code__", None) is None:
        return []
    cells = dict(zip(forward.__code__.co_freevars, (c.cell_contents for c in forward.__closure__ or ())))
    found, current = set(), None
    for instruction in dis.get_instructions(forward):
        name = instruction.argval
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF"):
            current = cells.get(name) if instruction.opname == "LOAD_DEREF" else forward.__globals__.get(name)
            if callable(current) and current is getattr(torch.nn.functional, name, None):
                found.add(f"torch.nn.functional.{name}")  # from torch.nn.functional import relu
        elif instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and current is not None:
            if current is torch.nn.functional and callable(getattr(current, name, None)):
                found.add(f"torch.nn.functional.{name}")
            elif current is torch and name in OPS:
                found.add(f"torch.{name}")
            current = getattr(current, name, None) if isinstance(current, types.ModuleType) else None
        else:
            current = None
    return sorted(found)
