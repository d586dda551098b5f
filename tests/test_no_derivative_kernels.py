"""The guarantee: no backward of ours runs autograd or one of PyTorch's derivative kernels.

A TorchDispatchMode sees every aten op that runs. PyTorch's derivative
kernels are the ops named ``*_backward`` (``threshold_backward``,
``sigmoid_backward``, ``convolution_backward``...) and ``*_backward_data``
(softmax, log_softmax). Every registered operation runs under it, on every
example: first-order backward, double backward, and forward mode.
"""

from __future__ import annotations

import pytest
import torch
from support import F64, RecordOps, differentiable, example, example_params, seeded

import manualgrad.functional as MF
import manualgrad.nn as mnn


def test_the_recorder_catches_torchs_own_kernels():
    """The check can fail: torch.nn's ReLU backward runs threshold_backward."""
    x = torch.randn(4, requires_grad=True)
    with RecordOps() as recorder:
        torch.autograd.grad(torch.relu(x).sum(), x)
    assert recorder.derivative_kernels == ["threshold_backward"]
    with RecordOps() as recorder:
        torch.autograd.grad(torch.nn.functional.cross_entropy(x.view(2, 2), torch.tensor([0, 1])), x)
    assert "_log_softmax_backward_data" in recorder.derivative_kernels


def _output_and_leaves(op, index):
    args, kwargs = example(op, index, F64)
    leaves = [args[i] for i in differentiable(args)]
    out = seeded(op.functional)(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out), leaves


@pytest.mark.parametrize("op,index", example_params())
def test_backward_runs_no_derivative_kernel(op, index):
    out, leaves = _output_and_leaves(op, index)
    with RecordOps() as recorder:
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert recorder.ops, "the recorder saw nothing"
    assert recorder.derivative_kernels == []


@pytest.mark.parametrize("op,index", example_params())
def test_double_backward_runs_no_derivative_kernel(op, index):
    """The double backward differentiates our backward: its ops must be ours or plain arithmetic too."""
    out, leaves = _output_and_leaves(op, index)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out), create_graph=True)
    live = [g for g in grads if g.requires_grad]
    if not live:  # a gradient that does not depend on the inputs (dropout: G_Y ⊙ M; nll_loss: −w_t ∂R/∂ℓ)
        return
    second = sum((g * torch.randn_like(g)).sum() for g in live)
    with RecordOps() as recorder:
        torch.autograd.grad(second, leaves, allow_unused=True)
    assert recorder.ops, "the recorder saw nothing"
    assert recorder.derivative_kernels == []


@pytest.mark.parametrize("op,index", example_params())
def test_forward_mode_runs_no_derivative_kernel(op, index):
    import torch.autograd.forward_ad as fwAD

    args, kwargs = example(op, index, F64, requires_grad=False)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    with RecordOps() as recorder, fwAD.dual_level():
        dual = list(args)
        for i in positions:
            dual[i] = fwAD.make_dual(args[i], torch.randn_like(args[i]))
        out = seeded(op.functional)(*dual, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        assert fwAD.unpack_dual(out).tangent is not None
    assert recorder.derivative_kernels == []


@pytest.mark.parametrize("fused_loss", [False, True], ids=["mlp", "mlp_loss"])
def test_mlp_backward_runs_no_derivative_kernel(fused_loss):
    model = mnn.MLP([6, 5, 4, 3], activation="gelu", dropout=0.2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with RecordOps() as recorder:
        loss = model.loss(x, y) if fused_loss else MF.cross_entropy(model(x), y)
        loss.backward()
    assert recorder.derivative_kernels == []
    assert all(p.grad is not None for p in model.parameters())
