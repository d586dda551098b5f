r"""Per-sample quantities from the same hand-written backward: gradient norms, gradients, and DP-SGD's clipped sum.

A layer's weight gradient is a sum over samples (``docs/derivations.md``, section 7):
with :math:`G = \partial\ell/\partial Z` and :math:`A` the layer's input, shaped
``(N, T, p)`` and ``(N, T, q)`` (``T`` = positions: 1 for a plain batch of rows,
the sequence length, or a convolution's output pixels with :math:`A` its patches),

.. math::

    G_W = \sum_n g_n, \qquad g_n = G[n]^\top A[n] \quad (p \times q), \qquad
    \|g_n\|^2 = \langle G[n] G[n]^\top,\; A[n] A[n]^\top \rangle
    \;\;\big(= \|G[n]\|^2 \|A[n]\|^2 \text{ when } T = 1\big)

so each sample's gradient norm costs two row norms (T = 1), or two ``T x T``
Gram matrices, or the per-sample products themselves, whichever is cheaper,
and never a second backward. Clipping commutes with the chain: sample
:math:`n`'s factor :math:`c_n = \min(1, C / \|g_n\|)` scales its row of every
layer's :math:`G` linearly, and :math:`G_X = G W` is linear in :math:`G`, so
the backward runs unchanged and each clipped weight gradient is formed once,
at the end, when every sample's total norm is known:
:math:`\sum_n c_n g_n = (c \odot G)^\top A`.

Usage (the model's parametrised layers must be manualgrad's: ``Linear``,
``Conv2d``, the fused ``MLP``)::

    with manualgrad.per_sample(model, clip=1.0) as samples:
        loss = F.cross_entropy(model(x), y)    # a mean over the batch: loss_reduction="mean"
        loss.backward()                        # p.grad = Σ_n min(1, C/‖g_n‖) g_n, in one backward pass
    samples.norms                              # (N,): each sample's gradient norm over all those parameters
    model[0].weight.norm_sample                # (N,): per parameter; .grad_sample with grads=True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _compat
from .errors import InputError
from .functions.base import opmath

__all__ = ["PerSample", "per_sample"]

_ACTIVE: PerSample | None = None  # the context now entered (one at a time)


class PerSample:
    """The handle :func:`per_sample` returns: options, the tracked parameters, and this backward's records."""

    def __init__(self, model: torch.nn.Module, *, norms=True, grads=False, clip=None, loss_reduction="mean"):
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"per_sample: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise InputError(f"per_sample: clip must be a positive number (the clipping norm C), got {clip!r}")
        self.grads, self.clip, self.loss_reduction = bool(grads), clip, loss_reduction
        self.wants_norms = bool(norms) or clip is not None
        self.parameters = _tracked_parameters(model)
        self._ids = {id(p) for p in self.parameters}
        self._seen: set[int] = set()  # parameters recorded in the current backward pass
        self._squared: list[Tensor] = []  # their per-sample squared norms
        self._deferred: list[tuple] = []  # (weight, bias, G, A) whose products wait for the clip factors
        self.norms: Tensor | None = None  #: (N,): each sample's gradient norm over all tracked parameters

    def __enter__(self) -> PerSample:
        global _ACTIVE
        if _ACTIVE is not None:
            raise InputError("per_sample: contexts do not nest")
        for p in self.parameters:
            for name in ("norm_sample", "grad_sample"):
                if hasattr(p, name):
                    delattr(p, name)
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None

    def _record(self, weight: Tensor, bias: Tensor | None, grad: Tensor, a: Tensor) -> bool:
        """See :meth:`Layer.record`."""
        if not self._seen:  # the first layer of this backward pass: finish at its end
            _compat.queue_callback(self._finish)
        for p in (weight, bias):
            if p is not None:
                if id(p) in self._seen:
                    raise InputError(
                        "per_sample: a parameter is used more than once in one forward pass (shared weights); "
                        "its per-sample gradients would have to be summed before their norm is taken"
                    )
                self._seen.add(id(p))
        # sample n's gradient of its own term ℓ_n is scale · G[n]^T A[n] (a mean divides each term by N)
        scale = grad.shape[0] if self.loss_reduction == "mean" else 1
        if self.wants_norms:
            weight_norms, bias_norms = _norms(grad, a)
            weight.norm_sample = scale * weight_norms
            self._squared.append(weight.norm_sample.square())
            if bias is not None:
                bias.norm_sample = scale * bias_norms
                self._squared.append(bias.norm_sample.square())
        if self.grads:
            per_sample = torch.bmm((grad * scale).transpose(1, 2), a.to(grad.dtype))  # scale · G[n]^T A[n]
            weight.grad_sample = per_sample.reshape(grad.shape[0], *weight.shape).to(weight.dtype)
            if bias is not None:
                bias.grad_sample = (grad.sum(1) * scale).to(bias.dtype)
        if self.clip is None:
            return False
        self._deferred.append((weight, bias, grad, a, scale))
        return True

    def _finish(self) -> None:
        """At the end of the backward pass: the total norms, and with ``clip`` the clipped sums into ``.grad``."""
        self.norms = torch.stack(self._squared).sum(0).sqrt() if self._squared else None
        if self.clip is not None and self.norms is not None:
            factor = (self.clip / (self.norms + 1e-6)).clamp(max=1.0)  # c_n = min(1, C / ‖g_n‖)
            for weight, bias, grad, a, scale in self._deferred:
                cg = (grad * (scale * factor).reshape(-1, 1, 1).to(grad.dtype)).reshape(-1, grad.shape[-1])  # c ⊙ G
                _accumulate(weight, cg.t().mm(a.reshape(-1, a.shape[-1]).to(cg.dtype)).reshape(weight.shape))
                if bias is not None:  # Σ_n c_n Σ_t G[n, t]
                    _accumulate(bias, cg.sum(0))
        self._seen.clear()
        self._squared.clear()
        self._deferred.clear()


class Layer(NamedTuple):
    """What a Function's ``setup_context`` keeps for the backward when a :func:`per_sample` context tracks its
    weight: the context and the layer's parameters."""

    context: PerSample
    weight: Tensor
    bias: Tensor | None

    def record(self, grad: Tensor, a: Tensor) -> bool:
        """In the layer's backward: record sample n's gradient norms (and gradients) from ``grad = ∂R/∂Z``
        ``(N, T, p)`` and the layer's input (or patches) ``a`` ``(N, T, q)``. True when clipping: the weight and
        bias products are then formed at the end of the backward pass, and the Function returns None for them."""
        return self.context._record(self.weight, self.bias, grad, a)


def per_sample(
    model: torch.nn.Module,
    *,
    norms: bool = True,
    grads: bool = False,
    clip: float | None = None,
    loss_reduction: str = "mean",
) -> PerSample:
    """A context manager around a forward and ``backward()`` of ``model`` that also computes, for every parameter
    of its manualgrad layers (``Linear``, ``Conv2d``, the fused ``MLP``), per-sample quantities:

    * ``p.norm_sample`` ``(N,)``: the norm of sample n's gradient of ``p``;
      the handle's ``.norms`` ``(N,)``: sample n's gradient norm over all those parameters;
    * ``p.grad_sample`` ``(N, *p.shape)`` with ``grads=True``;
    * with ``clip=C``: ``p.grad`` becomes ``Σ_n min(1, C/‖g_n‖) g_n`` (DP-SGD's clipped sum, no noise, not
      averaged), computed in the one backward pass; ``backward()`` must be ``loss.backward()`` (the clipped
      gradients are written to ``.grad``; ``torch.autograd.grad`` gets none for those parameters).

    Sample n's gradient is that of its own loss term ℓ_n: for a ``"mean"`` loss (the default), the n-th term
    before averaging over the N samples of dim 0; ``loss_reduction="sum"`` for a summed loss. Any other module
    with parameters raises an :class:`~manualgrad.InputError` naming it. The quantities are those of the last
    backward pass in the context; the attributes stay after it. Eager mode only (not under torch.compile).
    """
    return PerSample(model, norms=norms, grads=grads, clip=clip, loss_reduction=loss_reduction)


def active() -> bool:
    """Whether a per_sample context is entered."""
    return _ACTIVE is not None


def layer(weight: Tensor, bias: Tensor | None) -> Layer | None:
    """In a Function's ``setup_context``: a :class:`Layer` if a context tracks ``weight``, else None (cheaply)."""
    active = _ACTIVE
    if active is None or id(weight) not in active._ids:
        return None
    return Layer(active, weight, bias)


def samples(t: Tensor) -> Tensor:
    """``(N, *, k)`` -> ``(N, T, k)``: dim 0 are the samples, every other leading dimension the positions T."""
    if t.dim() == 1:
        return t.reshape(1, 1, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _norms(g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """For every n, ‖G[n]^T A[n]‖ (the weight's g_n) and ‖Σ_t G[n, t]‖ (the bias's), the cheapest way:
    row norms when T = 1, else T x T Gram matrices or the products themselves."""
    g = opmath(g)
    a = a.to(g.dtype)
    t, p, q = g.shape[1], g.shape[2], a.shape[2]
    bias = torch.linalg.vector_norm(g[:, 0] if t == 1 else g.sum(1), dim=1)
    if t == 1:  # ‖g_n ⊗ a_n‖ = ‖g_n‖ ‖a_n‖
        return bias * torch.linalg.vector_norm(a[:, 0], dim=1), bias
    if t * (p + q) < p * q:  # ‖g_n‖² = ⟨G[n] G[n]^T, A[n] A[n]^T⟩
        squared = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    else:
        squared = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    return squared.clamp(min=0).sqrt(), bias


def _accumulate(p: Tensor, grad: Tensor) -> None:
    grad = grad.to(p.dtype)
    p.grad = grad if p.grad is None else p.grad + grad


def _tracked_parameters(model: torch.nn.Module) -> list[Tensor]:
    """The trainable parameters of the manualgrad layers in ``model``; any other module with parameters is refused."""
    from . import nn as mnn

    tracked = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        op = getattr(type(module), "_op", None)
        if op is not None and op.name in _RULES and type(module).forward is mnn.twin(op).forward:
            if getattr(module, "groups", 1) != 1:
                raise InputError(
                    f"per_sample: {name or '<root>'} ({type(module).__name__}) has groups={module.groups}; "
                    "per-sample quantities are computed for convolutions with groups=1 only"
                )
            tracked += own
        else:
            raise InputError(
                f"per_sample: {name or '<root>'} ({type(module).__name__}) has parameters but no per-sample rule "
                f"(per_sample handles manualgrad's {', '.join(_RULES)} and the fused MLP; manualgrad.convert(model) "
                "switches torch.nn layers to them)"
            )
    return tracked


_RULES = ("linear", "conv2d")  # the operations whose backward records per-sample quantities
