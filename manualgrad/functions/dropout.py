r"""Dropout: :math:`Y = X \odot K / (1 - p)`, :math:`G_X = G_Y \odot K / (1 - p)`.

:math:`K` keeps each element with probability :math:`1 - p`. It is drawn as
PyTorch's CPU dropout draws it (``empty_like(x).bernoulli_(1 - p)``), so on the
CPU the same seed gives the same mask as ``torch.nn.Dropout``; the backward
keeps :math:`K / (1 - p)` in the input's dtype, as many bytes as PyTorch's CPU
dropout keeps, and multiplies once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ManualFunction, save_for_forward

__all__ = ["DropoutFunction"]


class DropoutFunction(ManualFunction):
    r"""``apply(input, p, inplace)`` → ``(output, scaled_mask)``; training-mode dropout, ``0 < p < 1``.

    Forward: :math:`Y = X \odot M` with :math:`M = K / (1 - p)`. The mask is the
    second output (not differentiable), so that ``setup_context`` can keep it.
    With ``inplace`` the input is overwritten (the backward needs only ``M``).
    Backward: :math:`G_X = G_Y \odot M`. Forward mode: :math:`\dot Y = \dot X \odot M`.

    Shape: input ``(*)``, output ``(*)``, mask ``(*)``.
    """

    @staticmethod
    def forward(input: Tensor, p: float, inplace: bool = False):
        mask = torch.empty_like(input).bernoulli_(1 - p).div_(1 - p)
        return (input.mul_(mask) if inplace else input * mask), mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        input = inputs[0]
        result, mask = output
        ctx.inplace = result is input
        if ctx.inplace:
            ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mask)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the mask
        ctx.save_for_backward(mask)
        save_for_forward(ctx, mask)

    @staticmethod
    def backward(ctx, grad_output, _grad_mask):
        (mask,) = ctx.saved_tensors
        if grad_output is None:
            return None, None, None
        return grad_output * mask, None, None  # G_X = G_Y ⊙ K/(1-p)

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (mask,) = ctx.saved_tensors
        if ctx.inplace:  # the input changed in place: so does its tangent
            return input_tangent.mul_(mask), None
        return input_tangent * mask, None
