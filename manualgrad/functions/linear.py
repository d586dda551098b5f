r"""The affine layer :math:`Z = X W^\top + b`, with its backward and jvp written out.

Batched rows, as PyTorch stores them (``../shared/DERIVATIONS.md``): ``X`` is
``N x q`` (any leading dimensions are flattened into ``N``), ``W`` is ``p x q``,
``b`` has ``p`` entries.

.. math::

    G_X = G_Z W \qquad G_W = G_Z^\top X \qquad G_b = \textstyle\sum_{\text{rows}} G_Z
    \qquad \dot Z = \dot X W^\top + X \dot W^\top + \dot b
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ManualFunction, cast

__all__ = ["LinearFunction"]


class LinearFunction(ManualFunction):
    r"""``LinearFunction.apply(input, weight, bias)``: :math:`Z = X W^\top + b`.

    Backward: :math:`G_X = G_Z W`, :math:`G_W = G_Z^\top X`, :math:`G_b = \sum_n G_Z[n]`,
    each computed only if ``ctx.needs_input_grad`` asks for it. It keeps ``X``
    only when ``W`` needs a gradient and ``W`` only when ``X`` does.

    Under autocast the forward's ``F.linear`` runs in the autocast dtype (as
    ``torch.nn.Linear`` does); the backward then multiplies in the dtype of the
    incoming gradient and hands each gradient back in its input's dtype.

    Shape:
        - input: ``(*, q)``, including ``(q,)`` and an empty batch
        - weight: ``(p, q)``; bias: ``(p,)`` or ``None``
        - output: ``(*, p)``
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        needs_input, needs_weight, _ = ctx.needs_input_grad
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        ctx.save_for_forward(input, weight)
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.compute_dtype = output.dtype

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        dtype = grad_output.dtype  # the forward's compute dtype (not the inputs' under autocast)
        grad_input = grad_weight = grad_bias = None
        if needs_input:  # G_X = G_Z W
            grad_input = cast(grad_output.matmul(cast(weight, dtype)), input_dtype)
        if needs_weight or needs_bias:
            grad_z = grad_output.reshape(-1, grad_output.shape[-1])  # rows of G_Z, N x p
        if needs_weight:  # G_W = G_Z^T X
            x = cast(input.reshape(-1, input.shape[-1]), dtype)
            grad_weight = cast(grad_z.t().mm(x), weight_dtype)
        if needs_bias:  # G_b = sum over rows of G_Z
            grad_bias = cast(grad_z.sum(0), bias_dtype)
        return grad_input, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent):
        input, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        tangent = None
        if input_tangent is not None:  # Ẋ W^T
            tangent = cast(input_tangent, dtype).matmul(cast(weight, dtype).t())
        if weight_tangent is not None:  # + X Ẇ^T
            term = cast(input, dtype).matmul(cast(weight_tangent, dtype).t())
            tangent = term if tangent is None else tangent + term
        if bias_tangent is not None:  # + ḃ
            term = cast(bias_tangent, dtype).expand(*input.shape[:-1], weight.shape[0])
            tangent = term if tangent is None else tangent + term
        return tangent
