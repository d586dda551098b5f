r"""The affine layer :math:`Z = X W^\top + b`, with its backward and jvp written out.

Batched rows, as PyTorch stores them (``docs/derivations.md``, section 1): ``X``
is ``N x q`` (any leading dimensions are flattened into ``N``), ``W`` is
``p x q``, ``b`` has ``p`` entries.

.. math::

    G_X = G_Z W \qquad G_W = G_Z^\top X \qquad G_b = \textstyle\sum_{\text{rows}} G_Z
    \qquad \dot Z = \dot X W^\top + X \dot W^\top + \dot b
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from ..registry import operation
from . import recorder
from .base import ManualFunction, apply, cast, save_for_forward, tangent_sum

__all__ = ["LinearFunction", "linear"]


def rows(t: Tensor) -> Tensor:
    """``t`` as a matrix of rows: ``(*, k)`` -> ``(N, k)``, ``N`` the product of the leading sizes (also when k = 0);
    a matrix is its own rows."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class LinearFunction(ManualFunction):
    r"""``LinearFunction.apply(input, weight, bias)``: :math:`Z = X W^\top + b`.

    Backward: :math:`G_X = G_Z W`, :math:`G_W = G_Z^\top X`, :math:`G_b = \sum_n G_Z[n]`,
    each computed only if ``ctx.needs_input_grad`` asks for it. It keeps ``X``
    only when ``W`` needs a gradient and ``W`` only when ``X`` does.

    Under autocast the forward's ``F.linear`` runs in the autocast dtype (as
    ``torch.nn.Linear`` does); the backward then multiplies in the dtype of the
    incoming gradient and hands each gradient back in its input's dtype.

    Shape:
        - input: ``(*, q)``, including ``(q,)``, an empty batch and ``q = 0``
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
        ctx.per_sample = recorder.layer(weight, bias)  # None unless a per_sample context tracks weight or bias
        ctx.save_for_backward(input if needs_weight or ctx.per_sample else None, weight if needs_input else None)
        save_for_forward(ctx, input, weight)
        ctx.input_shape = input.shape
        ctx.dtype = output.dtype
        dtypes = (input.dtype, weight.dtype, output.dtype if bias is None else bias.dtype)
        ctx.dtypes = None if dtypes.count(output.dtype) == 3 else dtypes  # autocast

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad
        if ctx.dtypes:  # autocast: multiply in the forward's dtype
            input = None if input is None else cast(input, grad_output.dtype)
            weight = None if weight is None else cast(weight, grad_output.dtype)
        grad_z = rows(grad_output)  # N x p
        grad_input = grad_z.mm(weight) if needs_input else None  # G_X = G_Z W
        if grad_input is not None and grad_input.shape != ctx.input_shape:
            grad_input = grad_input.reshape(ctx.input_shape)
        if ctx.per_sample is not None:  # clipping: the recorder forms G_W and G_b at the end of the backward pass
            taken = ctx.per_sample.record(recorder.samples(grad_output), recorder.samples(input))
            needs_weight, needs_bias = needs_weight and not taken[0], needs_bias and not taken[1]
        grad_weight = grad_z.t().mm(rows(input)) if needs_weight else None  # G_W = G_Z^T X
        grad_bias = grad_z.sum(0) if needs_bias else None  # G_b = Σ_rows G_Z
        if ctx.dtypes:  # each gradient in its input's dtype
            grads = (grad_input, grad_weight, grad_bias)
            return tuple(None if g is None else cast(g, d) for g, d in zip(grads, ctx.dtypes))
        return grad_input, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent):
        input, weight = ctx.saved_tensors
        dtype, out_shape = ctx.dtype, (*input.shape[:-1], weight.shape[0])
        return tangent_sum(  # Ẋ W^T + X Ẇ^T + ḃ
            None if input_tangent is None else cast(input_tangent, dtype).matmul(cast(weight, dtype).t()),
            None if weight_tangent is None else cast(input, dtype).matmul(cast(weight_tangent, dtype).t()),
            None if bias_tangent is None else cast(bias_tangent, dtype).expand(out_shape),
        )


@operation(torch.nn.Linear, LinearFunction, kind="layer", per_sample=True)
def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r""":math:`y = x W^\top + b`; see :class:`~manualgrad.functions.LinearFunction`.

    Shape: input ``(*, in_features)``, weight ``(out_features, in_features)``,
    bias ``(out_features,)``, output ``(*, out_features)``.
    """
    _checks.linear(input, weight, bias)
    return apply(LinearFunction, input, weight, bias)
