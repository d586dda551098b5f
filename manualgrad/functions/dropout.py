r"""Dropout: :math:`Y = X \odot M`, :math:`G_X = G_Y \odot M`, with :math:`M = K / (1 - p)`.

:math:`K` keeps each element (``dropout``) or each channel (``dropout2d``: one
draw per sample and channel, broadcast over the rest) with probability
:math:`1 - p`. It is drawn as PyTorch's CPU kernels draw it: ``dropout``'s as
``empty_like(input).bernoulli_(1 - p)``, in the input's memory order (so a
channels_last, transposed or sliced input gets the mask torch would give
it), ``dropout2d``'s as ``empty((N, C, 1, ...)).bernoulli_(1 - p)``. On the
CPU the same seed therefore gives the same mask as ``torch.nn.Dropout`` and
``torch.nn.Dropout2d`` for any layout (tested); other devices' kernels may
draw in another order. The backward keeps
:math:`M` in the input's dtype and multiplies once. At :math:`p = 1` every
element is dropped, :math:`Y = 0` and :math:`M = 0` (no draw, as in PyTorch).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks
from ..errors import InputError
from ..registry import operation
from .base import ManualFunction, apply, save

__all__ = ["DropoutFunction", "draw_mask", "dropout", "dropout2d"]


class DropoutFunction(ManualFunction):
    r"""``apply(input, mask, inplace)`` → output: training-mode dropout with a drawn mask (:func:`draw_mask`).

    Forward: :math:`Y = X \odot M`, the mask :math:`M = K / (1 - p)` broadcast
    over the input (of its shape, or ``(N, C, 1, ...)`` for dropout2d). With
    ``inplace`` the input is overwritten (the backward needs only :math:`M`);
    one output, so that, as the in-place activations, it works on a view.
    Backward: :math:`G_X = G_Y \odot M`. Forward mode: :math:`\dot Y = \dot X \odot M`.
    """

    @staticmethod
    def forward(input: Tensor, mask: Tensor, inplace: bool = False):
        return input.mul_(mask) if inplace else input * mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, mask, _ = inputs
        ctx.inplace = output is input
        if ctx.inplace:
            ctx.mark_dirty(input)
        save(ctx, mask)

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return grad_output * mask, None, None  # G_X = G_Y ⊙ M

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (mask,) = ctx.saved_tensors
        if ctx.inplace:  # the input changed in place: so does its tangent
            return input_tangent.mul_(mask)
        return input_tangent * mask


def draw_mask(input: Tensor, p: float, channels: bool) -> Tensor:
    """:math:`M = K / (1 - p)`, :math:`K` Bernoulli(1 - p) of the input's shape, or ``(N, C, 1, ...)`` when
    ``channels`` (dropout2d); all zeros at ``p = 1`` (no draw, as in PyTorch)."""
    if channels:  # one draw per (sample, channel), in that order, whatever the input's layout
        mask = input.new_empty(input.shape[:2] + (1,) * (input.dim() - 2))
    else:  # drawn in the input's memory order (channels_last, transposed, ...), as torch's kernel draws
        mask = torch.empty_like(input)
    return mask.zero_() if p == 1 else mask.bernoulli_(1 - p).div_(1 - p)


def _apply(input: Tensor, p: float, inplace: bool, channels: bool) -> Tensor:
    mask = draw_mask(input, p, channels)
    if inplace and torch.compiler.is_compiling():  # Dynamo cannot trace a Function that dirties its input
        return input.copy_(apply(DropoutFunction, input, mask, False))
    return apply(DropoutFunction, input, mask, inplace)


@operation(torch.nn.Dropout, DropoutFunction, kind="layer")
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    r"""Zeroes each element with probability ``p`` and scales the rest by :math:`1/(1-p)`.

    Backward: :math:`G_X = G_Y \odot K/(1-p)`; see :class:`~manualgrad.functions.DropoutFunction`.
    In eval mode (``training=False``), for ``p = 0`` and for an empty input it
    returns ``input`` itself, as PyTorch does.
    """
    _checks.real_floating("dropout", "input", input)
    _checks.dropout_p("dropout", p)
    if not training or p == 0 or input.numel() == 0:
        return input
    return _apply(input, p, inplace, channels=False)


@operation(torch.nn.Dropout2d, DropoutFunction, kind="layer")
def dropout2d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    r"""Zeroes whole channels: each ``input[n, c]`` with probability ``p``; the rest scaled by :math:`1/(1-p)`.

    Backward: :math:`G_X = G_Y \odot K/(1-p)`, :math:`K` of shape ``(N, C, 1, 1)``
    broadcast over the feature map. Input ``(N, C, H, W)``; a 3-D input is read
    as ``(N, C, L)``, with PyTorch's warning.
    """
    _checks.real_floating("dropout2d", "input", input)
    _checks.dropout_p("dropout2d", p)
    if input.dim() < 2:
        raise InputError(f"dropout2d: input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if input.dim() not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead.",
            stacklevel=2,
        )
    if input.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim.",
            stacklevel=2,
        )
    if not training or p == 0 or input.numel() == 0:
        return input
    return _apply(input, p, inplace, channels=True)
