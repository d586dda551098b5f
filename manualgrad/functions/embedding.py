r"""The embedding lookup :math:`Y[\ldots] = W[i_{\ldots}]`: rows of a table, chosen by integer indices.

It is the linear layer of one-hot inputs, :math:`Y = E_i W` (:math:`E_i` the one-hot rows of the indices), so

.. math::

    G_W = E_i^\top G_Y \;(\text{row } v \text{ gathers } \textstyle\sum_{t: i_t = v} G_Y[t]) \qquad
    \dot Y = \dot W[i]

and per sample (:mod:`~manualgrad.functions.recorder`), with :math:`A A^\top = [i_t = i_s]` for one-hot rows,
:math:`\|g_n\|^2 = \sum_{t,s} [i_t = i_s]\, \langle G[n,t], G[n,s]\rangle`: the Gram ("ghost") form, which never
forms the ``(N, rows, d)`` per-sample gradients. The row ``padding_idx`` gets no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from ..errors import InputError
from ..registry import operation
from . import recorder
from .base import ManualFunction, apply, cast, opmath, save

__all__ = ["EmbeddingFunction", "embedding"]


class EmbeddingFunction(ManualFunction):
    r"""``apply(input, weight, padding_idx)``: :math:`Y = W[i]`; backward :math:`G_W = E_i^\top G_Y` (rows added at
    their indices, none at ``padding_idx``); see the module docstring.

    Shape: input (indices) any shape ``(*)``; weight ``(rows, d)``; output ``(*, d)``.

    ``padding_idx`` follows torch's convention, not the derivative: the forward reads that row, yet it gets no
    gradient (so gradcheck, which compares with finite differences, does not hold there; ``tests`` compare it
    with torch instead).
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, padding_idx: int) -> Tensor:
        return torch.nn.functional.embedding(input, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, ctx.padding_idx = inputs
        ctx.rows, ctx.dtype = weight.shape[0], weight.dtype
        ctx.per_sample = recorder.layer(weight, None) if input.dim() > 1 else None
        save(ctx, input)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (index,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        g = opmath(grad_output)
        if ctx.padding_idx >= 0:  # the padding row is constant
            g = torch.where((index == ctx.padding_idx).unsqueeze(-1), 0, g)
        if ctx.per_sample is not None:
            samples = index.shape[0]
            rows_of = index.reshape(samples, math.prod(index.shape[1:]))  # (N, T), also for an empty batch
            if ctx.per_sample.record_lookup(g.reshape(samples, rows_of.shape[1], g.shape[-1]), rows_of):
                return None, None, None  # clipping: the recorder forms G_W at the end of the backward pass
        width = g.shape[-1]
        # E_iᵀ G_Y; the sizes spelt out, as -1 is ambiguous for an empty batch (under vmap too)
        grad_weight = g.new_zeros(ctx.rows, width).index_add(0, index.reshape(-1), g.reshape(index.numel(), width))
        return None, cast(grad_weight, ctx.dtype), None

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, _):
        (index,) = ctx.saved_tensors
        return torch.nn.functional.embedding(index, weight_tangent)  # Ẏ = Ẇ[i]


@operation(torch.nn.Embedding, EmbeddingFunction, kind="layer", per_sample=True)
def embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    r""":math:`y = W[i]`, the rows of ``weight`` at the indices ``input``; see
    :class:`~manualgrad.functions.EmbeddingFunction`. ``max_norm`` renormalises the looked-up rows of ``weight`` in
    place first, as torch does. ``scale_grad_by_freq`` and ``sparse`` gradients are not supported."""
    if input.dtype not in (torch.int32, torch.int64):
        raise InputError(f"embedding: input must hold integer indices (int32 or int64), got {input.dtype}")
    _checks.real_floating("embedding", "weight", weight)
    if weight.dim() != 2:
        raise InputError(f"embedding: weight must be (rows, d), got shape {tuple(weight.shape)}")
    if scale_grad_by_freq or sparse:
        raise InputError("embedding: scale_grad_by_freq=True and sparse=True are not supported (use torch's)")
    rows = weight.shape[0]
    if padding_idx is None:
        padding_idx = -1
    elif -rows <= padding_idx < rows:
        padding_idx = padding_idx % rows
    else:
        raise InputError(f"embedding: padding_idx {padding_idx} is out of range for {rows} rows")
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, input.contiguous(), max_norm, norm_type)
    return apply(EmbeddingFunction, input.long(), weight, padding_idx)
