r"""2-D pooling: max pooling routes each gradient to its window's arg-max; average pooling is a linear map.

Max pooling (``docs/derivations.md``, "Pooling"). Each output is one input
pixel, :math:`y_j = x_{i_j}` with :math:`i_j` its window's arg-max (the index
PyTorch's forward returns, so ties and NaN go where PyTorch sends them). The
Jacobian has a single 1 per row, at :math:`(j, i_j)`; a row vector times it
adds every :math:`G_{Y,j}` onto pixel :math:`i_j` (windows may overlap):

.. math::

    G_X = \operatorname{scatter\_add}(0, I, G_Y) \qquad \dot Y = \dot X[I]

per sample and channel, over the flattened ``H·W`` pixels (``gather`` is the
forward, ``scatter_add`` its transpose; neither has a derivative kernel).

Average pooling. Each window is a rectangle and its divisor a product of a
row count and a column count, so per channel :math:`Y = A_h X A_w^\top` with
:math:`A_h[i, j] = 1/d_h(i)` when row :math:`j` lies in window row :math:`i`
(clipped to the input; :math:`d_h` its length, with or without the padding,
or 1 with ``divisor_override``, which then divides once). Adaptive pooling is
the same with windows :math:`[\lfloor iH/H_o\rfloor, \lceil (i+1)H/H_o\rceil)`.
The map is linear, so

.. math::

    G_X = A_h^\top G_Y A_w \qquad \dot Y = A_h \dot X A_w^\top
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _compat
from ..errors import InputError
from ..registry import operation
from .base import ManualFunction, apply, cast, opmath, save
from .shape import SeparableMap

__all__ = [
    "AdaptiveAvgPool2dFunction",
    "AvgPool2dFunction",
    "MaxPool2dFunction",
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "max_pool2d",
]


# ---- max pooling ----------------------------------------------------------------------------------


def _pixels(t: Tensor) -> Tensor:
    """``(..., H, W)`` -> ``(..., H·W)``: each channel's pixels in one row (the indices' numbering)."""
    return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])


class MaxPool2dFunction(ManualFunction):
    r"""``apply(input, kernel_size, stride, padding, dilation, ceil_mode)`` → ``(output, indices)``: max pooling.

    Forward: PyTorch's ``max_pool2d`` with its arg-max indices :math:`I` (into
    each channel's flattened ``H·W`` pixels; not differentiable). Backward:
    :math:`G_X = \operatorname{scatter\_add}(I, G_Y)`, each gradient added onto
    its arg-max. Forward mode: :math:`\dot Y = \dot X[I]`. Keeps only :math:`I`.

    Shape: input ``(N, C, H, W)`` or ``(C, H, W)``; output and indices ``(N, C, H_o, W_o)`` or ``(C, H_o, W_o)``.
    """

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return _torch_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input = inputs[0]
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        save(ctx, indices)
        ctx.input_shape = input.shape

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:
            return (None,) * 6
        (indices,) = ctx.saved_tensors
        g = _pixels(opmath(grad_output))
        zeros = g.new_zeros(*ctx.input_shape[:-2], ctx.input_shape[-2] * ctx.input_shape[-1])
        grad_input = zeros.scatter_add(-1, _pixels(indices), g)  # G_X = scatter_add(I, G_Y)
        return cast(grad_input.reshape(ctx.input_shape), grad_output.dtype), None, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        (indices,) = ctx.saved_tensors
        return _pixels(input_tangent).gather(-1, _pixels(indices)).reshape(indices.shape), None  # Ẏ = Ẋ[I]


def _torch_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """PyTorch's ``max_pool2d`` with its indices. A contiguous batch of images on the CPU goes through PyTorch's
    channels-last kernel and back: its channels-first CPU kernel is many times slower on small maps (1 thread,
    512 x 16 x 13 x 13, 2 x 2 stride 1: ~79 ms against ~4 ms with both conversions), the same values and indices
    (ties and NaN included: tests/test_pooling_speed.py). Not under vmap or compile, which choose their own."""
    cpu_images = input.device.type == "cpu" and input.dim() == 4 and input.shape[1] > 1
    if cpu_images and not _compat.traced(input) and input.is_contiguous():
        pooled = F.max_pool2d(
            input.contiguous(memory_format=torch.channels_last),
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode=ceil_mode,
            return_indices=True,
        )
        return tuple(t.contiguous() for t in pooled)
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size: ⌊(H + 2p − d(k − 1) − 1 [+ s − 1]) / s⌋ + 1, less one when ceil_mode would
    start the last window in the right padding."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_geometry(layer, input, kernel_size, stride, padding, dilation, ceil_mode):
    """Check a pooling call as torch does (with the shapes named) and return its numbers and output size."""
    if input.dim() not in (3, 4) or input.shape[-1] == 0 or input.shape[-2] == 0 or input.shape[-3] == 0:
        raise InputError(
            f"{layer}: input must be (N, C, H, W) or (C, H, W) with non-zero C, H, W, got shape {tuple(input.shape)}"
        )
    kernel = _checks.pair(layer, "kernel_size", kernel_size, minimum=1)
    stride = (
        kernel
        if stride is None or (isinstance(stride, Sequence) and not stride)
        else _checks.pair(layer, "stride", stride, minimum=1)
    )
    padding = _checks.pair(layer, "padding", padding, minimum=0)
    dilation = _checks.pair(layer, "dilation", dilation, minimum=1)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise InputError(f"{layer}: padding {padding} must be at most half the kernel size {kernel}")
    size = tuple(input.shape[-2:])
    out = tuple(_output_size(*a, ceil_mode) for a in zip(size, kernel, stride, padding, dilation))
    if min(out) < 1:
        raise InputError(
            f"{layer}: the output would be {out[0]} x {out[1]} for input shape {tuple(input.shape)} "
            f"(kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}): too small"
        )
    return kernel, stride, padding, dilation, out


@operation(torch.nn.MaxPool2d, MaxPool2dFunction, kind="layer")
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    r"""The maximum of each window; see :class:`~manualgrad.functions.MaxPool2dFunction`.

    ``return_indices=True`` returns ``(output, indices)`` as torch does (the
    indices into each channel's flattened ``H·W``). An integer input has no
    gradient: torch's own op computes it.
    """
    layer = "max_pool2d"
    _checks.tensor(layer, "input", input)
    if not input.is_floating_point() and not input.is_complex():
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    _checks.real_floating(layer, "input", input)
    kernel, stride, padding, dilation, _ = _pool_geometry(
        layer, input, kernel_size, stride, padding, dilation, ceil_mode
    )
    output, indices = apply(MaxPool2dFunction, input, kernel, stride, padding, dilation, bool(ceil_mode))
    return (output, indices) if return_indices else output


# ---- average pooling: Y = A_h X A_wᵀ ---------------------------------------------------------------


def _windows_matrix(windows: list[tuple[int, int, float]], size: int, like: Tensor) -> Tensor:
    """A (len(windows) x size): row i is w_i on columns [start_i, end_i), zero elsewhere."""
    rows = [[weight if start <= j < end else 0.0 for j in range(size)] for start, end, weight in windows]
    return torch.tensor(rows, dtype=like.dtype, device=like.device).reshape(len(windows), size)


class _SeparablePool(SeparableMap):
    """A pooling :math:`Y = A_h X A_w^\top` per channel; ``setup_context`` stores the windows of :math:`A_h, A_w`."""

    @staticmethod
    def matrices(ctx, like: Tensor) -> tuple[Tensor, Tensor]:
        (rows, height), (columns, width) = ctx.windows
        return _windows_matrix(rows, height, like), _windows_matrix(columns, width, like)


def _avg_windows(size, out, kernel, stride, padding, count_include_pad, divisor):
    """PyTorch's average-pooling windows along one dimension, as (start, end, 1 / divisor) clipped to the input."""
    windows = []
    for i in range(out):
        start = i * stride - padding
        end = min(start + kernel, size + padding)
        with_padding = end - start
        start, end = max(start, 0), min(end, size)
        d = divisor if divisor is not None else with_padding if count_include_pad else end - start
        windows.append((start, end, 1.0 / d if end > start else 0.0))
    return windows


class AvgPool2dFunction(_SeparablePool):
    r"""``apply(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)``:
    :math:`Y = A_h X A_w^\top`, the average of each window.

    Backward: :math:`G_X = A_h^\top G_Y A_w`: each output's gradient spread
    evenly (divided by its divisor) over its window. Forward mode :math:`\dot Y = A_h \dot X A_w^\top`.
    Keeps nothing but the window bounds.
    """

    @staticmethod
    def forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel, stride, padding, _, count_include_pad, divisor = inputs
        (H, W), (out_h, out_w) = input.shape[-2:], output.shape[-2:]
        rows = _avg_windows(H, out_h, kernel[0], stride[0], padding[0], count_include_pad, divisor)
        columns = _avg_windows(
            W, out_w, kernel[1], stride[1], padding[1], count_include_pad, None if divisor is None else 1
        )
        ctx.windows = ((rows, H), (columns, W))


@operation(torch.nn.AvgPool2d, AvgPool2dFunction, kind="layer")
def avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    r"""The mean of each window; see :class:`~manualgrad.functions.AvgPool2dFunction`."""
    layer = "avg_pool2d"
    _checks.tensor(layer, "input", input)
    if not input.is_floating_point() and not input.is_complex():
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    _checks.real_floating(layer, "input", input)
    kernel, stride, padding, _, _ = _pool_geometry(layer, input, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and (not isinstance(divisor_override, int) or divisor_override == 0):
        raise InputError(f"{layer}: divisor_override must be a non-zero int, got {divisor_override!r}")
    options = (kernel, stride, padding, bool(ceil_mode), bool(count_include_pad), divisor_override)
    return apply(AvgPool2dFunction, input, *options)


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int, float]]:
    """Window i: [⌊iH/H_o⌋, ⌈(i+1)H/H_o⌉), averaged."""
    windows = []
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        windows.append((start, end, 1.0 / (end - start)))
    return windows


class AdaptiveAvgPool2dFunction(_SeparablePool):
    r"""``apply(input, output_size)``: :math:`Y = A_h X A_w^\top`, the mean of each adaptive window
    :math:`[\lfloor iH/H_o\rfloor, \lceil (i+1)H/H_o\rceil)`.

    Backward: :math:`G_X = A_h^\top G_Y A_w`. Forward mode :math:`\dot Y = A_h \dot X A_w^\top`.
    """

    @staticmethod
    def forward(input, output_size):
        return F.adaptive_avg_pool2d(input, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, (out_h, out_w) = inputs
        H, W = input.shape[-2:]
        ctx.windows = ((_adaptive_windows(H, out_h), H), (_adaptive_windows(W, out_w), W))


@operation(torch.nn.AdaptiveAvgPool2d, AdaptiveAvgPool2dFunction, kind="layer")
def adaptive_avg_pool2d(input, output_size):
    r"""The mean of each adaptive window; see :class:`~manualgrad.functions.AdaptiveAvgPool2dFunction`.

    ``output_size``: an int, or a pair whose ``None`` entries keep the input's size.
    """
    layer = "adaptive_avg_pool2d"
    _checks.tensor(layer, "input", input)
    if input.dim() not in (3, 4) or input.shape[-1] == 0 or input.shape[-2] == 0:
        raise InputError(
            f"{layer}: input must be (N, C, H, W) or (C, H, W) with non-zero H, W, got shape {tuple(input.shape)}"
        )
    if not input.is_floating_point() and not input.is_complex():
        return F.adaptive_avg_pool2d(input, output_size)
    _checks.real_floating(layer, "input", input)
    sizes = tuple(output_size) if isinstance(output_size, Sequence) else (output_size, output_size)
    if len(sizes) != 2 or not all(s is None or (isinstance(s, int) and s >= 0) for s in sizes):
        raise InputError(f"{layer}: output_size must be an int or a pair of ints or None, got {output_size!r}")
    sizes = tuple(input.shape[-2 + i] if s is None else s for i, s in enumerate(sizes))
    return apply(AdaptiveAvgPool2dFunction, input, sizes)
