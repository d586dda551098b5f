r"""Layer and group normalisation: standardise each sample's slice, then an elementwise affine map.

Over one slice of :math:`M` entries (LayerNorm: the trailing ``normalized_shape``; GroupNorm: one group's
channels and positions), :math:`\hat x = (x - \mu)\, r` with :math:`r = 1/\sqrt{\sigma^2 + \epsilon}`, and
:math:`y = \gamma \odot \hat x + \beta`. With :math:`G_{\hat x} = G_Y \odot \gamma` and :math:`\langle\cdot\rangle`
the slice's mean:

.. math::

    G_X = r\,\big(G_{\hat x} - \langle G_{\hat x}\rangle - \hat x\,\langle G_{\hat x} \odot \hat x\rangle\big)
    \qquad G_\gamma = \textstyle\sum G_Y \odot \hat x \qquad G_\beta = \sum G_Y

(the sums over everything :math:`\gamma` is broadcast along), and in forward mode
:math:`\dot{\hat x} = r(\dot x - \langle\dot x\rangle - \hat x \langle \hat x \dot x\rangle)`,
:math:`\dot Y = \gamma \odot \dot{\hat x} + \dot\gamma \odot \hat x + \dot\beta`.

Per sample (:mod:`~manualgrad.functions.recorder`), sample n's :math:`g_{\gamma,n}` and :math:`g_{\beta,n}` are the
same sums over its own rows only: small tensors, recorded as they are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from ..errors import InputError
from ..registry import operation
from . import fused, recorder
from .base import ManualFunction, apply, cast, opmath, save, tangent_sum

__all__ = ["GroupNormFunction", "LayerNormFunction", "group_norm", "layer_norm"]


def _standardized(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x̂ and r over the last dimension of ``x`` (slices as rows), in plain arithmetic."""
    centred = x - x.mean(-1, keepdim=True)
    r = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    return (centred * r if centred.requires_grad else centred.mul_(r)), r


def _through(g: Tensor, x_hat: Tensor, r: Tensor, g_x_hat: Tensor | None = None) -> Tensor:
    """r (g − ⟨g⟩ − x̂ ⟨g ⊙ x̂⟩) over the last dimension: G_X from G_x̂ (and ẋ̂ from ẋ); ``g_x_hat``: g ⊙ x̂ if
    already formed."""
    g_x_hat = g * x_hat if g_x_hat is None else g_x_hat
    centred = torch.addcmul(g - g.mean(-1, keepdim=True), x_hat, g_x_hat.mean(-1, keepdim=True), value=-1)
    return centred.mul_(r) if not centred.requires_grad else centred * r


def _one_pass(g: Tensor, x: Tensor, w: Tensor | None, eps: float, rows_shape: tuple) -> tuple[Tensor, Tensor]:
    """G_X and x̂ from G_Y, X and γ, the slices of shape ``rows_shape``: the backward's formulas, for
    :func:`manualgrad.fused_backward` to compile into one pass."""
    x_hat, r = _standardized(x.reshape(rows_shape), eps)
    g_hat = (g if w is None else g * w).reshape(rows_shape)  # G_x̂ = G_Y ⊙ γ
    return _through(g_hat, x_hat, r).reshape(x.shape), x_hat.reshape(x.shape)


class _Normalization(ManualFunction):
    """The shared backward and jvp; a subclass says how its input is cut into slices and how γ broadcasts."""

    #: whether manualgrad.fused_backward compiles G_X (measured, 1 thread: LayerNorm 64×128×256 forward + backward
    #: 6.2× → 2.2× native; GroupNorm 64×32×16×16, 8 groups, 3.3× → 14.8×: inductor's loop over the groups is slow)
    compiles_well = False

    @staticmethod
    def slices(ctx, t: Tensor) -> Tensor:  # (..., M): one slice per row
        raise NotImplementedError

    @staticmethod
    def affine_shape(ctx) -> tuple:  # γ's shape for broadcasting against the input
        raise NotImplementedError

    @staticmethod
    def _parts(cls, ctx, input: Tensor):
        x = opmath(input)
        x_hat, r = _standardized(cls.slices(ctx, x), ctx.eps)
        return x_hat.reshape(x.shape), r, x_hat

    @staticmethod
    def _backward(cls, ctx, grad_output: Tensor):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]
        g = opmath(grad_output)
        w = None if weight is None else cast(weight, g.dtype).reshape(cls.affine_shape(ctx))
        grad_input = grad_weight = grad_bias = None
        one_pass = None
        if needs_input and fused.wanted() and cls.compiles_well:  # (after wanted(): Dynamo cannot read the flag)
            one_pass = fused.run(cls, _one_pass, g, opmath(input), w, ctx.eps, tuple(cls.slices(ctx, g).shape))
        if one_pass is not None:  # manualgrad.fused_backward: G_X and x̂ compiled, the same formulas
            grad_input, x_hat = one_pass
            grad_input, g_x = cast(grad_input, input.dtype), g * x_hat
        else:
            x_hat, r, x_hat_rows = _Normalization._parts(cls, ctx, input)
            g_x = g * x_hat  # G_Y ⊙ x̂: G_γ's terms
        if needs_input and one_pass is None:
            g_hat, g_hat_x = (g, g_x) if w is None else (g * w, g_x * w)  # G_x̂ = G_Y ⊙ γ
            rows = _through(cls.slices(ctx, g_hat), x_hat_rows, r, cls.slices(ctx, g_hat_x))
            grad_input = cast(rows.reshape(input.shape), input.dtype)
        if ctx.per_sample is not None:  # sample n's G_γ and G_β: the same sums over its own rows
            per = ctx.per_sample
            weight_grads = cls.reduce(ctx, g_x, samples=True) if per.weight is not None else None
            bias_grads = cls.reduce(ctx, g, samples=True) if per.bias is not None else None
            taken = per.record_samples(weight_grads, bias_grads)
            needs_weight, needs_bias = needs_weight and not taken[0], needs_bias and not taken[1]
        if needs_weight:  # G_γ = Σ G_Y ⊙ x̂
            grad_weight = cast(cls.reduce(ctx, g_x), weight.dtype)
        if needs_bias:  # G_β = Σ G_Y
            grad_bias = cast(cls.reduce(ctx, g), ctx.dtype)
        return grad_input, None, grad_weight, grad_bias, None

    @staticmethod
    def _jvp(cls, ctx, input_tangent, weight_tangent, bias_tangent):
        input, weight = ctx.saved_tensors
        x_hat, r, x_hat_rows = _Normalization._parts(cls, ctx, input)
        shape = cls.affine_shape(ctx)
        dot = None
        if input_tangent is not None:  # γ ⊙ ẋ̂
            dot = _through(cls.slices(ctx, cast(input_tangent, x_hat.dtype)), x_hat_rows, r).reshape(x_hat.shape)
            dot = dot if weight is None else dot * cast(weight, dot.dtype).reshape(shape)
        tangent = tangent_sum(  # γ ⊙ ẋ̂ + γ̇ ⊙ x̂ + β̇
            dot,
            None if weight_tangent is None else cast(weight_tangent, x_hat.dtype).reshape(shape) * x_hat,
            None if bias_tangent is None else cast(bias_tangent, x_hat.dtype).reshape(shape).expand(x_hat.shape),
        )
        return cast(tangent, input.dtype)

    @staticmethod
    def _setup(ctx, input, weight, bias, eps):
        ctx.eps = eps
        ctx.dtype = None if bias is None else bias.dtype  # G_β's
        ctx.per_sample = recorder.layer(weight, bias) if input.dim() > 1 else None
        save(ctx, input, weight)


class LayerNormFunction(_Normalization):
    r"""``apply(input, normalized_shape, weight, bias, eps)``: :math:`y = \gamma \odot \hat x + \beta`, :math:`\hat x`
    standardised over the trailing ``normalized_shape``; see the module docstring.

    Shape: input ``(*, *normalized_shape)``; weight and bias ``normalized_shape`` or None; output as input.
    """

    compiles_well = True

    @staticmethod
    def forward(input, normalized_shape, weight, bias, eps):
        return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.normalized_shape, weight, bias, eps = inputs
        _Normalization._setup(ctx, input, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_output):
        return _Normalization._backward(LayerNormFunction, ctx, grad_output)

    @staticmethod
    def jvp(ctx, input_tangent, _, weight_tangent, bias_tangent, __):
        return _Normalization._jvp(LayerNormFunction, ctx, input_tangent, weight_tangent, bias_tangent)

    @staticmethod
    def slices(ctx, t):
        return t.reshape(*t.shape[: t.dim() - len(ctx.normalized_shape)], math.prod(ctx.normalized_shape))

    @staticmethod
    def affine_shape(ctx):
        return tuple(ctx.normalized_shape)

    @staticmethod
    def reduce(ctx, t: Tensor, samples: bool = False) -> Tensor:
        """Σ over the leading (non-normalised) dimensions; per sample: all but dim 0."""
        lead = t.dim() - len(ctx.normalized_shape)
        if samples:
            return t.sum(tuple(range(1, lead))) if lead > 1 else t
        return t.sum(tuple(range(lead))) if lead else t


class GroupNormFunction(_Normalization):
    r"""``apply(input, num_groups, weight, bias, eps)``: each sample's channels in ``num_groups`` groups, each
    group standardised over its channels and positions; then per channel :math:`\gamma_c \hat x + \beta_c`.

    Shape: input ``(N, C, *)``; weight and bias ``(C,)`` or None; output as input.
    """

    @staticmethod
    def forward(input, num_groups, weight, bias, eps):
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.num_groups, weight, bias, eps = inputs
        ctx.channels, ctx.input_dim = input.shape[1], input.dim()
        _Normalization._setup(ctx, input, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_output):
        return _Normalization._backward(GroupNormFunction, ctx, grad_output)

    @staticmethod
    def jvp(ctx, input_tangent, _, weight_tangent, bias_tangent, __):
        return _Normalization._jvp(GroupNormFunction, ctx, input_tangent, weight_tangent, bias_tangent)

    @staticmethod
    def slices(ctx, t):
        return t.reshape(t.shape[0], ctx.num_groups, math.prod(t.shape[1:]) // ctx.num_groups)

    @staticmethod
    def affine_shape(ctx):  # γ per channel: (C, 1, ..., 1) against (N, C, *)
        return (ctx.channels, *[1] * (ctx.input_dim - 2))

    @staticmethod
    def reduce(ctx, t: Tensor, samples: bool = False) -> Tensor:
        """Σ over the batch and the positions, per channel; per sample: over the positions."""
        per_channel = t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).sum(-1)
        return per_channel if samples else per_channel.sum(0)


def _affine(layer: str, input: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple) -> None:
    _checks.real_floating(layer, "input", input)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != tuple(shape):
            raise InputError(f"{layer}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


@operation(torch.nn.LayerNorm, LayerNormFunction, kind="layer", per_sample=True)
def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r""":math:`y = \gamma \odot (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta` over the trailing ``normalized_shape``;
    see :class:`~manualgrad.functions.LayerNormFunction`."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    _affine("layer_norm", input, weight, bias, shape)
    if tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise InputError(f"layer_norm: input of shape {tuple(input.shape)} does not end in normalized_shape {shape}")
    return apply(LayerNormFunction, input, shape, weight, bias, float(eps))


@operation(torch.nn.GroupNorm, GroupNormFunction, kind="layer", per_sample=True)
def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    r"""Each group of ``C / num_groups`` channels standardised per sample, then :math:`\gamma_c \hat x + \beta_c`;
    see :class:`~manualgrad.functions.GroupNormFunction`."""
    if input.dim() < 2:
        raise InputError(f"group_norm: input must be (N, C, *), got shape {tuple(input.shape)}")
    channels = input.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise InputError(f"group_norm: {channels} channels do not split into num_groups={num_groups} groups")
    _affine("group_norm", input, weight, bias, (channels,))
    return apply(GroupNormFunction, input, num_groups, weight, bias, float(eps))
