r"""A whole multilayer perceptron as ONE autograd Function.

Layer :math:`l = 1..L` maps :math:`A_{l-1}` (rows are samples, :math:`A_0 = X`) to

.. math::

    Z_l = A_{l-1} W_l^\top + b_l, \qquad
    A_l = h(Z_l) \odot M_l \quad (l < L), \qquad \text{output } Z_L

with :math:`M_l = K_l / (1 - p)` the dropout mask (all ones without dropout).
The backward is the notes' chain taken once, top to bottom,

.. math::

    \frac{\partial R}{\partial y_1} = \frac{\partial R}{\partial y_2}
    \operatorname{diag}(h'(z_2))\, W_2 \operatorname{diag}(g'(z_1))\, W_1

batched: starting from :math:`G = G_{Z_L}`, for :math:`l = L, \dots, 1`

.. math::

    G_{W_l} = G^\top A_{l-1}, \quad G_{b_l} = \textstyle\sum_n G[n], \quad
    G \leftarrow (G W_l) \odot M_{l-1} \odot h'(Z_{l-1}),

every weight gradient taken on the way down. One autograd node replaces the
``3L - 1`` of a per-layer model, and one Python call the ``2L - 1`` module
calls, which is what dominates small networks.

:class:`MLPCrossEntropyFunction` also fuses the softmax cross-entropy on top
(:math:`G_{Z_L} = (\operatorname{softmax}(Z_L) - q)/N`, ``losses.py``): the
forward forms :math:`G_{Z_L}` next to the loss, and the backward scales it by
the incoming scalar gradient and runs the chain, so a training step is one
autograd node. (Running the chain inside the forward instead was measured
slower: the gradients it keeps cannot be handed to ``.grad`` without a copy.)

Both are first-order only (``once_differentiable``: a double backward raises)
and define no jvp: use the per-layer modules for higher-order or forward-mode
AD and ``torch.func``. ``torch.compile`` traces both without a graph break.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .activations import Elementwise
from .base import ManualFunction, cast
from .losses import _autocast_float32

__all__ = ["MLPCrossEntropyFunction", "MLPFunction", "MLPSpec"]


class MLPSpec(NamedTuple):
    """What the fused Functions need to know besides the tensors."""

    activation: type[Elementwise]  # e.g. ReLUFunction: h is its forward, h' its derivative
    activation_args: tuple = ()  # its parameters, e.g. (negative_slope,)
    dropout: float = 0.0  # applied after every hidden activation when training
    training: bool = False
    label_smoothing: float = 0.0  # MLPCrossEntropyFunction only


def _forward(spec: MLPSpec, input: Tensor, params: tuple) -> tuple[Tensor, list[tuple]]:
    """Run the layers on the rows of ``input``; return the logits ``(N, C)`` and, per hidden
    layer, what the backward keeps: ``(s, M, A)`` with ``s`` the tensor h' is written from
    (Y or Z), ``M`` the dropout mask (or None) and ``A`` the next layer's input."""
    h, args = spec.activation.forward, spec.activation_args
    from_output = spec.activation.saves_output(*args)
    dropout = spec.dropout if spec.training else 0.0
    kept = []
    a = input.reshape(-1, input.shape[-1])
    last = len(params) // 2 - 1
    for l in range(last):
        z = torch.nn.functional.linear(a, params[2 * l], params[2 * l + 1])
        y = h(z, *args)
        mask = None
        if dropout:
            mask = torch.empty_like(y).bernoulli_(1 - dropout).div_(1 - dropout)
            a = y * mask
        else:
            a = y
        kept.append((y if from_output else z, mask, a))
    return torch.nn.functional.linear(a, params[2 * last], params[2 * last + 1]), kept


def _flatten(kept: list[tuple]) -> list[Tensor]:
    """The distinct tensors of ``kept``, for save_for_backward (``_unflatten`` inverts it)."""
    return [t for s, mask, a in kept for t in ((s,) if a is s else (s, a) if mask is None else (s, mask, a))]


def _unflatten(spec: MLPSpec, flat) -> list[tuple]:
    dropout = spec.dropout if spec.training else 0.0
    from_output = spec.activation.saves_output(*spec.activation_args)
    if dropout:
        return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
    if from_output:
        return [(y, None, y) for y in flat]
    return [(flat[i], None, flat[i + 1]) for i in range(0, len(flat), 2)]


def _backward(spec: MLPSpec, grad: Tensor, input: Tensor, kept: list[tuple], params: tuple, needs: tuple) -> list:
    """The chain: G_W = G^T A, G_b = Σ rows G, G ← (G W) ⊙ M ⊙ h'; ``needs`` flags (input, W1, b1, ...)."""
    derivative, args = spec.activation.derivative, spec.activation_args
    dtype = grad.dtype  # the forward's compute dtype (the autocast dtype under autocast)
    grads = [None] * (1 + len(params))
    for l in range(len(params) // 2 - 1, -1, -1):
        weight, bias = params[2 * l], params[2 * l + 1]
        a = kept[l - 1][2] if l else cast(input.reshape(-1, input.shape[-1]), dtype)
        if needs[1 + 2 * l]:
            grads[1 + 2 * l] = cast(grad.t().mm(a), weight.dtype)  # G_W = G^T A
        if needs[2 + 2 * l]:
            grads[2 + 2 * l] = cast(grad.sum(0), bias.dtype)  # G_b = Σ rows G
        if l == 0:
            if needs[0]:
                grads[0] = cast(grad.mm(cast(weight, dtype)).reshape(input.shape), input.dtype)  # G_X = G W_1
            break
        if not any(needs[: 1 + 2 * l]):
            break  # nothing below needs a gradient
        grad = grad.mm(cast(weight, dtype))  # G_A = G W
        s, mask, _ = kept[l - 1]
        if mask is not None:
            grad.mul_(mask)  # ⊙ M
        grad.mul_(derivative(s, *args))  # ⊙ h'
    return grads


class MLPFunction(ManualFunction):
    r"""``apply(input, spec, W1, b1, ..., WL, bL)`` → logits :math:`Z_L`; see the module docstring.

    Shape: input ``(*, sizes[0])``, ``W_l`` ``(sizes[l], sizes[l-1])``, ``b_l``
    ``(sizes[l],)`` or ``None``, output ``(*, sizes[-1])``. The forward returns
    the kept tensors as extra, non-differentiable outputs (``setup_context``
    sees only inputs and outputs).
    """

    @staticmethod
    def forward(input, spec, *params):
        logits, kept = _forward(spec, input, params)
        return (logits.reshape(*input.shape[:-1], logits.shape[-1]), *_flatten(kept))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, spec, *params = inputs
        logits, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the kept tensors
        ctx.save_for_backward(input, *params, *saved)
        ctx.spec, ctx.layers = spec, len(params) // 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits, *_):
        if grad_logits is None:  # the logits got no gradient (materialize_grads is off)
            return (None,) * (2 + 2 * ctx.layers)
        input, *rest = ctx.saved_tensors
        params, kept = rest[: 2 * ctx.layers], _unflatten(ctx.spec, rest[2 * ctx.layers :])
        needs = (ctx.needs_input_grad[0],) + ctx.needs_input_grad[2:]
        grad = grad_logits.reshape(-1, grad_logits.shape[-1])
        grads = _backward(ctx.spec, grad, input, kept, tuple(params), needs)
        return grads[0], None, *grads[1:]


class MLPCrossEntropyFunction(ManualFunction):
    r"""``apply(input, target, spec, wants_grad, W1, b1, ...)`` → mean softmax cross-entropy of the MLP's logits.

    Loss and gradient as :class:`~manualgrad.functions.CrossEntropyFunction`
    with ``reduction="mean"`` and ``spec.label_smoothing``, for class indices in
    ``[0, C)`` (no class weights, no ``ignore_index``), written out directly.
    With ``wants_grad`` the forward also forms :math:`G_{Z_L} = (\operatorname{softmax}(Z_L) - q)/N`
    and keeps it with the layers' tensors; the backward scales it by the
    incoming scalar :math:`g` and runs the chain. Shape: input ``(N, sizes[0])``, target ``(N,)``.
    """

    @staticmethod
    def forward(input, target, spec, wants_grad, *params):
        logits, kept = _forward(spec, input, params)
        rows, classes = logits.shape
        eps = spec.label_smoothing
        # R = -(1/N) Σ_n [(1 - ε) log P[n, t_n] + (ε/C) Σ_c log P[n, c]], in float32 under autocast
        logp = torch.log_softmax(_autocast_float32(logits), 1)
        loss = torch.nn.functional.nll_loss(logp, target)
        if eps:
            loss = loss * (1 - eps) - logp.sum() * (eps / (classes * rows))
        if not wants_grad:
            return (loss,)
        # G_Z = (P - q) / N with q = (1 - ε) onehot(t) + ε/C
        grad_logits = logp.exp_().scatter_(1, target.unsqueeze(1), -(1 - eps), reduce="add")
        if eps:
            grad_logits.sub_(eps / classes)
        grad_logits = cast(grad_logits.mul_(1 / rows), logits.dtype)
        return (loss, grad_logits, *_flatten(kept))

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss, *kept = output
        input, _, spec, wants_grad, *params = inputs
        ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the kept tensors
        ctx.save_for_backward(input, *params, *kept)
        ctx.spec, ctx.layers, ctx.wants_grad = spec, len(params) // 2, wants_grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * (4 + 2 * ctx.layers)
        if not ctx.wants_grad:
            raise RuntimeError("MLPCrossEntropyFunction: called with wants_grad=False, so no gradient was prepared")
        input, *rest = ctx.saved_tensors
        params, (grad_logits, *kept) = rest[: 2 * ctx.layers], rest[2 * ctx.layers :]
        # a plain backward of the loss hands over exactly 1: nothing to scale (read on the CPU only: no device sync, no trace)
        if grad_loss.device.type != "cpu" or torch.compiler.is_compiling() or grad_loss.item() != 1.0:
            grad_logits = grad_logits * grad_loss
        needs = (ctx.needs_input_grad[0],) + ctx.needs_input_grad[4:]
        grads = _backward(ctx.spec, grad_logits, input, _unflatten(ctx.spec, kept), tuple(params), needs)
        return grads[0], None, None, None, *grads[1:]
