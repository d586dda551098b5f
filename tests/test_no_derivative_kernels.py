"""The guarantee: no backward of ours runs autograd or one of PyTorch's derivative kernels.

A TorchDispatchMode sees every aten op that runs. PyTorch's derivative
kernels are the ops named ``*_backward`` (``threshold_backward``,
``sigmoid_backward``...) and ``*_backward_data`` (softmax, log_softmax).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ACTIVATION_IDS, ACTIVATIONS
from torch.utils._python_dispatch import TorchDispatchMode

import manualgrad.functional as MF
import manualgrad.nn as mnn


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def derivative_kernels(self):
        return sorted({op for op in self.ops if "backward" in op})


def backward_ops(output, inputs, create_graph=False):
    with RecordOps() as recorder:
        grads = torch.autograd.grad(output, inputs, torch.ones_like(output), create_graph=create_graph)
    return recorder, grads


def test_the_recorder_catches_torchs_own_kernels():
    """The check can fail: torch.nn's ReLU backward runs threshold_backward."""
    x = torch.randn(4, requires_grad=True)
    recorder, _ = backward_ops(torch.relu(x), [x])
    assert recorder.derivative_kernels == ["threshold_backward"]
    recorder, _ = backward_ops(torch.nn.functional.cross_entropy(x.view(2, 2), torch.tensor([0, 1])), [x])
    assert "_log_softmax_backward_data" in recorder.derivative_kernels


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


# name -> fn(x) returning (output, the other leaves it differentiates)
CASES = {
    "linear": lambda x: (lambda w, b: (MF.linear(x, w, b), [w, b]))(_leaf(3, 5), _leaf(3)),
    "cross_entropy": lambda x: (MF.cross_entropy(x, torch.tensor([0, 4, 2, 1]), label_smoothing=0.1), []),
    "cross_entropy_probs": lambda x: (
        lambda t: (MF.cross_entropy(x, t, weight=torch.rand(5, dtype=torch.float64)), [t])
    )(torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1).requires_grad_()),
    "mse_loss": lambda x: (lambda t: (MF.mse_loss(x, t), [t]))(_leaf(4, 5)),
    "dropout": lambda x: (MF.dropout(x, 0.3), []),
    **{name: (lambda fn, kw: lambda x: (fn(x, **kw), []))(fn, kw) for name, fn, _, kw, _ in ACTIVATIONS},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("order", [1, 2], ids=["backward", "double_backward"])
def test_backward_runs_no_derivative_kernel(name, order):
    x = _leaf(4, 5)
    out, others = CASES[name](x)
    out = out.sum()
    leaves = [x, *others]
    if order == 1:
        recorder, _ = backward_ops(out, leaves)
    else:  # the double backward differentiates our backward: its ops must be ours or plain arithmetic too
        grads = torch.autograd.grad(out, leaves, create_graph=True)
        if not any(g.requires_grad for g in grads):
            assert name == "dropout", f"{name}'s gradient should depend on its input"  # G_X = G_Y ⊙ K/(1-p) is constant
            return
        second = sum((g * torch.randn_like(g)).sum() for g in grads if g.requires_grad)
        with RecordOps() as recorder:
            torch.autograd.grad(second, leaves, allow_unused=True)
    assert recorder.ops, "the recorder saw nothing"
    assert recorder.derivative_kernels == []


@pytest.mark.parametrize("name", ACTIVATION_IDS)
def test_forward_mode_runs_no_derivative_kernel(name):
    import torch.autograd.forward_ad as fwAD

    fn = CASES[name]
    with RecordOps() as recorder, fwAD.dual_level():
        out, _ = fn(fwAD.make_dual(torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)))
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
