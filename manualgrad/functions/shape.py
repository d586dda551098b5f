r"""Maps that only move numbers: reshaping (``flatten``, ``unflatten``) and padding.

Reshape. :math:`Y = \operatorname{reshape}(X)` keeps every number and its
order in memory: as vectors, :math:`\operatorname{vec} Y = \operatorname{vec} X`,
so the Jacobian is the identity and

.. math::

    G_X = \operatorname{reshape}(G_Y, \text{shape of } X) \qquad
    \dot Y = \operatorname{reshape}(\dot X, \text{shape of } Y)

Padding (``PadFunction``, what ``torch.nn.Conv2d`` does for ``padding_mode``
``'reflect'``, ``'replicate'`` and ``'circular'``). Every mode copies each
output pixel from one input pixel (or writes the constant), row by row and
column by column, so per channel :math:`Y = P_h X P_w^\top (+ \text{the constant})`,
:math:`P_h` an :math:`(H + t + b) \times H` matrix of zeros with one 1 per
row whose source pixel is an input pixel (none for a constant-padded row). So

.. math::

    G_X = P_h^\top G_Y P_w \qquad \dot Y = P_h \dot X P_w^\top

:math:`P^\top` adds each padded pixel's gradient back onto the pixel it copies.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from ..errors import InputError
from ..registry import operation
from .base import ManualFunction, apply, cast, opmath

__all__ = ["PadFunction", "ReshapeFunction", "flatten", "unflatten"]


class ReshapeFunction(ManualFunction):
    r"""``apply(input, shape)``: :math:`Y = X` with another shape (a new tensor, not a view of ``input``).

    Backward: :math:`G_X = G_Y` reshaped to the input's shape. Forward mode:
    :math:`\dot Y = \dot X` reshaped. The output is a copy: autograd forbids
    modifying in place a view made inside a custom Function, and torch code
    does modify flattened tensors in place (``ReLU(inplace=True)``).
    """

    @staticmethod
    def forward(input: Tensor, shape: tuple[int, ...]) -> Tensor:
        return input.reshape(shape).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape
        ctx.output_shape = output.shape

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return grad_output.reshape(ctx.input_shape), None  # G_X = G_Y, reshaped

    @staticmethod
    def jvp(ctx, input_tangent, _):
        return input_tangent.reshape(ctx.output_shape)  # Ẏ = Ẋ, reshaped


def _dim(layer: str, name: str, dim, ndim: int) -> int:
    """``dim`` wrapped into ``[0, ndim)`` (a 0-d tensor counts as 1-d, as torch counts it)."""
    ndim = max(ndim, 1)
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        raise IndexError(
            f"{layer}: {name} {dim!r} is out of range for a {ndim}-d input (expected [{-ndim}, {ndim - 1}])"
        )
    return dim % ndim


@operation(torch.nn.Flatten, ReshapeFunction, kind="layer")
def flatten(input: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    r"""Dimensions ``start_dim`` to ``end_dim`` merged into one; see :class:`~manualgrad.functions.ReshapeFunction`.

    A 0-d input becomes 1-d, as in torch. The result is a new tensor, not a view of ``input`` (an integer
    input, which has no gradient, gets torch's own view).
    """
    _checks.tensor("flatten", "input", input)
    if not input.is_floating_point() and not input.is_complex():  # no gradient to write: torch's own view
        return torch.flatten(input, start_dim, end_dim)
    _checks.real_floating("flatten", "input", input)
    start = _dim("flatten", "start_dim", start_dim, input.dim())
    end = _dim("flatten", "end_dim", end_dim, input.dim())
    if start > end:
        raise InputError(
            f"flatten: start_dim {start_dim} comes after end_dim {end_dim} (input shape {tuple(input.shape)})"
        )
    shape = tuple(input.shape)
    merged = (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])
    return apply(ReshapeFunction, input, merged)


def _unflatten_module_forward(self: torch.nn.Unflatten, input: Tensor) -> Tensor:
    """``torch.nn.Unflatten.forward``: the module keeps ``sizes`` as ``unflattened_size``."""
    return unflatten(input, self.dim, self.unflattened_size)


@operation(
    torch.nn.Unflatten,
    ReshapeFunction,
    kind="layer",
    module_forward=_unflatten_module_forward,
)
def unflatten(input: Tensor, dim: int, sizes) -> Tensor:
    r"""Dimension ``dim`` split into ``sizes`` (one may be -1); see :class:`~manualgrad.functions.ReshapeFunction`.

    The result is a new tensor, not a view of ``input`` (an integer input: torch's own view).
    """
    layer = "unflatten"
    _checks.tensor(layer, "input", input)
    if not input.is_floating_point() and not input.is_complex():  # no gradient to write: torch's own view
        return torch.unflatten(input, dim, sizes)
    _checks.real_floating(layer, "input", input)
    if input.dim() == 0:
        raise InputError(f"{layer}: a 0-d input has no dimension to unflatten")
    d = _dim(layer, "dim", dim, input.dim())
    if not isinstance(sizes, Sequence) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise InputError(f"{layer}: sizes must be a sequence of ints, got {sizes!r}")
    sizes = tuple(sizes)
    known = math.prod([s for s in sizes if s != -1])
    size = input.shape[d]
    if not sizes or sizes.count(-1) > 1 or min(sizes) < -1:
        raise InputError(f"{layer}: sizes {sizes} must be non-negative, with at most one -1")
    if (-1 not in sizes and known != size) or (-1 in sizes and (known == 0 or size % known)):
        raise InputError(
            f"{layer}: sizes {sizes} do not multiply up to the size of dim {dim} ({size}) of the input "
            f"(shape {tuple(input.shape)})"
        )
    if -1 in sizes:
        sizes = tuple(size // known if s == -1 else s for s in sizes)
    shape = tuple(input.shape)
    return apply(ReshapeFunction, input, (*shape[:d], *sizes, *shape[d + 1 :]))


# ---- padding ---------------------------------------------------------------------------------------

_MODES = ("constant", "reflect", "replicate", "circular")


def _sources(size: int, before: int, after: int, mode: str) -> list[int]:
    """For each padded position, the input position it copies (-1: the constant)."""
    out = []
    for i in range(-before, size + after):
        if 0 <= i < size:
            out.append(i)
        elif mode == "constant":
            out.append(-1)
        elif mode == "reflect":  # ... x2 x1 | x0 x1 x2 ... (the edge is not repeated)
            out.append(-i if i < 0 else 2 * (size - 1) - i)
        elif mode == "replicate":  # x0 x0 | x0 x1 ...
            out.append(min(max(i, 0), size - 1))
        else:  # circular: ... x_{n-1} | x0 x1 ...
            out.append(i % size)
    return out


def _matrix(sources: list[int], size: int, like: Tensor) -> Tensor:
    """P (padded x size): P[i, sources[i]] = 1."""
    rows = torch.tensor(sources, device=like.device)
    return (rows.unsqueeze(1) == torch.arange(size, device=like.device)).to(like.dtype)


class SeparableMap(ManualFunction):
    r"""Base of the maps :math:`Y = P_h X P_w^\top` of the last two dimensions, channel by channel (padding,
    average pooling): :math:`G_X = P_h^\top G_Y P_w` and :math:`\dot Y = P_h \dot X P_w^\top`. A subclass
    defines ``forward`` (input first, then its options), ``setup_context`` and ``matrices(ctx, like)``:
    :math:`(P_h, P_w)` in ``like``'s dtype, on its device."""

    @staticmethod
    def matrices(ctx, like: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        # Bound to this subclass's matrices as closures (as Elementwise does).
        options = (None,) * (len(inspect.signature(cls.forward).parameters) - 1)

        def backward(ctx, grad_output: Tensor):
            g = opmath(grad_output)
            p_h, p_w = cls.matrices(ctx, g)
            if p_h.shape[0] == p_w.shape[0] == 1:  # a 1 x 1 output (a global average): P_hᵀ G_Y P_w = G_Y (p_hᵀ p_w)
                return (cast(g * (p_h.t() * p_w), grad_output.dtype), *options)
            return (cast(p_h.t().matmul(g).matmul(p_w), grad_output.dtype), *options)  # G_X = P_hᵀ G_Y P_w

        def jvp(ctx, input_tangent, *_):
            p_h, p_w = cls.matrices(ctx, input_tangent)
            return p_h.matmul(input_tangent).matmul(p_w.t())  # Ẏ = P_h Ẋ P_wᵀ

        cls.backward = staticmethod(backward)
        if "jvp" not in cls.__dict__:  # the compile twin keeps its default jvp
            cls.jvp = staticmethod(jvp)
        super().__init_subclass__(**kwargs)


class PadFunction(SeparableMap):
    r"""``apply(input, pad, mode, value)``: ``F.pad`` of the last two dimensions,
    ``pad = (left, right, top, bottom)``: :math:`Y = P_h X P_w^\top` (+ the constant).

    Backward: :math:`G_X = P_h^\top G_Y P_w` (each padded pixel's gradient added
    onto its source pixel). Forward mode: :math:`\dot Y = P_h \dot X P_w^\top`.
    Not an operation of the registry (``manualgrad.functional.pad`` is torch's);
    :class:`manualgrad.nn.Conv2d` pads with it for its ``padding_mode``.
    """

    @staticmethod
    def forward(input: Tensor, pad: tuple[int, int, int, int], mode: str, value: float) -> Tensor:
        return F.pad(input, pad, mode, value if mode == "constant" else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.pad, ctx.mode, _ = inputs
        ctx.input_size = tuple(input.shape[-2:])

    @staticmethod
    def matrices(ctx, like: Tensor) -> tuple[Tensor, Tensor]:
        left, right, top, bottom = ctx.pad
        H, W = ctx.input_size
        p_h = _matrix(_sources(H, top, bottom, ctx.mode), H, like)
        p_w = _matrix(_sources(W, left, right, ctx.mode), W, like)
        return p_h, p_w

    @staticmethod
    def pad(input: Tensor, pad: Sequence[int], mode: str = "constant", value: float = 0.0, layer: str = "pad"):
        """Check and apply: ``input`` (N, C, H, W) or (C, H, W), ``pad`` four non-negative ints (reflect: each
        smaller than its dimension; circular: at most its dimension), as ``F.pad`` takes them."""
        _checks.real_floating(layer, "input", input)
        _checks.choice(layer, "padding_mode", mode, _MODES)
        pad = tuple(pad)
        if len(pad) != 4 or not all(isinstance(p, int) and p >= 0 for p in pad):
            raise InputError(f"{layer}: pad must be four non-negative ints (left, right, top, bottom), got {pad}")
        if input.dim() not in (3, 4):
            raise InputError(f"{layer}: input must be (N, C, H, W) or (C, H, W) to pad, got shape {tuple(input.shape)}")
        H, W = input.shape[-2:]
        limit = {"reflect": (H - 1, W - 1), "circular": (H, W)}.get(mode)
        if limit is not None and (max(pad[2:]) > limit[0] or max(pad[:2]) > limit[1]):
            raise InputError(
                f"{layer}: {mode} padding {pad} is too large for an input of shape {tuple(input.shape)} "
                f"(at most {limit[1]} left/right and {limit[0]} top/bottom)"
            )
        return apply(PadFunction, input, pad, mode, float(value))
