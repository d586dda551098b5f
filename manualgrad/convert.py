"""``convert``: turn the torch.nn layers of any model into their manualgrad twins, in place.

Every manualgrad module subclasses its torch.nn namesake and adds no state, so
a converted module is the *same object* with its class switched (the way
``torch.nn.utils.parametrize`` switches classes): parameters, buffers, hooks,
device, dtype and any optimizer built before the call all stay as they were.
"""

from __future__ import annotations

import warnings

import torch

from . import _checks
from . import nn as mnn

__all__ = ["TWINS", "ConversionWarning", "convert"]

#: torch.nn class -> manualgrad twin. Only exact types are converted: a subclass
#: of torch.nn.Linear may have its own forward, so it is left alone and reported.
TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Linear: mnn.Linear,
    torch.nn.ReLU: mnn.ReLU,
    torch.nn.LeakyReLU: mnn.LeakyReLU,
    torch.nn.Sigmoid: mnn.Sigmoid,
    torch.nn.Tanh: mnn.Tanh,
    torch.nn.GELU: mnn.GELU,
    torch.nn.SiLU: mnn.SiLU,
    torch.nn.ELU: mnn.ELU,
    torch.nn.Softplus: mnn.Softplus,
    torch.nn.Dropout: mnn.Dropout,
    torch.nn.CrossEntropyLoss: mnn.CrossEntropyLoss,
    torch.nn.MSELoss: mnn.MSELoss,
}

_OURS = tuple(TWINS.values()) + (mnn.MLP,)
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


class ConversionWarning(UserWarning):
    """Some modules of a converted model still run torch's own backward."""


def convert(module: torch.nn.Module, *, strict: bool = False) -> torch.nn.Module:
    """Switch every torch.nn Linear, activation, loss and Dropout in ``module`` (recursively,
    ``module`` included) to its manualgrad twin, in place, and return ``module``.

    Modules without a twin are left alone and listed in one
    :class:`ConversionWarning` (or an :class:`~manualgrad.InputError` with
    ``strict=True``): leaf modules of other kinds (``Flatten``, ``Conv2d``,
    ``BatchNorm1d``, a subclass of ``Linear``...) and modules that hold
    parameters of their own. A module's own ``forward`` may still call torch
    operations; :func:`manualgrad.manual_coverage` finds those in the graph.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> manualgrad.convert(model)   # same Parameters: the optimizer keeps working
    """
    left_alone = []
    for name, child in module.named_modules():
        twin = TWINS.get(type(child))
        if twin is mnn.Dropout and not 0 <= child.p < 1:
            twin = None  # p = 1 has no manualgrad twin (its gradient scale 1/(1-p) is undefined)
        if twin is not None:
            child.__class__ = twin
        elif not isinstance(child, _OURS) and not isinstance(child, _CONTAINERS):
            has_children = next(child.children(), None) is not None
            own_params = next(child.parameters(recurse=False), None) is not None
            if not has_children or own_params:
                left_alone.append(f"{name or '<root>'} ({type(child).__name__})")
    if left_alone:
        message = "convert: left torch's own backward in " + ", ".join(left_alone)
        if strict:
            raise _checks.InputError(message)
        warnings.warn(message, ConversionWarning, stacklevel=2)
    return module
