r"""The 2-D convolution :math:`Z = W \star X + b`: a Linear layer applied to every patch of the input.

One sample, one group (``docs/derivations.md``, "Convolution"). Unfold the
input into its patches: :math:`\hat X = U x` (``unfold``), one column
:math:`\hat x_\ell` of :math:`K = C k_h k_w` numbers per output position
:math:`\ell` (zero where the patch reaches into the padding); :math:`U` is a
0/1 matrix. The weight, read as an :math:`O \times K` matrix, maps every
column the same way: :math:`z_\ell = W \hat x_\ell + b`. So at each position
the Linear layer's Jacobians hold, :math:`\partial z_\ell / \partial \hat x_\ell = W`,
and since :math:`W`, :math:`b` and the pixels are shared between positions,
their row-vector gradients add up over :math:`\ell`:

.. math::

    \frac{dR}{d\hat x_\ell} = g_\ell W \qquad
    \frac{dR}{dW} = \textstyle\sum_\ell g_\ell^\top \hat x_\ell^\top \qquad
    \frac{dR}{db} = \textstyle\sum_\ell g_\ell \qquad
    \frac{dR}{dx} = \textstyle\sum_\ell \frac{dR}{d\hat x_\ell} U_\ell

Batched, as PyTorch stores it (``G_Z`` is ``N x O x L``; per group of channels):

.. math::

    G_X[n] = \operatorname{fold}(W^\top G_Z[n]) = W \star^\top G_Z \qquad
    G_W = \textstyle\sum_n G_Z[n] \hat X[n]^\top \qquad
    G_b = \textstyle\sum_{n,\ell} G_Z[n, :, \ell] \qquad
    \dot Z = W \star \dot X + \dot W \star X + \dot b

``fold`` adds every column back onto the pixels its patch came from (the
adjoint of unfolding): the transposed convolution, ``conv_transpose2d``.
:math:`G_W` is the formula (unfold, then a batched product summed over the
batch) for short patches, and the same sums otherwise: one matrix product per
kernel offset (many channels, small kernels, no groups), or one convolution
over the batch with batch and channels swapped (the rest; ``_weight_grad``):
each measured fastest where it runs, all tested equal.

The three maps are bilinear and adjoint to each other:
:math:`\langle W \star^\top G, V\rangle = \langle G, W \star V\rangle = \langle W, V \star G\rangle`
(:math:`V \star G` the weight-gradient map). So a double backward differentiates
each with the other two: when autograd records the backward (``create_graph=True``)
it applies :class:`ConvTranspose2dFunction` and :class:`Conv2dWeightFunction`,
whose own backward passes apply the three again. No derivative kernel
(``convolution_backward``) runs, at any order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from ..registry import operation
from . import recorder
from .base import ManualFunction, apply, cast, opmath, recorded, save, save_for_forward, tangent_sum
from .shape import PadFunction

__all__ = [
    "Conv1dFunction",
    "Conv2dFunction",
    "Conv2dWeightFunction",
    "ConvGeometry",
    "ConvTranspose2dFunction",
    "conv1d",
    "conv2d",
]


class ConvGeometry(NamedTuple):
    """Everything about a convolution but its tensors: how the kernel walks over the input."""

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  #: top, bottom, left, right (bottom/right one more for an even 'same')
    dilation: tuple[int, int]
    groups: int
    input_size: tuple[int, int]  #: H, W of the input (what the transposed convolution must give back)
    kernel_size: tuple[int, int]  #: k_h, k_w

    @property
    def symmetric(self) -> bool:
        top, bottom, left, right = self.padding
        return top == bottom and left == right


# ---- the three maps, computed with forward operators (no autograd) -------------------------------


def _batched(t: Tensor) -> Tensor:
    """An unbatched ``(C, H, W)`` tensor as a batch of one."""
    return t if t.dim() == 4 else t.unsqueeze(0)


def _pad_extra(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The input with the asymmetric part of an even 'same' padding (one more row/column at the end) added."""
    top, bottom, left, right = geometry.padding
    return x if geometry.symmetric else F.pad(x, (0, right - left, 0, bottom - top))


def _conv(x: Tensor, w: Tensor, geometry: ConvGeometry, bias: Tensor | None = None) -> Tensor:
    """Z = W ⋆ X + b."""
    top, _, left, _ = geometry.padding
    return F.conv2d(_pad_extra(x, geometry), w, bias, geometry.stride, (top, left), geometry.dilation, geometry.groups)


def _input_grad(g: Tensor, w: Tensor, geometry: ConvGeometry) -> Tensor:
    """G_X = W ⋆ᵀ G_Z: the transposed convolution, cut to the input's size."""
    (s_h, s_w), (top, _, left, _), (d_h, d_w) = geometry.stride, geometry.padding, geometry.dilation
    (k_h, k_w), (H, W) = geometry.kernel_size, geometry.input_size
    # conv_transpose2d's output: (Z - 1) s - 2 p + d (k - 1) + 1 + output_padding pixels
    reach_h = (g.shape[-2] - 1) * s_h - 2 * top + d_h * (k_h - 1) + 1
    reach_w = (g.shape[-1] - 1) * s_w - 2 * left + d_w * (k_w - 1) + 1
    extra = (max(H - reach_h, 0), max(W - reach_w, 0))  # rows/columns no window reaches: zero, < stride
    out = F.conv_transpose2d(g, w, None, geometry.stride, (top, left), extra, geometry.groups, geometry.dilation)
    if out.shape[-2] != H or out.shape[-1] != W:  # an even 'same' padding: drop the gradient of the extra padding
        out = F.pad(out, (0, W - out.shape[-1], 0, H - out.shape[-2]))  # (a crop, into a new tensor)
    return out


def _weight_grad(x: Tensor, g: Tensor, geometry: ConvGeometry) -> Tensor:
    """G_W = Σ_n Σ_ℓ G_Z[n, :, ℓ] X̂[n, :, ℓ]ᵀ, per group, by one of three ways to the same sums, each where it
    measured fastest: by the patches (the formula) without groups for patches of fewer than :data:`SWAP_AT`
    numbers (with groups the convolution measured 1.4-2.6x faster: depthwise 3 x 3 on 64 x 32 x 28 x 28, 89
    against 40 ms; 8 -> 16 channels in 2 groups, 11 against 4.3 ms); from there on, one product per kernel offset
    (:func:`_weight_grad_by_offsets`) without groups, from :data:`OFFSETS_AT` channels, for kernels of at most
    :data:`OFFSETS_UP_TO` positions, else as a convolution over the batch (:func:`_weight_grad_by_convolution`)."""
    x, g = _batched(x), _batched(g)
    k_h, k_w = geometry.kernel_size
    if x.shape[0] == 0:  # an empty batch: an empty sum
        return g.new_zeros(g.shape[1], x.shape[1] // geometry.groups, k_h, k_w)
    if geometry.groups == 1 and x.shape[1] * k_h * k_w < SWAP_AT:
        return _weight_grad_by_patches(x, g, geometry)
    if _by_offsets(x, geometry):
        return _weight_grad_by_offsets(x, g, geometry)
    return _weight_grad_by_convolution(x, g, geometry)


def _by_offsets(x: Tensor, geometry: ConvGeometry) -> bool:
    """Whether G_W (or each sample's) is computed by kernel offsets rather than as a convolution over the batch:
    without groups, from :data:`OFFSETS_AT` channels, for kernels of at most :data:`OFFSETS_UP_TO` positions."""
    return geometry.groups == 1 and x.shape[1] >= OFFSETS_AT and math.prod(geometry.kernel_size) <= OFFSETS_UP_TO


#: Patch length (C_g k_h k_w) below which G_W is computed by the patches. Measured (1 thread, interleaved
#: medians; batch 64, 28 x 28 inputs, 3 x 3 kernels, 32 output channels; ms by the patches, as a convolution, by
#: kernel offsets): 9 numbers (C = 1) 1.0, 1.5, 3.0; 18: 1.7, 1.9, 4.4; 36: 3.0, 2.7, 4.6; 72: 5.8, 4.3, 5.1;
#: 144: 11.9, 7.7, 5.5.
SWAP_AT = 32
#: Input channels from which, and kernel positions (k_h k_w) up to which, G_W is computed by kernel offsets,
#: without groups. Measured as above (ms by the patches, as a convolution, by kernel offsets): the MNIST conv2
#: (64 x 32 x 26 x 26, 64 outputs, 3 x 3) 35, 27, 16; 16 channels on 28 x 28, 3 x 3: 32 outputs 11.9, 7.7, 5.5,
#: 16 outputs 11.3, 4.0, 3.5; 64 x 64 x 16 x 16, 128 outputs, 3 x 3, stride 2, padding 1: 13, 12, 8.9; conv1d
#: 64 x 16 x 128, 32 outputs, k 5: 1.2, 0.68, 0.56. Not from 8 channels (above), nor for larger kernels, where
#: the convolution gains (5 x 5, 16 -> 32 channels on 28 x 28: 62, 13, 17; 7 x 7, 16 -> 64 on 32 x 32: 94, 25,
#: 41; 32 -> 64 channels: 5 x 5 146, 49, 48, 7 x 7 191, 46, 64), nor with groups, small products batched over
#: them (64 -> 64 channels on 16 x 16, 3 x 3, 4 groups: 29, 5.5, 5.9; 2 groups: 27, 10.8, 10.4; 128 -> 64,
#: 4 groups: 59, 15.8, 17.4).
OFFSETS_AT = 16
OFFSETS_UP_TO = 9


def patches(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """X̂ = unfold(X): every output position's patch of the (padded) input, ``(N, C k_h k_w, L)``."""
    top, _, left, _ = geometry.padding
    return F.unfold(_pad_extra(x, geometry), geometry.kernel_size, geometry.dilation, (top, left), geometry.stride)


def _weight_grad_by_patches(x: Tensor, g: Tensor, geometry: ConvGeometry) -> Tensor:
    """The formula: X̂ = unfold(X), (N, G, C_g k_h k_w, L); G_W[group] = Σ_n G_Z[n, group] X̂[n, group]ᵀ."""
    n, c = x.shape[:2]
    o, groups = g.shape[1], geometry.groups
    x_hat = patches(x, geometry)
    x_hat = x_hat.reshape(n, groups, -1, x_hat.shape[-1])  # (N, G, C_g k_h k_w, L)
    grads = g.reshape(n, groups, o // groups, -1)  # (N, G, O_g, L)
    return grads.matmul(x_hat.transpose(-1, -2)).sum(0).reshape(o, c // groups, *geometry.kernel_size)


def _weight_grad_by_convolution(x: Tensor, g: Tensor, geometry: ConvGeometry, per_sample: bool = False) -> Tensor:
    """The same sums as one convolution: the batch becomes the channels (what is summed), the input channels the
    batch, and G_Z the kernel, walked with the stride as dilation and the dilation as stride. With groups, each
    group's samples are its channels (``groups`` as a convolution's groups again). ``per_sample``: each sample's
    G_W[n] ``(N, O, C_g, k_h, k_w)``, not their sum: every (group, sample) its own convolution group."""
    n, c = x.shape[:2]
    o, groups = g.shape[1], geometry.groups
    k_h, k_w = geometry.kernel_size
    x = _pad_extra(x, geometry)
    top, _, left, _ = geometry.padding
    c_g, o_g = c // groups, o // groups
    inputs = x.reshape(n, groups, c_g, *x.shape[2:]).permute(2, 1, 0, 3, 4).reshape(c_g, -1, *x.shape[2:])
    if per_sample:  # kernels (G·N·O_g, 1, Z_h, Z_w): output channel (group, n, o) reads input channel (group, n)
        kernels = g.reshape(n, groups, o_g, 1, *g.shape[2:]).transpose(0, 1).reshape(-1, 1, *g.shape[2:])
        out = F.conv2d(inputs, kernels, None, geometry.dilation, (top, left), geometry.stride, groups * n)
    else:  # inputs (C_g, G·N, H, W) convolved with kernels (O, N, Z_h, Z_w): (C_g, O, ≥ k_h, ≥ k_w)
        kernels = g.reshape(n, groups, o_g, *g.shape[2:]).permute(1, 2, 0, 3, 4).reshape(o, n, *g.shape[2:])
        out = F.conv2d(inputs, kernels, None, geometry.dilation, (top, left), geometry.stride, groups)
    if out.shape[-2:] != (k_h, k_w):  # windows that would start past the last output position: not the kernel's
        out = F.pad(out, (0, k_w - out.shape[-1], 0, k_h - out.shape[-2]))
    if per_sample:  # (C_g, G·N·O_g, k_h, k_w) -> (N, O, C_g, k_h, k_w)
        out = out.reshape(c_g, groups, n, o_g, k_h, k_w).permute(2, 1, 3, 0, 4, 5).reshape(n, o, c_g, k_h, k_w)
        return out.contiguous()
    return out.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # a new tensor, not a view of out


def _weight_grad_by_offsets(x: Tensor, g: Tensor, geometry: ConvGeometry, per_sample: bool = False) -> Tensor:
    """The same sums, one kernel offset at a time. The kernel's entry (i, j) meets, at output position (h, w), the
    padded input's pixel (h s_h + i d_h, w s_w + j d_w), so (per group)

        G_W[:, :, i, j] = Σ_{n,h,w} G_Z[n, :, h, w] X_pad[n, :, h s_h + i d_h, w s_w + j d_w]ᵀ,

    one matrix product per offset. Split X_pad into its s_h s_w phases, X^{ab}[n, :, u, v] = X_pad[n, :, u s_h + a,
    v s_w + b] (H' x W' each: X_pad rounded up to whole strides), and write i d_h = q s_h + a, j d_w = r s_w + b:
    the pixel is X^{ab}[n, :, h + q, w + r]. Lay out G_Z on the H' x W' grid (zero beyond Z_h x Z_w) and flatten
    (n, h, w) into one index t = (n H' + h) W' + w: (h + q, w + r) is t + q W' + r, so

        G_W[:, :, i, j] = Σ_t Ĝ[:, t] X^{ab}[t + q W' + r]ᵀ,

    (O x T) times (T x C), the rows of X^{ab} (channels last) from q W' + r on: a view, no copy per offset. (A
    shift that runs past a row or a sample meets the zeros of Ĝ.) With groups, a batched product over them.
    ``per_sample``: each sample's G_W[n] ``(N, O, C_g, k_h, k_w)``, not their sum: t runs over one sample's
    grid, the products batched over (sample, group)."""
    n, c, height, width = x.shape
    o, groups, (z_h, z_w) = g.shape[1], geometry.groups, g.shape[2:]
    (s_h, s_w), (d_h, d_w), (k_h, k_w) = geometry.stride, geometry.dilation, geometry.kernel_size
    top, bottom, left, right = geometry.padding
    c_g, o_g = c // groups, o // groups
    samples, summed = (n, 1) if per_sample else (1, n)  # the batch: in the products' batch, or in t
    rows, columns = -(-(top + height + bottom) // s_h), -(-(left + width + right) // s_w)  # H', W'
    sides = (left, columns * s_w - left - width, top, rows * s_h - top - height)
    x_pad = F.pad(x, sides) if any(sides) else x
    phases = x_pad.reshape(samples, summed, groups, c_g, rows, s_h, columns, s_w).permute(5, 7, 0, 2, 1, 4, 6, 3)
    phases = phases.reshape(s_h, s_w, samples * groups, summed * rows * columns, c_g)  # X^{ab}: (T, C_g) each
    g_hat = g.reshape(samples, summed, groups, o_g, z_h, z_w).permute(0, 2, 3, 1, 4, 5)
    g_hat = F.pad(g_hat, (0, columns - z_w, 0, rows - z_h)).reshape(samples * groups, o_g, -1)  # Ĝ: (O_g, T) each
    length = summed * rows * columns - (k_h - 1) * d_h // s_h * columns - (k_w - 1) * d_w // s_w  # all shifts fit
    g_hat = g_hat[..., :length]  # beyond: zeros
    out = x.new_empty(samples * groups, o_g, c_g, k_h, k_w)
    for i in range(k_h):
        q, a = divmod(i * d_h, s_h)
        for j in range(k_w):
            r, b = divmod(j * d_w, s_w)
            shift = q * columns + r
            out[..., i, j] = g_hat.bmm(phases[a, b, :, shift : shift + length])
    return out.reshape(n, o, c_g, k_h, k_w) if per_sample else out.reshape(o, c_g, k_h, k_w)


# ---- the Functions --------------------------------------------------------------------------------


class Conv2dFunction(ManualFunction):
    r"""``apply(input, weight, bias, geometry)``: :math:`Z = W \star X + b`, the 2-D convolution (cross-correlation).

    Backward: :math:`G_X = W \star^\top G_Z` (``conv_transpose2d``),
    :math:`G_W = \sum_n G_Z[n] \hat X[n]^\top` (``_weight_grad``),
    :math:`G_b = \sum_{n, \ell} G_Z`, each only if ``ctx.needs_input_grad`` asks.
    It keeps ``X`` only when ``W`` needs a gradient and ``W`` only when ``X``
    does. Half-precision gradients are computed in float32 and rounded once;
    under autocast each gradient comes back in its input's dtype.

    Shape:
        - input: ``(N, C, H, W)`` or ``(C, H, W)``
        - weight: ``(O, C / groups, k_h, k_w)``; bias: ``(O,)`` or ``None``
        - output: ``(N, O, Z_h, Z_w)`` or ``(O, Z_h, Z_w)``
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry) -> Tensor:
        return _conv(input, weight, geometry, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, ctx.geometry = inputs
        needs_input, needs_weight, _ = ctx.needs_input_grad[:3]
        ctx.per_sample = recorder.layer(weight, bias)  # None unless a per_sample context tracks weight or bias
        ctx.save_for_backward(input if needs_weight or ctx.per_sample else None, weight if needs_input else None)
        save_for_forward(ctx, input, weight)
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        return (*_conv_backward(ctx, input, weight, grad_output), None)

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent, _):
        input, weight = ctx.saved_tensors
        return _conv_jvp(ctx, input, weight, input_tangent, weight_tangent, bias_tangent)


def _conv_backward(ctx, input: Tensor | None, weight: Tensor | None, grad_output: Tensor) -> tuple:
    """Conv2dFunction's backward on (possibly lifted, :func:`_lift`) tensors: (G_X, G_W, G_b)."""
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    geometry, dtypes = ctx.geometry, ctx.dtypes
    g = opmath(grad_output)
    grad_input = grad_weight = grad_bias = None
    if needs_input:  # G_X = W ⋆ᵀ G_Z
        grad_input = cast(_transposed(g, cast(weight, g.dtype), geometry), dtypes[0])
    if ctx.per_sample is not None:  # clipping: the recorder forms G_W and G_b at the end of the backward pass
        taken = _record_per_sample(ctx.per_sample, g, cast(input, g.dtype), geometry)
        needs_weight, needs_bias = needs_weight and not taken[0], needs_bias and not taken[1]
    if needs_weight:  # G_W = X ⋆ G_Z = Σ_{n,ℓ} G_Z[n,:,ℓ] X̂[n,:,ℓ]ᵀ
        grad_weight = cast(_correlated(cast(input, g.dtype), g, geometry), dtypes[1])
    if needs_bias:  # G_b = Σ_{n,ℓ} G_Z[n,:,ℓ]
        grad_bias = cast(g.sum((0, 2, 3) if g.dim() == 4 else (1, 2)), dtypes[2])
    return grad_input, grad_weight, grad_bias


def _conv_jvp(ctx, input, weight, input_tangent, weight_tangent, bias_tangent):
    """Conv2dFunction's jvp on (possibly lifted) tensors: W ⋆ Ẋ + Ẇ ⋆ X + ḃ."""
    return tangent_sum(
        None if input_tangent is None else _conv(input_tangent, weight, ctx.geometry),
        None if weight_tangent is None else _conv(input, weight_tangent, ctx.geometry),
        None if bias_tangent is None else bias_tangent.reshape(-1, 1, 1).expand(ctx.output_shape),
    )


def _lift(t: Tensor | None) -> Tensor | None:
    """A 1-D convolution's tensor ``(..., L)`` as a 2-D one of height 1, ``(..., 1, L)`` (a view)."""
    return None if t is None else t.unsqueeze(-2)


def _drop(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.squeeze(-2)


class Conv1dFunction(ManualFunction):
    r"""``Conv1dFunction.apply(input, weight, bias, geometry)``: :math:`Z = W \star X + b` over 1-D inputs:
    :class:`Conv2dFunction`'s formulas (backward, jvp, per-sample rule) on a height of 1, the tensors lifted by a
    view and the gradients dropped back.

    Shape:
        - input: ``(N, C, L)`` or ``(C, L)``
        - weight: ``(O, C / groups, k)``; bias: ``(O,)`` or ``None``
        - output: ``(N, O, Z)`` or ``(O, Z)``
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry) -> Tensor:
        return _conv(_lift(input), _lift(weight), geometry, bias).squeeze(-2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        Conv2dFunction.setup_context(ctx, inputs, output)
        ctx.output_shape = (*output.shape[:-1], 1, output.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = _conv_backward(ctx, _lift(input), _lift(weight), _lift(grad_output))
        return _drop(grad_input), _drop(grad_weight), grad_bias, None

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent, _):
        input, weight = ctx.saved_tensors
        lifted = (_lift(input), _lift(weight), _lift(input_tangent), _lift(weight_tangent), bias_tangent)
        return _drop(_conv_jvp(ctx, *lifted))


def _record_per_sample(layer, g: Tensor, x: Tensor, geometry: ConvGeometry) -> tuple[bool, bool]:
    """Per-sample quantities (:mod:`~manualgrad.functions.recorder`): sample n's G_W is G_Z[n] X̂[n]ᵀ, a Linear
    layer's over the L output positions. Where the recorder would form each G_W[n] anyway (L (O + C k_h k_w) ≥
    O C k_h k_w: small kernels, many positions), the layer hands it G_W[n] itself, no patches: by kernel
    offsets where G_W is (:func:`_by_offsets`; on the MNIST conv2, batch 64, 1 thread: 16 against 33 ms), else
    all by one grouped convolution (:func:`_weight_grad_by_convolution`; ~3x faster on the DP small CNN's first
    layer, batch 512: 5.9 against 16.6 ms for unfold and the batched product; 2.8 against 21 ms by offsets at
    batch 240). Else it hands ``G`` as ``(N, L, O)`` and the patches as ``(N, L, C k_h k_w)``, and the recorder
    takes the T x T Gram form."""
    g, x = _batched(g), _batched(x)
    positions, patch = g.shape[-2] * g.shape[-1], x.shape[1] // geometry.groups * math.prod(geometry.kernel_size)
    if len(g) and positions * (g.shape[1] + patch) >= g.shape[1] * patch:
        weights = None
        if layer.weight is not None:  # (N, *weight.shape): a Conv1d's weight has no k_h
            by = _weight_grad_by_offsets if _by_offsets(x, geometry) else _weight_grad_by_convolution
            weights = by(x, g, geometry, per_sample=True).reshape(len(g), *layer.weight.shape)
        return layer.record_samples(weights, g.sum((2, 3)) if layer.bias is not None else None)

    def weighted(c: Tensor):  # the clipped sums: X ⋆ (c ⊙ G) and Σ (c ⊙ G), no patches
        cg = g * c.reshape(-1, 1, 1, 1).to(g.dtype)
        return _weight_grad(x, cg, geometry), cg.sum((0, 2, 3))

    return layer.record(g.flatten(2).transpose(1, 2), patches(x, geometry).transpose(1, 2), weighted)


class ConvTranspose2dFunction(ManualFunction):
    r"""``apply(grad, weight, geometry)``: :math:`X = W \star^\top G`, the transposed convolution: the adjoint of
    :math:`X \mapsto W \star X` for ``geometry``, cut to its input size. :class:`Conv2dFunction`'s :math:`G_X`.

    Backward, from :math:`\langle W \star^\top G, V\rangle = \langle G, W \star V\rangle
    = \langle W, V \star G\rangle`: :math:`G_G = W \star G_X`, :math:`G_W = G_X \star G`. Forward mode:
    :math:`\dot X = W \star^\top \dot G + \dot W \star^\top G`.
    """

    @staticmethod
    def forward(grad: Tensor, weight: Tensor, geometry: ConvGeometry) -> Tensor:
        return _input_grad(grad, weight, geometry)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, weight, ctx.geometry = inputs
        save(ctx, grad, weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, weight = ctx.saved_tensors
        needs_grad, needs_weight, _ = ctx.needs_input_grad
        v = grad_output
        grad_grad = _convolved(v, weight, ctx.geometry) if needs_grad else None  # W ⋆ V
        grad_weight = _correlated(v, grad, ctx.geometry) if needs_weight else None  # V ⋆ G
        return grad_grad, grad_weight, None

    @staticmethod
    def jvp(ctx, grad_tangent, weight_tangent, _):
        grad, weight = ctx.saved_tensors
        return tangent_sum(  # W ⋆ᵀ Ġ + Ẇ ⋆ᵀ G
            None if grad_tangent is None else _input_grad(grad_tangent, weight, ctx.geometry),
            None if weight_tangent is None else _input_grad(grad, weight_tangent, ctx.geometry),
        )


class Conv2dWeightFunction(ManualFunction):
    r"""``apply(input, grad, geometry)``: :math:`X \star G`, the correlation of an input with an output gradient
    (``weight``'s shape): :class:`Conv2dFunction`'s :math:`G_W`.

    Backward (the same identities): :math:`G_X = U \star^\top G`, :math:`G_G = U \star X`
    for the incoming gradient :math:`U`. Forward mode: :math:`\dot X \star G + X \star \dot G`.
    """

    @staticmethod
    def forward(input: Tensor, grad: Tensor, geometry: ConvGeometry) -> Tensor:
        return _weight_grad(input, grad, geometry)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, grad, ctx.geometry = inputs
        save(ctx, input, grad)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, grad = ctx.saved_tensors
        needs_input, needs_grad, _ = ctx.needs_input_grad
        u = grad_output
        grad_input = _transposed(grad, u, ctx.geometry) if needs_input else None  # U ⋆ᵀ G
        grad_grad = _convolved(input, u, ctx.geometry) if needs_grad else None  # U ⋆ X
        return grad_input, grad_grad, None

    @staticmethod
    def jvp(ctx, input_tangent, grad_tangent, _):
        input, grad = ctx.saved_tensors
        return tangent_sum(  # Ẋ ⋆ G + X ⋆ Ġ
            None if input_tangent is None else _weight_grad(input_tangent, grad, ctx.geometry),
            None if grad_tangent is None else _weight_grad(input, grad_tangent, ctx.geometry),
        )


# inside a backward: the map itself, or, when a double backward records it, the Function computing it
_transposed = recorded(_input_grad, ConvTranspose2dFunction)  # W ⋆ᵀ G
_correlated = recorded(_weight_grad, Conv2dWeightFunction)  # X ⋆ G, the weight gradient's map
_convolved = recorded(_conv, lambda x, w, geometry: apply(Conv2dFunction, x, w, None, geometry))  # W ⋆ X


def _geometry(input: Tensor, weight: Tensor, bias, stride, padding, dilation, groups, layer="conv2d") -> ConvGeometry:
    """Check a conv2d call (:func:`manualgrad._checks.conv2d`) and describe it."""
    stride, sides, dilation = _checks.conv2d(input, weight, bias, stride, padding, dilation, groups, layer)
    return ConvGeometry(stride, sides, dilation, groups, tuple(input.shape[-2:]), tuple(weight.shape[2:]))


# ---- the operation --------------------------------------------------------------------------------


def _module_forward(self: torch.nn.Conv2d, input: Tensor) -> Tensor:
    """``torch.nn.Conv2d.forward``: a ``padding_mode`` other than ``'zeros'`` pads first (our :class:`PadFunction`,
    as torch pads with ``F.pad``), then convolves without padding."""
    if self.padding_mode != "zeros":
        input = PadFunction.pad(input, self._reversed_padding_repeated_twice, self.padding_mode, layer="Conv2d")
        return conv2d(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
    return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@operation(torch.nn.Conv2d, Conv2dFunction, kind="layer", module_forward=_module_forward, per_sample=True)
def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1):
    r""":math:`Z = W \star X + b` over 2-D inputs; see :class:`~manualgrad.functions.Conv2dFunction`.

    Shape: input ``(N, C, H, W)`` or ``(C, H, W)``, weight ``(O, C / groups, k_h, k_w)``,
    bias ``(O,)``. ``padding``: an int, a pair, ``'valid'`` or ``'same'``
    (stride 1; an even dilated kernel pads one more row/column at the end, as torch does).
    """
    geometry = _geometry(input, weight, bias, stride, padding, dilation, groups)
    return apply(Conv2dFunction, input, weight, bias, geometry)


def _conv1d_module_forward(self: torch.nn.Conv1d, input: Tensor) -> Tensor:
    """``torch.nn.Conv1d.forward``: a ``padding_mode`` other than ``'zeros'`` pads first, then convolves."""
    if self.padding_mode != "zeros":
        input = PadFunction.pad(input, self._reversed_padding_repeated_twice, self.padding_mode, layer="Conv1d")
        return conv1d(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
    return conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@operation(
    torch.nn.Conv1d,
    Conv1dFunction,
    kind="layer",
    module_forward=_conv1d_module_forward,
    per_sample=True,
)
def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1):
    r""":math:`Z = W \star X + b` over 1-D inputs; see :class:`~manualgrad.functions.Conv1dFunction`.

    Shape: input ``(N, C, L)`` or ``(C, L)``, weight ``(O, C / groups, k)``, bias ``(O,)``. ``padding``: an int, a
    1-tuple, ``'valid'`` or ``'same'``.
    """
    stride, padding, dilation = _checks.conv1d(input, weight, stride, padding, dilation)
    geometry = _geometry(_lift(input), _lift(weight), bias, stride, padding, dilation, groups, layer="conv1d")
    return apply(Conv1dFunction, input, weight, bias, geometry)
