r"""Per-sample quantities from the same hand-written backward: gradient norms, gradients, and DP-SGD's clipped sum.

A layer's weight gradient is a sum over samples (``docs/derivations.md``, section 7; the recorder the
layers call is :mod:`manualgrad.functions.recorder`): with :math:`G = \partial\ell/\partial Z` and
:math:`A` the layer's input, shaped ``(N, T, p)`` and ``(N, T, q)`` (``T`` = positions: 1 for a plain
batch of rows, the sequence length, or a convolution's output pixels with :math:`A` its patches),

.. math::

    G_W = \sum_n g_n, \qquad g_n = G[n]^\top A[n] \quad (p \times q), \qquad
    \|g_n\|^2 = \langle G[n] G[n]^\top,\; A[n] A[n]^\top \rangle
    \;\;\big(= \|G[n]\|^2 \|A[n]\|^2 \text{ when } T = 1\big)

so each sample's gradient norm costs two row norms (T = 1), or two ``T x T``
Gram matrices, or the per-sample products themselves, whichever is cheaper,
and never a second backward. Clipping commutes with the chain: sample
:math:`n`'s factor :math:`c_n = \min(1, C / (\|g_n\| + 10^{-6}))` scales its row of every
layer's :math:`G` linearly, and :math:`G_X = G W` is linear in :math:`G`, so
the backward runs unchanged and each clipped weight gradient is formed once,
at the end, when every sample's total norm is known:
:math:`\sum_n c_n g_n = (c \odot G)^\top A`.

Usage (the model's parametrised layers must be manualgrad's: those whose registry declaration has a
per-sample rule, ``Linear``, ``Conv1d``, ``Conv2d``, ``LayerNorm``, ``GroupNorm``, ``Embedding``, the fused
``MLP``)::

    with manualgrad.per_sample(model, clip=1.0) as samples:
        loss = F.cross_entropy(model(x), y)    # a mean over the batch: loss_reduction="mean"
        loss.backward()                        # p.grad += Σ_n min(1, C/(‖g_n‖ + 1e-6)) g_n, in one backward pass
    samples.norms                              # (N,): each sample's gradient norm over all those parameters
    model[0].weight.norm_sample                # (N,): per parameter; .grad_sample with grads=True

DP-SGD with noise, Poisson sampling and an accountant is :mod:`manualgrad.privacy`.
"""

from __future__ import annotations

import torch

from . import nn as mnn
from .errors import InputError
from .functions.recorder import EPSILON, Recorder
from .registry import ops

__all__ = ["EPSILON", "PerSample", "per_sample", "tracked_parameters"]


class PerSample(Recorder):
    """The handle :func:`per_sample` returns: options, the tracked parameters, and this backward's records."""

    def __init__(self, model: torch.nn.Module, **options):
        self._mixing = sample_mixing_modules(model)
        super().__init__(tracked_parameters(model), **options)

    def __enter__(self) -> PerSample:
        refuse_sample_mixing(self._mixing)
        self.enter()
        try:
            self.open()
        except BaseException:
            self.leave()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.leave()


def per_sample(
    model: torch.nn.Module,
    *,
    norms: bool = True,
    grads: bool = False,
    clip: float | None = None,
    loss_reduction: str = "mean",
) -> PerSample:
    """A context manager around a forward and ``backward()`` of ``model`` that also computes, for every trainable
    parameter of its manualgrad layers (``Linear``, ``Conv1d``, ``Conv2d``, ``LayerNorm``, ``GroupNorm``,
    ``Embedding``, the fused ``MLP``), per-sample quantities:

    * ``p.norm_sample`` ``(N,)``: the norm of sample n's gradient of ``p``;
      the handle's ``.norms`` ``(N,)``: sample n's gradient norm over all those parameters;
    * ``p.grad_sample`` ``(N, *p.shape)`` with ``grads=True``;
    * with ``clip=C`` (a positive number): the backward pass adds ``Σ_n c_n g_n`` to ``p.grad``, with
      ``c_n = min(1, C / (‖g_n‖ + 1e-6))`` (DP-SGD's clipped sum, no noise, not averaged; the 1e-6, as in
      Opacus, keeps a zero gradient finite). ``.grad`` accumulates as torch's does: two backward passes add two
      clipped sums, and ``zero_grad()`` clears it. ``backward()`` must be ``loss.backward()``
      (``torch.autograd.grad`` gets no gradient for those parameters).

    Sample n's gradient is that of its own loss term ℓ_n: for a ``"mean"`` loss (the default), the n-th term
    before averaging over the N samples of dim 0; ``loss_reduction="sum"`` for a summed loss. A manualgrad loss
    whose reduction differs from the declared one raises. Tracked are the parameters with ``requires_grad``
    (a frozen weight's bias is clipped on its own). An empty batch gives empty norms and a zero clipped sum.

    Refused with an :class:`~manualgrad.InputError` naming the layer: any other module with trainable parameters,
    a layer whose parameters reach it through a parametrization or a pruning mask, a BatchNorm that mixes the
    samples (training mode or no running statistics), and, during the backward, a tracked parameter whose
    gradient did not pass the per-sample rule (its forward ran outside the context, or in another thread).
    One context per thread (they do not nest); a model is tracked by one open context at a time.
    The quantities are those of the last backward pass in the context; the attributes stay after it.
    Eager mode only (not under torch.compile).
    """
    return PerSample(model, norms=norms, grads=grads, clip=clip, loss_reduction=loss_reduction)


def tracked_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The trainable parameters of the manualgrad layers in ``model`` with a per-sample rule; any other module with
    trainable parameters is refused with an :class:`~manualgrad.InputError` naming it."""
    tracked = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = f"{name or '<root>'} ({type(module).__name__})"
        op = getattr(type(module), "_op", None)
        if op is None or not op.per_sample or type(module).forward is not mnn.twin(op).forward:
            ruled = ", ".join(o.module.__name__ for o in _ruled())
            raise InputError(
                f"per_sample: {label} has parameters but no per-sample rule (per_sample handles manualgrad's "
                f"{ruled} and the fused MLP; manualgrad.convert(model) switches torch.nn layers to them)"
            )
        if getattr(module, "groups", 1) != 1:
            raise InputError(
                f"per_sample: {label} has groups={module.groups}; per-sample quantities are computed for "
                "convolutions with groups=1 only"
            )
        pruned = any(n.endswith("_orig") for n, _ in module.named_parameters(recurse=False))
        if pruned or torch.nn.utils.parametrize.is_parametrized(module):
            raise InputError(
                f"per_sample: {label} computes its weight from its parameters (a parametrization or a pruning "
                "mask), which the per-sample rule does not see; remove it (torch.nn.utils.prune.remove) first"
            )
        tracked += own
    return tracked


def sample_mixing_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules of ``model`` whose output for one sample depends on the others: BatchNorm."""
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _BATCH_NORMS)]


def refuse_sample_mixing(modules: list[tuple[str, torch.nn.Module]]) -> None:
    """A BatchNorm normalises each sample with the batch's statistics (training mode, or no running statistics):
    sample n's gradient then depends on the others, and no per-sample norm (nor DP's bound) holds."""
    for name, m in modules:
        if m.training or not m.track_running_stats:
            raise InputError(
                f"per_sample: {name} ({type(m).__name__}) mixes the samples of a batch (batch statistics), so "
                "per-sample gradients are not defined; use GroupNorm or LayerNorm, or put it in eval mode with "
                "running statistics"
            )


def _ruled():
    return [op for op in ops() if op.per_sample and op.module is not None]


_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
