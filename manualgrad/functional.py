"""``torch.nn.functional``, with manualgrad's hand-written backward passes.

Each function has the signature and defaults of its ``torch.nn.functional``
namesake, checks its input (errors name the layer and the offending shapes,
dtypes or devices), and applies a Function from :mod:`manualgrad.functions`.
Swapping ``import torch.nn.functional as F`` for
``import manualgrad.functional as F`` is the whole port for these names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .functions import (
    CrossEntropyFunction,
    DropoutFunction,
    ELUFunction,
    GELUFunction,
    LeakyReLUFunction,
    LinearFunction,
    MSELossFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftplusFunction,
    TanhFunction,
)
from .functions.base import applier

__all__ = [
    "cross_entropy",
    "dropout",
    "elu",
    "gelu",
    "leaky_relu",
    "linear",
    "mse_loss",
    "relu",
    "sigmoid",
    "silu",
    "softplus",
    "tanh",
]

_linear = applier(LinearFunction)
_relu = applier(ReLUFunction)
_leaky_relu = applier(LeakyReLUFunction)
_sigmoid = applier(SigmoidFunction)
_tanh = applier(TanhFunction)
_gelu = applier(GELUFunction)
_silu = applier(SiLUFunction)
_elu = applier(ELUFunction)
_softplus = applier(SoftplusFunction)
_cross_entropy = applier(CrossEntropyFunction)
_mse_loss = applier(MSELossFunction)
_dropout = applier(DropoutFunction)


def _maybe_inplace(function, apply, input: Tensor, *args, inplace: bool) -> Tensor:
    """``apply(input, *args, inplace)``, with two exceptions for ``inplace=True``:

    * under ``torch.compile``, which cannot trace a Function that marks its
      input dirty, it computes out of place and writes the result back;
    * when the derivative needs the input (SiLU) and autograd records, it
      differentiates a copy of the input and writes the result back, as
      PyTorch's own ``silu_`` keeps a copy (also under ``torch.compile``).
    """
    if not inplace:
        return apply(input, *args, False)
    from_output = function.saves_output(*args)
    if torch.compiler.is_compiling() or (not from_output and input.requires_grad and torch.is_grad_enabled()):
        kept = input if from_output else input.clone()  # the Function keeps its input: not the one overwritten
        return input.copy_(apply(kept, *args, False))
    return apply(input, *args, True)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r""":math:`y = x W^\top + b`; see :class:`~manualgrad.functions.LinearFunction`.

    Shape: input ``(*, in_features)``, weight ``(out_features, in_features)``,
    bias ``(out_features,)``, output ``(*, out_features)``.
    """
    _checks.linear(input, weight, bias)
    return _linear(input, weight, bias)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    r""":math:`\max(x, 0)`; see :class:`~manualgrad.functions.ReLUFunction`."""
    _checks.tensor("relu", "input", input)
    return _maybe_inplace(ReLUFunction, _relu, input, inplace=inplace)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    r""":math:`x` if :math:`x > 0` else ``negative_slope`` :math:`\cdot x`; see :class:`~manualgrad.functions.LeakyReLUFunction`."""
    _checks.tensor("leaky_relu", "input", input)
    return _maybe_inplace(LeakyReLUFunction, _leaky_relu, input, negative_slope, inplace=inplace)


def sigmoid(input: Tensor) -> Tensor:
    r""":math:`1 / (1 + e^{-x})`; see :class:`~manualgrad.functions.SigmoidFunction`."""
    _checks.tensor("sigmoid", "input", input)
    return _sigmoid(input)


def tanh(input: Tensor) -> Tensor:
    r""":math:`\tanh x`; see :class:`~manualgrad.functions.TanhFunction`."""
    _checks.tensor("tanh", "input", input)
    return _tanh(input)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    r""":math:`x\,\Phi(x)` (or its tanh approximation); see :class:`~manualgrad.functions.GELUFunction`."""
    _checks.tensor("gelu", "input", input)
    _checks.choice("gelu", "approximate", approximate, ("none", "tanh"))
    return _gelu(input, approximate)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    r""":math:`x\,\sigma(x)`; see :class:`~manualgrad.functions.SiLUFunction`."""
    _checks.tensor("silu", "input", input)
    return _maybe_inplace(SiLUFunction, _silu, input, inplace=inplace)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    r""":math:`x` if :math:`x > 0` else :math:`\alpha(e^x - 1)`; see :class:`~manualgrad.functions.ELUFunction`."""
    _checks.tensor("elu", "input", input)
    return _maybe_inplace(ELUFunction, _elu, input, alpha, inplace=inplace)


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    r""":math:`\frac1\beta \log(1 + e^{\beta x})`; see :class:`~manualgrad.functions.SoftplusFunction`."""
    _checks.tensor("softplus", "input", input)
    return _softplus(input, beta, threshold)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Softmax cross-entropy; see :class:`~manualgrad.functions.CrossEntropyFunction`.

    Backward: :math:`G_Z = (\operatorname{softmax}(Z) - \mathrm{onehot}(t))/N` when
    unweighted and unsmoothed (the general form is in ``docs/derivations.md``).
    ``target`` holds class indices (``ignore_index`` rows count nowhere) or
    class probabilities of the input's shape. A class index outside
    ``[0, C)`` raises (on CUDA, a device-side assert, to avoid a host sync).
    """
    reduction = _checks.legacy_reduction("cross_entropy", size_average, reduce, reduction)
    ignore_index = _checks.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    return _cross_entropy(input, target, weight, ignore_index, reduction, float(label_smoothing))


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Mean squared error; see :class:`~manualgrad.functions.MSELossFunction`.

    Backward: :math:`G_{\hat Y} = 2(\hat Y - T)/M`. A target of another shape
    broadcasts, with torch's warning.
    """
    reduction = _checks.legacy_reduction("mse_loss", size_average, reduce, reduction)
    _checks.mse_loss(input, target, weight, reduction)
    return _mse_loss(input, target, weight, reduction)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    r"""Zeroes each element with probability ``p`` and scales the rest by :math:`1/(1-p)`.

    Backward: :math:`G_X = G_Y \odot K/(1-p)`; see :class:`~manualgrad.functions.DropoutFunction`.
    In eval mode (``training=False``) and for ``p = 0`` it returns ``input``
    itself. ``p`` must be in ``[0, 1)``.
    """
    _checks.tensor("dropout", "input", input)
    _checks.dropout_p("dropout", p)
    if not training or p == 0:
        return input
    if inplace and torch.compiler.is_compiling():  # see _maybe_inplace
        return input.copy_(_dropout(input, float(p), False)[0])
    return _dropout(input, float(p), inplace)[0]
