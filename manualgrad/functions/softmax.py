r"""Softmax and log-softmax along one dimension.

For one row :math:`z` (the slice along ``dim``), :math:`y = \operatorname{softmax}(z)`,
:math:`y_i = e^{z_i} / \sum_j e^{z_j}`, has the Jacobian
:math:`\partial y_i / \partial z_j = y_i(\delta_{ij} - y_j)`, i.e.
:math:`\operatorname{diag}(y) - y y^\top`. A row vector times it (numerator
layout, ``docs/derivations.md``, section 4):

.. math::

    G_Z = y \odot \Big(G_Y - \textstyle\sum_j G_{Y,j}\, y_j\Big) \qquad
    \dot Y = y \odot \Big(\dot Z - \textstyle\sum_j y_j \dot Z_j\Big)

and for :math:`y = \log\operatorname{softmax}(z) = z - \log\sum_j e^{z_j}`, with
Jacobian :math:`I - \mathbf 1\, \operatorname{softmax}(z)^\top`:

.. math::

    G_Z = G_Y - e^{y} \textstyle\sum_j G_{Y,j} \qquad
    \dot Y = \dot Z - \textstyle\sum_j e^{y_j} \dot Z_j

Both keep only their output (:math:`e^y` is the softmax).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks
from ..errors import InputError
from ..registry import operation
from .base import ManualFunction, apply, cast, exp, opmath, save

__all__ = ["LogSoftmaxFunction", "SoftmaxFunction", "log_softmax", "softmax"]


class _KeepsOutput(ManualFunction):
    """``apply(input, dim, dtype)``, keeping only the output ``y`` (``input`` cast to ``dtype`` first, when given)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.dim, _ = inputs
        ctx.dtype = input.dtype
        save(ctx, output)


class SoftmaxFunction(_KeepsOutput):
    r"""``apply(input, dim, dtype)``: :math:`y = \operatorname{softmax}(z)` along ``dim``;
    backward :math:`G_Z = y \odot (G_Y - \sum_j G_{Y,j} y_j)`."""

    @staticmethod
    def forward(input: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.softmax(input, dim, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        y, g = opmath(y), opmath(grad_output)
        gy = g * y
        grad_input = torch.addcmul(gy, y, gy.sum(ctx.dim, keepdim=True), value=-1)  # G_Z = y ⊙ G_Y − y Σ_j G_Y,j y_j
        return cast(grad_input, ctx.dtype), None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (y,) = ctx.saved_tensors
        z_dot = cast(input_tangent, y.dtype)
        return y * (z_dot - (y * z_dot).sum(ctx.dim, keepdim=True))  # Ẏ = y ⊙ (Ż − Σ_j y_j Ż_j)


class LogSoftmaxFunction(_KeepsOutput):
    r"""``apply(input, dim, dtype)``: :math:`y = \log\operatorname{softmax}(z)` along ``dim``;
    backward :math:`G_Z = G_Y - e^y \sum_j G_{Y,j}`."""

    @staticmethod
    def forward(input: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.log_softmax(input, dim, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        y, g = opmath(y), opmath(grad_output)
        grad_input = torch.addcmul(g, exp(y), g.sum(ctx.dim, keepdim=True), value=-1)  # G_Y − e^y Σ_j G_Y,j
        return cast(grad_input, ctx.dtype), None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (y,) = ctx.saved_tensors
        z_dot = cast(input_tangent, y.dtype)
        return z_dot - (torch.exp(y) * z_dot).sum(ctx.dim, keepdim=True)  # Ẏ = Ż − Σ_j softmax_j Ż_j


def _dim(layer: str, input: Tensor, dim: int | None) -> int:
    """``dim``, or PyTorch's legacy choice when it is None (0 for 0-, 1- and 3-D inputs, else 1), with its warning."""
    if dim is None:
        warnings.warn(
            f"Implicit dimension choice for {layer} has been deprecated. "
            "Change the call to include dim=X as an argument.",
            stacklevel=3,
        )
        return 0 if input.dim() in (0, 1, 3) else 1
    ndim = max(input.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{layer}: dim {dim} is out of range for an input of shape {tuple(input.shape)} "
            f"(expected to be in range of [{-ndim}, {ndim - 1}])"
        )
    return dim


def _softmax_call(layer: str, function, input, dim, dtype):
    if dtype is None:
        _checks.real_floating(layer, "input", input)
    else:  # the input is cast to dtype first: any real input (bool, integers) will do, as in torch
        _checks.tensor(layer, "input", input)
        if input.is_complex():
            raise InputError(
                f"{layer}: input has complex dtype {input.dtype}; manualgrad differentiates real inputs only"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputError(f"{layer}: dtype must be a floating-point dtype, got {dtype}")
    return apply(function, input, _dim(layer, input, dim), dtype)


@operation(torch.nn.Softmax, SoftmaxFunction, kind="layer")
def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    r""":math:`\operatorname{softmax}(x)_i = e^{x_i} / \sum_j e^{x_j}` along ``dim``;
    see :class:`~manualgrad.functions.SoftmaxFunction`. ``dtype``: cast the input first."""
    return _softmax_call("softmax", SoftmaxFunction, input, dim, dtype)


@operation(torch.nn.LogSoftmax, LogSoftmaxFunction, kind="layer")
def log_softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    r""":math:`\log\operatorname{softmax}(x)` along ``dim``; see :class:`~manualgrad.functions.LogSoftmaxFunction`."""
    return _softmax_call("log_softmax", LogSoftmaxFunction, input, dim, dtype)
