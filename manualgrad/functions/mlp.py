r"""A whole multilayer perceptron as ONE autograd Function.

Layer :math:`l = 1..L` maps :math:`A_{l-1}` (rows are samples, :math:`A_0 = X`) to

.. math::

    Z_l = A_{l-1} W_l^\top + b_l, \qquad
    A_l = h_l(Z_l) \odot M_l \quad (l < L), \qquad \text{output } Z_L

with :math:`M_l = K_l / (1 - p_l)` the dropout mask (none without dropout).
The backward is the notes' chain taken once, top to bottom,

.. math::

    \frac{\partial R}{\partial y_1} = \frac{\partial R}{\partial y_2}
    \operatorname{diag}(h'(z_2))\, W_2 \operatorname{diag}(g'(z_1))\, W_1

batched: starting from :math:`G = G_{Z_L}`, for :math:`l = L, \dots, 1`

.. math::

    G_{W_l} = G^\top A_{l-1}, \quad G_{b_l} = \textstyle\sum_n G[n], \quad
    G \leftarrow (G W_l) \odot M_{l-1} \odot h_{l-1}'(Z_{l-1}),

every weight gradient taken on the way down (``docs/derivations.md``,
section 5). One autograd node replaces the ``3L - 1`` of a per-layer model,
and one Python call the ``2L - 1`` module calls, which is what dominates small
networks.

:class:`MLPCrossEntropyFunction` also fuses the softmax cross-entropy on top
(:math:`G_{Z_L} = (\operatorname{softmax}(Z_L) - q)/N`, ``losses/classification.py``): the
forward forms :math:`G_{Z_L}` next to the loss, and the backward scales it by
the incoming scalar gradient and runs the chain, so a training step is one
autograd node.

Both are first-order only (``once_differentiable``: a double backward raises)
and define no jvp: use the per-layer modules for higher-order or forward-mode
AD and ``torch.func``. ``torch.compile`` traces both without a graph break.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import recorder
from .activations import Elementwise
from .base import ManualFunction, cast, opmath
from .linear import rows
from .losses.base import _minus_onehot

__all__ = ["MLPCrossEntropyFunction", "MLPFunction", "MLPSpec"]


class MLPSpec(NamedTuple):
    """What the fused Functions need to know besides the tensors: per hidden layer its activation and
    dropout probability, whether dropout is on, and (MLPCrossEntropyFunction) the label smoothing."""

    activations: tuple[
        tuple[type[Elementwise], tuple], ...
    ]  # (Function, its parameters), e.g. (ReLUFunction, (False,))
    dropouts: tuple[float, ...]  # after each hidden activation, when training (0: none)
    training: bool = False
    label_smoothing: float = 0.0


class _Kept(NamedTuple):
    """What the backward keeps of hidden layer l: ``s``, the tensor h' is written from (Y or Z); the dropout
    mask ``M`` (or None); ``A``, the next layer's input."""

    s: Tensor
    mask: Tensor | None
    a: Tensor


def _pairs(flat) -> list[tuple]:
    """``(W1, b1, ..., WL, bL)`` (or their flags) as ``[(W1, b1), ..., (WL, bL)]``."""
    return list(zip(flat[0::2], flat[1::2]))


def _forward(spec: MLPSpec, input: Tensor, layers: list[tuple]) -> tuple[Tensor, list[_Kept]]:
    """Run the ``(W, b)`` layers on the rows of ``input``: the logits ``(N, C)`` and each hidden layer's
    :class:`_Kept`."""
    kept = []
    a = rows(input)
    for l, (function, args) in enumerate(spec.activations):
        z = torch.nn.functional.linear(a, *layers[l])
        y = function.forward(z, *args)
        p = spec.dropouts[l] if spec.training else 0.0
        mask = None
        if p:
            mask = y.new_zeros(y.shape) if p == 1 else torch.empty_like(y).bernoulli_(1 - p).div_(1 - p)
            a = y * mask
        else:
            a = y
        kept.append(_Kept(y if function.saves_output(*args) else z, mask, a))
    return torch.nn.functional.linear(a, *layers[-1]), kept


def _flatten(kept: list[_Kept]) -> list[Tensor]:
    """The distinct tensors of ``kept``, for save_for_backward (``_unflatten`` inverts it)."""
    return [t for k in kept for t in ((k.s,) if k.a is k.s else (k.s, k.a) if k.mask is None else k)]


def _unflatten(spec: MLPSpec, flat) -> list[_Kept]:
    kept, i = [], 0
    for l, (function, args) in enumerate(spec.activations):
        dropped = spec.training and spec.dropouts[l]
        if dropped:
            kept.append(_Kept(*flat[i : i + 3]))
            i += 3
        elif function.saves_output(*args):
            kept.append(_Kept(flat[i], None, flat[i]))
            i += 1
        else:
            kept.append(_Kept(flat[i], None, flat[i + 1]))
            i += 2
    return kept


def _backward(
    spec: MLPSpec, grad: Tensor, input: Tensor, kept: list[_Kept], layers: list[tuple], needs: tuple, records=None
) -> tuple[Tensor | None, list[list]]:
    """The chain: G_W = G^T A, G_b = Σ_rows G, G ← (G W) ⊙ M ⊙ h'. ``needs``: the input's flag, then each
    layer's ``(W, b)`` flags; ``records``: each layer's :class:`~manualgrad.functions.recorder.Layer` (or None)
    under a per_sample context. Returns G_X and each layer's ``[G_W, G_b]``."""
    dtype = grad.dtype  # the forward's compute dtype (the autocast dtype under autocast)
    needs_input, needs = needs[0], [list(n) for n in needs[1:]]
    grad_input, grads = None, [[None, None] for _ in layers]
    samples = input.shape[0] if input.dim() > 1 else 1
    for l in range(len(layers) - 1, -1, -1):
        weight, bias = layers[l]
        a = kept[l - 1].a if l else cast(rows(input), dtype)
        if records and records[l] is not None:  # clipping: the recorder forms what it takes of G_W, G_b
            taken = records[l].record(_rows_of(grad, samples), _rows_of(a, samples))
            needs[l] = [needs[l][0] and not taken[0], needs[l][1] and not taken[1]]
        if needs[l][0]:
            grads[l][0] = cast(grad.t().mm(a), weight.dtype)  # G_W = G^T A
        if needs[l][1]:
            grads[l][1] = cast(grad.sum(0), bias.dtype)  # G_b = Σ_rows G
        if l == 0:
            if needs_input:
                grad_input = cast(grad.mm(cast(weight, dtype)).reshape(input.shape), input.dtype)  # G_X = G W_1
            break
        if not needs_input and not any(any(n) for n in needs[:l]):
            break  # nothing below needs a gradient
        grad = grad.mm(cast(weight, dtype))  # G_A = G W
        s, mask, _ = kept[l - 1]
        if mask is not None:
            grad.mul_(mask)  # ⊙ M
        function, args = spec.activations[l - 1]
        grad.mul_(function.derivative(opmath(s), *args))  # ⊙ h'
    return grad_input, grads


def _rows_of(a: Tensor, samples: int) -> Tensor:
    """Rows ``(N T, k)`` as ``(N, T, k)`` (also for an empty batch)."""
    return a.reshape(samples, a.shape[0] // samples if samples else 1, a.shape[-1])


def _per_sample_layers(layers: list[tuple]) -> list | None:
    """Each layer's :class:`~manualgrad.functions.recorder.Layer` when a per_sample context tracks the MLP, else
    None."""
    if not recorder.active():
        return None
    records = [recorder.layer(weight, bias) for weight, bias in layers]
    return records if any(record is not None for record in records) else None


class MLPFunction(ManualFunction):
    r"""``apply(input, spec, W1, b1, ..., WL, bL)`` → logits :math:`Z_L`; see the module docstring.

    Shape: input ``(*, sizes[0])``, ``W_l`` ``(sizes[l], sizes[l-1])``, ``b_l``
    ``(sizes[l],)`` or ``None``, output ``(*, sizes[-1])``. The forward returns
    the kept tensors as extra, non-differentiable outputs (``setup_context``
    sees only inputs and outputs).
    """

    @staticmethod
    def forward(input, spec, *params):
        logits, kept = _forward(spec, input, _pairs(params))
        return (logits.reshape(*input.shape[:-1], logits.shape[-1]), *_flatten(kept))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, spec, *params = inputs
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the kept tensors
        ctx.save_for_backward(input, *params, *saved)
        ctx.spec, ctx.layers = spec, len(params) // 2
        ctx.per_sample = _per_sample_layers(_pairs(params))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits, *_):
        if grad_logits is None:  # the logits got no gradient (materialize_grads is off)
            return (None,) * (2 + 2 * ctx.layers)
        input, *rest = ctx.saved_tensors
        params, kept = rest[: 2 * ctx.layers], _unflatten(ctx.spec, rest[2 * ctx.layers :])
        needs = (ctx.needs_input_grad[0], *_pairs(ctx.needs_input_grad[2:]))
        grad_input, grads = _backward(ctx.spec, rows(grad_logits), input, kept, _pairs(params), needs, ctx.per_sample)
        return grad_input, None, *(g for pair in grads for g in pair)


class MLPCrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, spec, wants_grad, W1, b1, ...)`` → mean softmax cross-entropy of the MLP's logits.

    Loss and gradient as :class:`~manualgrad.functions.CrossEntropyFunction`
    with ``reduction="mean"`` and ``spec.label_smoothing``, for class indices in
    ``[0, C)`` (no class weights, no ``ignore_index``), written out directly.
    With ``wants_grad`` the forward also forms :math:`G_{Z_L} = (\operatorname{softmax}(Z_L) - q)/N`
    and keeps it with the layers' tensors; the backward scales it by the
    incoming scalar :math:`g` and runs the chain. Shape: input ``(N, sizes[0])``,
    target ``(N,)``. An empty batch gives a NaN loss and zero gradients, as in PyTorch.
    """

    @staticmethod
    def forward(input, target, spec, wants_grad, *params):
        logits, kept = _forward(spec, input, _pairs(params))
        n, classes = logits.shape
        eps = spec.label_smoothing
        # R = (1/N) Σ_n [(1 - ε)(-log P[n, t_n]) + (ε/C) Σ_c (-log P[n, c])], in float32 for half logits
        logp = torch.log_softmax(opmath(logits), 1)
        loss = torch.nn.functional.nll_loss(logp, target)
        if eps:
            loss = (1 - eps) * loss - eps * logp.mean(1).mean()
        if not wants_grad:
            return (loss,)
        # G_Z = (P - q) / N, q = (1 - ε) onehot(t) + ε/C: P, less 1 - ε at each row's target, less ε/C everywhere
        grad_logits = _minus_onehot(logp.exp_(), target.unsqueeze(1), 1 - eps, 1, in_place=True)
        if eps:
            grad_logits.sub_(eps / classes)
        grad_logits = cast(grad_logits.div_(n), logits.dtype)
        return (loss, grad_logits, *_flatten(kept))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, *kept = output
        input, _, spec, wants_grad, *params = inputs
        ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the kept tensors
        ctx.save_for_backward(input, *params, *kept)
        ctx.spec, ctx.layers, ctx.wants_grad = spec, len(params) // 2, wants_grad
        ctx.per_sample = _per_sample_layers(_pairs(params))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * (4 + 2 * ctx.layers)
        if not ctx.wants_grad:
            raise RuntimeError("MLPCrossEntropyFunction: called with wants_grad=False, so no gradient was prepared")
        input, *rest = ctx.saved_tensors
        params, (grad_logits, *kept) = rest[: 2 * ctx.layers], rest[2 * ctx.layers :]
        needs = (ctx.needs_input_grad[0], *_pairs(ctx.needs_input_grad[4:]))
        grad = grad_logits * cast(grad_loss, grad_logits.dtype)  # G_Z scaled by the incoming ∂(...)/∂R
        kept = _unflatten(ctx.spec, kept)
        grad_input, grads = _backward(ctx.spec, grad, input, kept, _pairs(params), needs, ctx.per_sample)
        return grad_input, None, None, None, *(g for pair in grads for g in pair)
