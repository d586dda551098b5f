"""The fused MLP: one Function for the whole network, equal to the per-layer model."""

from __future__ import annotations

import pytest
import torch

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn

F64 = torch.float64


@pytest.mark.parametrize("activation", list(mnn.ACTIVATIONS) + ["gelu_tanh", "leaky_negative", "elu_negative"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_per_layer_float64(activation, dropout):
    module = {"gelu_tanh": mnn.GELU("tanh"), "leaky_negative": mnn.LeakyReLU(-0.2), "elu_negative": mnn.ELU(-0.5)}.get(
        activation, activation
    )
    model = mnn.MLP([7, 6, 5, 3], activation=module, dropout=dropout).double()
    per_layer = model.per_layer()
    x, y = torch.randn(9, 7, dtype=F64, requires_grad=True), torch.randint(0, 3, (9,))
    leaves = [x, *model.parameters()]
    results = []
    for run in (
        lambda: MF.cross_entropy(model(x), y, label_smoothing=0.1),
        lambda: model.loss(x, y, label_smoothing=0.1),
        lambda: MF.cross_entropy(per_layer(x), y, label_smoothing=0.1),
    ):
        torch.manual_seed(5)  # the same dropout masks: the fused forward draws them in layer order
        loss = run()
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (reference, reference_grads) = results[-1]
    for loss, grads in results[:-1]:
        torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
        for a, b in zip(grads, reference_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_state_dict_is_the_per_layer_sequential():
    plain = mnn.MLP([4, 5, 3])
    assert list(plain.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    dropped = mnn.MLP([4, 5, 5, 3], dropout=0.1, bias=False)
    assert list(dropped.state_dict()) == ["0.weight", "3.weight", "6.weight"]
    torch_twin = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    plain.load_state_dict(torch_twin.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(plain(x), torch_twin(x))
    assert isinstance(plain[0:2], torch.nn.Sequential) and not isinstance(plain[0:2], mnn.MLP)


def test_leading_dimensions_and_frozen_layers():
    model = mnn.MLP([4, 6, 3], activation="silu").double()
    reference = model.per_layer()
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    out, ref = model(x), reference(x)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    leaves = [x, model[0].bias, model[2].weight, model[2].bias]
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b)


def test_loss_scales_by_the_incoming_gradient_and_eval_is_deterministic():
    model = mnn.MLP([4, 8, 3], dropout=0.5).double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    torch.manual_seed(0)
    (3.0 * model.loss(x, y)).backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(0)
    (3.0 * MF.cross_entropy(model.per_layer()(x), y)).backward()
    for a, p in zip(fused, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    with torch.no_grad():
        assert not model.loss(x, y).requires_grad


def test_single_layer_and_coverage():
    model = mnn.MLP([5, 2])
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 1])
    assert manualgrad.manual_coverage(model.loss(x, y)).complete
    torch.testing.assert_close(model.loss(x, y), torch.nn.functional.cross_entropy(model(x), y))
