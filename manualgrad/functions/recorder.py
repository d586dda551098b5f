r"""The per-sample recorder the layers' backward passes call (:func:`manualgrad.per_sample` is its user-facing side).

A layer's weight gradient is a sum over samples (``docs/derivations.md``, section 7): with
:math:`G = \partial R/\partial Z` ``(N, T, p)`` and the layer's input (or patches) :math:`A` ``(N, T, q)``,

.. math::

    G_W = \sum_n g_n, \qquad g_n = G[n]^\top A[n], \qquad
    \|g_n\|^2 = \langle G[n] G[n]^\top,\; A[n] A[n]^\top \rangle \;\;(= \|G[n]\|^2 \|A[n]\|^2 \text{ when } T = 1)

A Function whose weight a :class:`Recorder` tracks keeps a :class:`Layer` in ``setup_context``
(:func:`layer`), and its backward calls :meth:`Layer.record` with ``G`` and ``A``. With clipping the
recorder forms :math:`\sum_n c_n g_n = (c \odot G)^\top A` at the end of the backward pass, once every
sample's total norm (and so its factor :math:`c_n`) is known.

This module imports nothing above :mod:`manualgrad.functions`: the Functions import it, and the context
manager (:mod:`manualgrad.per_sample`), which decides which parameters are tracked, lives above ``nn``.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _compat
from ..errors import InputError
from .base import opmath

__all__ = ["Layer", "Recorder", "active", "layer", "note_loss", "samples"]

EPSILON = 1e-6  #: the clip factor is min(1, C / (‖g_n‖ + EPSILON)), as Opacus's: no division by zero

_local = threading.local()  # .recorder: the Recorder entered in this thread (forward passes look here)
_lock = threading.Lock()
# id(parameter) -> the open Recorder tracking it (one at most, any thread); weak, so that a private model
# (manualgrad.privacy keeps its recorder open for the model's life) and its parameters can still be freed
_OWNERS: weakref.WeakValueDictionary[int, Recorder] = weakref.WeakValueDictionary()
_LOSSES: dict[int, str] = {}  # graph task -> the reduction of the manualgrad loss whose backward it runs


class Recorder:
    """The per-sample state of one context: options, the tracked parameters, this backward pass's records.

    Subclassed by :class:`manualgrad.per_sample.PerSample`, which chooses the parameters."""

    def __init__(self, parameters: list[Tensor], *, norms=True, grads=False, clip=None, loss_reduction="mean"):
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"per_sample: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise InputError(f"per_sample: clip must be a positive number (the clipping norm C), got {clip!r}")
        self.grads, self.clip, self.loss_reduction = bool(grads), clip, loss_reduction
        self.wants_norms = bool(norms) or clip is not None
        self.parameters = parameters
        self._ids = {id(p) for p in parameters}
        self._hooks: list = []
        self._task: int | None = None  # the graph task (backward pass) the records below belong to
        self._seen: set[int] = set()  # parameters recorded in that backward pass
        self._squared: list[Tensor] = []  # their per-sample squared norms
        self._deferred: list = []  # functions of the clip factors c (N,) that add Σ_n c_n g_n to .grad
        self.norms: Tensor | None = None  #: (N,): each sample's gradient norm over all tracked parameters
        self.passes = 0  #: backward passes finished (DP's optimizer checks one per step)

    # -- opening and closing -------------------------------------------------------------------------------------
    def open(self) -> None:
        """Track the parameters (in every thread; each parameter by one open recorder at most)."""
        with _lock:
            taken = [p for p in self.parameters if _OWNERS.get(id(p)) not in (None, self)]
            if taken:
                raise InputError(
                    "per_sample: a parameter is already tracked by another open per_sample context (contexts do "
                    "not nest, and one model is tracked by one context at a time, in any thread)"
                )
            for p in self.parameters:
                _OWNERS[id(p)] = self
        for p in self.parameters:
            for name in ("norm_sample", "grad_sample"):
                if hasattr(p, name):
                    delattr(p, name)
            self._hooks.append(p.register_post_accumulate_grad_hook(_calling(weakref.ref(self))))

    def close(self) -> None:
        with _lock:
            for p in self.parameters:
                if _OWNERS.get(id(p)) is self:
                    del _OWNERS[id(p)]
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def enter(self) -> None:
        """Make this the recorder that forward passes in this thread report to."""
        if getattr(_local, "recorder", None) is not None:
            raise InputError("per_sample: contexts do not nest")
        _local.recorder = self

    @staticmethod
    def leave() -> None:
        _local.recorder = None

    # -- what the backward pass calls ----------------------------------------------------------------------------
    def _unrecorded(self, p: Tensor) -> None:
        """Autograd reached a tracked parameter's ``.grad``: unless this pass recorded it, its gradient went around
        the per-sample rule (its layer's forward ran outside the context, in another thread, or through a layer
        that does not record, such as a pruning mask)."""
        if self._task != _compat.graph_task_id() or id(p) not in self._seen:
            raise InputError(
                f"per_sample: a tracked parameter {tuple(p.shape)} got a gradient that the per-sample rule did not "
                "see: its layer's forward ran outside the per_sample context (or in another thread, or through a "
                "pruning mask or parametrization); run the forward inside the context"
            )

    def _start_pass(self) -> None:
        """The first record of a backward pass: forget what an interrupted pass left, finish at this one's end."""
        self._task = _compat.graph_task_id()
        self._seen.clear()
        self._squared.clear()
        self._deferred.clear()
        reduction = _LOSSES.get(self._task)
        if reduction is not None and reduction != self.loss_reduction:
            raise InputError(
                f"per_sample: the loss has reduction={reduction!r} but the context was declared with "
                f"loss_reduction={self.loss_reduction!r}: sample n's gradient (and so its norm and clipping) "
                "would be off by the batch size"
            )
        _compat.queue_callback(self._finish)

    def _track(self, *params: Tensor | None) -> None:
        """Mark ``params`` recorded in this backward pass (starting it if it is a new one)."""
        if self._task != _compat.graph_task_id():
            self._start_pass()
        for p in params:
            if p is not None:
                if id(p) in self._seen:
                    raise InputError(
                        "per_sample: a parameter is used more than once in one forward pass (shared weights); "
                        "its per-sample gradients would have to be summed before their norm is taken"
                    )
                self._seen.add(id(p))

    def _scale(self, samples: int) -> int:
        """Sample n's gradient of its own term ℓ_n is scale · (its share of ∂R/∂θ): a mean divides each term by N."""
        return samples if self.loss_reduction == "mean" else 1

    def _note_norm(self, p: Tensor, norms: Tensor) -> None:
        p.norm_sample = norms
        self._squared.append(norms.square())

    def _record(
        self, weight: Tensor | None, bias: Tensor | None, grad: Tensor, a: Tensor, weighted=None
    ) -> tuple[bool, bool]:
        """See :meth:`Layer.record`."""
        self._track(weight, bias)
        scale = self._scale(grad.shape[0])
        if self.wants_norms:
            weight_norms, bias_norms = _norms(grad, a if weight is not None else None)
            for p, norms in ((weight, weight_norms), (bias, bias_norms)):
                if p is not None:
                    self._note_norm(p, scale * norms)
        if self.grads:
            if weight is not None:
                per_sample = torch.bmm((grad * scale).transpose(1, 2), a.to(grad.dtype))  # scale · G[n]^T A[n]
                weight.grad_sample = per_sample.reshape(grad.shape[0], *weight.shape).to(weight.dtype)
            if bias is not None:
                bias.grad_sample = (grad.sum(1) * scale).to(bias.dtype)
        if self.clip is None:
            return False, False

        def clipped(factor: Tensor) -> None:  # Σ_n c_n g_n = (c ⊙ G)^T A, and Σ_n c_n Σ_t G[n, t]
            if weighted is not None:  # the layer's own weight-gradient map, of the scaled G
                weight_sum, bias_sum = weighted(scale * factor)
                for p, total in ((weight, weight_sum), (bias, bias_sum)):
                    if p is not None:
                        _accumulate(p, total)
                return
            cg = (grad * (scale * factor).reshape(-1, 1, 1).to(grad.dtype)).reshape(-1, grad.shape[-1])
            if weight is not None:
                _accumulate(weight, cg.t().mm(a.reshape(-1, a.shape[-1]).to(cg.dtype)).reshape(weight.shape))
            if bias is not None:
                _accumulate(bias, cg.sum(0))

        self._deferred.append(clipped)
        return weight is not None, bias is not None

    def _record_samples(self, pairs: list[tuple[Tensor | None, Tensor | None]]) -> tuple[bool, ...]:
        """See :meth:`Layer.record_samples`."""
        tracked = [(p, g) for p, g in pairs if p is not None]
        self._track(*(p for p, _ in tracked))
        if not tracked:
            return (False,) * len(pairs)
        scale = self._scale(tracked[0][1].shape[0])
        for p, g in tracked:
            if self.wants_norms:
                self._note_norm(p, scale * torch.linalg.vector_norm(opmath(g).flatten(1), dim=1))
            if self.grads:
                p.grad_sample = (g * scale).to(p.dtype)
        if self.clip is None:
            return (False,) * len(pairs)

        def clipped(factor: Tensor) -> None:  # Σ_n c_n g_n
            for p, g in tracked:
                _accumulate(p, torch.tensordot((scale * factor).to(g.dtype), g, dims=1))

        self._deferred.append(clipped)
        return tuple(p is not None for p, _ in pairs)

    def _record_lookup(self, weight: Tensor, grad: Tensor, index: Tensor) -> bool:
        """See :meth:`Layer.record_lookup`."""
        self._track(weight)
        samples, _, width = grad.shape
        rows = weight.shape[0]
        scale = self._scale(samples)
        g = opmath(grad)
        if self.wants_norms:
            self._note_norm(weight, scale * _lookup_norms(g, index, rows))
        if self.grads:
            offsets = index + torch.arange(samples, device=index.device).reshape(-1, 1) * rows
            per_sample = g.new_zeros(samples * rows, width).index_add_(0, offsets.flatten(), g.reshape(-1, width))
            weight.grad_sample = (scale * per_sample).reshape(samples, rows, width).to(weight.dtype)
        if self.clip is None:
            return False

        def clipped(factor: Tensor) -> None:  # Σ_n c_n g_n: the rows of c ⊙ G added at their indices
            cg = (g * (scale * factor).reshape(-1, 1, 1).to(g.dtype)).reshape(-1, width)
            _accumulate(weight, g.new_zeros(rows, width).index_add_(0, index.flatten(), cg))

        self._deferred.append(clipped)
        return True

    def _finish(self) -> None:
        """At the end of the backward pass: the total norms, and with ``clip`` the clipped sums added to ``.grad``."""
        if self._squared:
            self.norms = torch.stack(self._squared).sum(0).sqrt()
        if self.clip is not None and self.norms is not None:
            factor = (self.clip / (self.norms + EPSILON)).clamp(max=1.0)  # c_n = min(1, C / (‖g_n‖ + 1e-6))
            for clipped in self._deferred:
                clipped(factor)
        self._task = None
        self._seen.clear()
        self._squared.clear()
        self._deferred.clear()
        self.passes += 1


class Layer(NamedTuple):
    """What a Function's ``setup_context`` keeps for the backward when a recorder tracks its weight or bias: the
    recorder and the layer's tracked parameters (None for one it does not track, such as a frozen bias)."""

    recorder: Recorder
    weight: Tensor | None
    bias: Tensor | None

    def record(self, grad: Tensor, a: Tensor, weighted=None) -> tuple[bool, bool]:
        """In the layer's backward: record sample n's gradient norms (and gradients) from ``grad = ∂R/∂Z``
        ``(N, T, p)`` and the layer's input (or patches) ``a`` ``(N, T, q)``. Returns whether the recorder forms the
        weight's and the bias's gradients itself (clipping: at the end of the backward pass; the Function then
        returns None for them). ``weighted(c)``, if given, returns the layer's (G_W, G_b) of the samples' ``G``
        scaled by ``c`` ``(N,)``, computed its own way (a convolution: without the patches)."""
        return self.recorder._record(self.weight, self.bias, grad, a, weighted)

    def record_samples(self, weight_grads: Tensor | None, bias_grads: Tensor | None) -> tuple[bool, bool]:
        """For layers whose per-sample gradients are small (a norm layer's affine parameters): record them, given
        ``(N, *p.shape)`` as shares of ``∂R/∂θ`` (None for an untracked parameter). Returns as :meth:`record`."""
        return self.recorder._record_samples([(self.weight, weight_grads), (self.bias, bias_grads)])

    def record_lookup(self, grad: Tensor, index: Tensor) -> bool:
        """For an embedding: ``grad`` ``(N, T, d)`` at the looked-up rows ``index`` ``(N, T)``; the norms by the
        Gram form, without the ``(N, rows, d)`` per-sample gradients. True when the recorder forms the weight's
        gradient."""
        return self.recorder._record_lookup(self.weight, grad, index)


def active() -> bool:
    """Whether a recorder is entered in this thread."""
    return getattr(_local, "recorder", None) is not None


def layer(weight: Tensor, bias: Tensor | None) -> Layer | None:
    """In a Function's ``setup_context``: a :class:`Layer` if this thread's recorder tracks ``weight`` or ``bias``,
    else None (cheaply)."""
    recorder = getattr(_local, "recorder", None)
    if recorder is None:
        return None
    ids = recorder._ids
    tracked_weight = weight if weight is not None and id(weight) in ids else None
    tracked_bias = bias if bias is not None and id(bias) in ids else None
    if tracked_weight is None and tracked_bias is None:
        return None
    return Layer(recorder, tracked_weight, tracked_bias)


def _calling(recorder: weakref.ref):
    """A parameter's hook calling its recorder's ``_unrecorded``, through a weak reference: a hook held by the
    parameter must not keep the recorder (and with it every tracked parameter) alive."""

    def hook(p: Tensor) -> None:
        owner = recorder()
        if owner is not None:
            owner._unrecorded(p)

    return hook


def note_loss(reduction: str) -> None:
    """In a manualgrad loss's backward: its reduction, which the recorders of this backward pass check against
    their declared ``loss_reduction`` (only while some recorder is open)."""
    if not _OWNERS or reduction not in ("mean", "sum") or torch.compiler.is_compiling():
        return  # (per-sample recording is eager-only: a compiled loss has nothing to tell, and no graph break)
    task = _compat.graph_task_id()
    _LOSSES[task] = reduction
    _compat.queue_callback(lambda: _LOSSES.pop(task, None))


def samples(t: Tensor) -> Tensor:
    """``(N, *, k)`` -> ``(N, T, k)``: dim 0 are the samples, every other leading dimension the positions T
    (also for an empty batch)."""
    if t.dim() == 1:
        return t.reshape(1, 1, -1)
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def _norms(g: Tensor, a: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """For every n, ‖G[n]^T A[n]‖ (the weight's g_n; None without ``a``) and ‖Σ_t G[n, t]‖ (the bias's), the
    cheapest way: row norms when T = 1, else T x T Gram matrices or the products themselves."""
    g = opmath(g)
    t, p = g.shape[1], g.shape[2]
    bias = torch.linalg.vector_norm(g[:, 0] if t == 1 else g.sum(1), dim=1)
    if a is None:
        return None, bias
    a = a.to(g.dtype)
    q = a.shape[2]
    if t == 1:  # ‖g_n ⊗ a_n‖ = ‖g_n‖ ‖a_n‖
        return bias * torch.linalg.vector_norm(a[:, 0], dim=1), bias
    if t * (p + q) < p * q:  # ‖g_n‖² = ⟨G[n] G[n]^T, A[n] A[n]^T⟩
        squared = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    else:
        squared = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    return squared.clamp(min=0).sqrt(), bias


GRAM_POSITIONS = 16  #: an embedding's norms by the T x T Gram form up to this many positions, by row sums above


def _lookup_norms(g: Tensor, index: Tensor, rows: int) -> Tensor:
    """‖g_n‖ for an embedding, g_n = Σ_t e_{i_t} ⊗ G[n,t], the cheaper of two exact ways: the Gram ("ghost") form
    ‖g_n‖² = Σ_{t,s} [i_t = i_s] ⟨G[n,t], G[n,s]⟩ (N T² d), or each sample's distinct rows summed,
    ‖g_n‖² = Σ_v ‖Σ_{t: i_t = v} G[n,t]‖² (N T d, and a sort of the N T indices)."""
    samples, positions, width = g.shape
    if positions <= GRAM_POSITIONS:
        same = (index.unsqueeze(2) == index.unsqueeze(1)).to(g.dtype)
        return (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)).clamp(min=0).sqrt()
    keys = index + torch.arange(samples, device=index.device).reshape(-1, 1) * rows  # (sample, row) pairs
    distinct, inverse = torch.unique(keys.flatten(), return_inverse=True)
    sums = g.new_zeros(len(distinct), width).index_add_(0, inverse, g.reshape(-1, width))
    owner = torch.div(distinct, rows, rounding_mode="floor")
    return g.new_zeros(samples).index_add_(0, owner, sums.square().sum(1)).sqrt()


def _accumulate(p: Tensor, grad: Tensor) -> None:
    """``p.grad += grad`` (torch's convention: gradients accumulate until ``zero_grad``)."""
    grad = grad.to(p.dtype).reshape(p.shape)  # a Conv1d's gradient arrives lifted to 2-D
    p.grad = grad if p.grad is None else p.grad + grad
