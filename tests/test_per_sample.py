"""per_sample: per-sample gradient norms, gradients and DP-SGD's clipped sum, against torch's own per-sample
gradients (torch.func.vmap(grad(...)) on the torch.nn twin, or one autograd.grad per sample) in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import InputError

F64 = torch.float64


def per_layer_model(bias=True, dropout=0.0):
    layers = [mnn.Linear(6, 5, bias=bias), mnn.Tanh()]
    layers += [mnn.Dropout(dropout)] if dropout else []
    layers += [mnn.Linear(5, 4, bias=bias), mnn.ReLU(), mnn.Linear(4, 3, bias=bias)]
    return torch.nn.Sequential(*layers).double()


def fused_model(bias=True, dropout=0.0):
    return mnn.MLP([6, 5, 4, 3], activation="tanh", dropout=dropout, bias=bias).double()


def loss_of(model, x, y, reduction):
    if isinstance(model, mnn.MLP) and reduction == "mean" and x.dim() == 2:
        return model.loss(x, y)  # the fused loss, too
    return MF.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1), reduction=reduction)


def reference_per_sample(model, x, y, seed):
    """Each sample's gradient of its own loss term, by torch autograd on the torch.nn twin (same dropout masks)."""
    twin = _torch_twin(model)
    torch.manual_seed(seed)
    out = twin(x)
    terms = torch.nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="none")
    terms = terms.reshape(x.shape[0], -1).sum(1)  # ℓ_n: sample n's terms (a sequence's positions summed)
    params = list(twin.parameters())
    per_sample = [torch.autograd.grad(terms[n], params, retain_graph=True) for n in range(x.shape[0])]
    return [torch.stack([g[i] for g in per_sample]) for i in range(len(params))]


def _torch_twin(model):
    import copy

    twin = copy.deepcopy(torch.nn.Sequential(*model))
    for module in twin:
        module.__class__ = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
    return twin


@pytest.mark.parametrize("build", [per_layer_model, fused_model], ids=["per_layer", "fused"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["", "dropout"])
def test_norms_and_gradients_equal_torchs_per_sample_gradients(build, bias, reduction, dropout):
    torch.manual_seed(0)
    model = build(bias, dropout)
    x, y = torch.randn(7, 6, dtype=F64), torch.randint(0, 3, (7,))
    expected = reference_per_sample(model, x, y, seed=3)
    with manualgrad.per_sample(model, grads=True, loss_reduction=reduction) as samples:
        torch.manual_seed(3)
        loss = loss_of(model, x, y, reduction)
        loss.backward()
    params = list(model.parameters())
    for p, want in zip(params, expected):  # ℓ_n's gradient: the sum's n-th term, or the mean's before averaging
        torch.testing.assert_close(p.grad_sample, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(p.norm_sample, want.flatten(1).norm(dim=1), rtol=0, atol=1e-10)
    total = torch.stack([w.flatten(1).norm(dim=1) for w in expected]).square().sum(0).sqrt()
    torch.testing.assert_close(samples.norms, total, rtol=0, atol=1e-10)
    # the ordinary gradient is unchanged: the mean (or sum) of the per-sample gradients
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want.mean(0) if reduction == "mean" else want.sum(0), rtol=0, atol=1e-10)


def test_against_vmap_of_grad_on_the_torch_twin():
    """The issue's reference: torch.func.vmap(grad(...)) on the torch.nn twin, to 1e-10."""
    torch.manual_seed(0)
    model = per_layer_model()
    twin = _torch_twin(model)
    x, y = torch.randn(9, 6, dtype=F64), torch.randint(0, 3, (9,))
    params = {k: v.detach() for k, v in twin.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(twin, p, (xi[None],)), yi[None])

    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    with manualgrad.per_sample(model, grads=True) as samples:
        MF.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], rtol=0, atol=1e-10)
    total = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).square().sum(0).sqrt()
    torch.testing.assert_close(samples.norms, total, rtol=0, atol=1e-10)


@pytest.mark.parametrize("build", [per_layer_model, fused_model], ids=["per_layer", "fused"])
@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_clipping_gives_the_clipped_sum_in_one_backward(build, clip):
    torch.manual_seed(0)
    model = build(True, 0.2)
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    expected = reference_per_sample(model, x, y, seed=4)
    norms = torch.stack([w.flatten(1).norm(dim=1) for w in expected]).square().sum(0).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    backward_calls = []
    with manualgrad.per_sample(model, clip=clip) as samples:
        torch.manual_seed(4)
        loss = loss_of(model, x, y, "mean")
        loss.grad_fn.register_prehook(lambda g: backward_calls.append(1))
        loss.backward()
    assert len(backward_calls) == 1
    torch.testing.assert_close(samples.norms, norms, rtol=0, atol=1e-10)
    for p, want in zip(model.parameters(), expected):
        clipped_sum = (want * factor.reshape(-1, *[1] * (want.dim() - 1))).sum(0)
        torch.testing.assert_close(p.grad, clipped_sum, rtol=0, atol=1e-10)
    if clip == 100.0:  # nothing clipped: the sum of the per-sample gradients, N times the mean loss's gradient
        assert bool((factor == 1).all())


@pytest.mark.parametrize("positions", [3, 40], ids=["gram", "products"])
def test_sequence_inputs_use_the_general_formula(positions):
    """Inputs (N, T, q): g_n = Σ_t G[n,t] ⊗ A[n,t], whose norm is not ‖G[n]‖‖A[n]‖; both ways of computing it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(mnn.Linear(6, 5), mnn.Tanh(), mnn.Linear(5, 3)).double()
    x, y = torch.randn(4, positions, 6, dtype=F64), torch.randint(0, 3, (4, positions))
    expected = reference_per_sample(model, x, y, seed=0)
    with manualgrad.per_sample(model, grads=True, loss_reduction="sum") as samples:
        loss_of(model, x, y, "sum").backward()
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad_sample, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(p.norm_sample, want.flatten(1).norm(dim=1), rtol=0, atol=1e-10)
    assert samples.norms.shape == (4,)


def test_nothing_changes_outside_the_context():
    torch.manual_seed(0)
    model = per_layer_model()
    x, y = torch.randn(5, 6, dtype=F64), torch.randint(0, 3, (5,))
    MF.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with manualgrad.per_sample(model, clip=0.01):
        MF.cross_entropy(model(x), y).backward()
    norms = [p.norm_sample.clone() for p in model.parameters()]
    model.zero_grad()
    MF.cross_entropy(model(x[:3]), y[:3]).backward()  # after the context: plain gradients, attributes untouched
    MF.cross_entropy(model(x), y).backward()
    for p, n in zip(model.parameters(), norms):
        assert torch.equal(p.norm_sample, n)
    model.zero_grad()
    MF.cross_entropy(model(x), y).backward()
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-14)


def test_clipped_gradients_accumulate_like_grad():
    torch.manual_seed(0)
    model = per_layer_model()
    x, y = torch.randn(6, 6, dtype=F64), torch.randint(0, 3, (6,))
    with manualgrad.per_sample(model, clip=0.1):
        for _ in range(2):
            MF.cross_entropy(model(x), y).backward()
    twice = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with manualgrad.per_sample(model, clip=0.1):
        MF.cross_entropy(model(x), y).backward()
    for p, t in zip(model.parameters(), twice):
        torch.testing.assert_close(t, 2 * p.grad)


def test_layers_without_a_rule_are_refused_clearly():
    model = torch.nn.Sequential(mnn.Linear(4, 4), torch.nn.BatchNorm1d(4), mnn.Linear(4, 2))
    with pytest.raises(InputError, match=r"per_sample: 1 \(BatchNorm1d\) has parameters but no per-sample rule"):
        manualgrad.per_sample(model)
    with pytest.raises(InputError, match=r"0 \(Linear\).*manualgrad.convert"):
        manualgrad.per_sample(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    frozen = torch.nn.Sequential(torch.nn.BatchNorm1d(4).requires_grad_(False).eval(), mnn.Linear(4, 2))
    with manualgrad.per_sample(frozen):  # a module without trainable parameters needs no rule (if it mixes nothing)
        pass
    with pytest.raises(InputError, match="clip must be a positive number"):
        manualgrad.per_sample(frozen, clip=0)
    with pytest.raises(InputError, match="loss_reduction must be 'mean' or 'sum'"):
        manualgrad.per_sample(frozen, loss_reduction="none")
    with manualgrad.per_sample(frozen), pytest.raises(InputError, match="do not nest"):
        with manualgrad.per_sample(frozen):
            pass


def test_shared_weights_are_refused_clearly():
    layer = mnn.Linear(3, 3).double()
    model = torch.nn.Sequential(layer, mnn.Tanh(), layer)
    with manualgrad.per_sample(model), pytest.raises(InputError, match="used more than once"):
        model(torch.randn(2, 3, dtype=F64)).sum().backward()


def cnn(**conv):
    features = [mnn.Conv2d(2, 3, 3, **conv), mnn.ReLU(), mnn.Conv2d(3, 4, 2), mnn.Tanh(), mnn.Flatten()]
    width = torch.nn.Sequential(*features)(torch.zeros(1, 2, 9, 9)).shape[1]
    return torch.nn.Sequential(*features, mnn.Linear(width, 3)).double()


@pytest.mark.parametrize(
    "conv",
    [
        {},
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": "same", "bias": False},
        {"padding_mode": "reflect", "padding": 1},
    ],
    ids=["plain", "stride,padding", "dilation,same,nobias", "reflect"],
)
@pytest.mark.parametrize("clip", [None, 0.3], ids=["norms", "clip"])
def test_convolutions_per_sample(conv, clip):
    """Conv2d: sample n's G_W is G_Z[n] X̂[n]ᵀ over the output positions, X̂ its patches."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 2, 9, 9, dtype=F64), torch.randint(0, 3, (5,))
    model = cnn(**conv)
    expected = reference_per_sample(model, x, y, seed=0)
    with manualgrad.per_sample(model, grads=clip is None, clip=clip) as samples:
        MF.cross_entropy(model(x), y).backward()
    norms = torch.stack([w.flatten(1).norm(dim=1) for w in expected]).square().sum(0).sqrt()
    torch.testing.assert_close(samples.norms, norms, rtol=0, atol=1e-10)
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.norm_sample, want.flatten(1).norm(dim=1), rtol=0, atol=1e-10)
        if clip is None:
            torch.testing.assert_close(p.grad_sample, want, rtol=0, atol=1e-10)
        else:
            factor = (clip / (norms + 1e-6)).clamp(max=1.0).reshape(-1, *[1] * (want.dim() - 1))
            torch.testing.assert_close(p.grad, (want * factor).sum(0), rtol=0, atol=1e-10)


def test_grouped_convolutions_are_refused_clearly():
    model = torch.nn.Sequential(mnn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(InputError, match=r"per_sample: 0 \(Conv2d\) has groups=2"):
        manualgrad.per_sample(model)
