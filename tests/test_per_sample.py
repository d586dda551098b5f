"""per_sample: per-sample gradient norms, gradients and DP-SGD's clipped sum, against torch's own per-sample
gradients (torch.func.vmap(grad(...)) on the torch.nn twin, or one autograd.grad per sample) in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune
from support import F64
from torch.func import functional_call, grad, vmap

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import InputError
from manualgrad.functions import conv as convolution
from manualgrad.per_sample import EPSILON


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


@pytest.mark.parametrize(
    "side,channels",
    [(4, 2), (12, 2), (12, 16)],
    ids=["gram: few positions", "products: many positions", "products by kernel offsets: 16 channels"],
)
def test_convolutions_per_sample_either_way(side, channels, monkeypatch):
    """Both ways a convolution's per-sample norms are formed: the T x T Gram form of G and the patches (few
    output positions, many weights), or each G_W[n] formed (many positions): by one grouped convolution, or,
    from :data:`convolution.OFFSETS_AT` channels, by kernel offsets."""
    torch.manual_seed(0)
    offsets, by_offsets = [], convolution._weight_grad_by_offsets
    monkeypatch.setattr(
        convolution, "_weight_grad_by_offsets", lambda *a, **k: offsets.append(1) or by_offsets(*a, **k)
    )
    model = torch.nn.Sequential(mnn.Conv2d(channels, 16, 3), mnn.Tanh(), mnn.Flatten()).double()
    model.append(mnn.Linear(16 * (side - 2) ** 2, 3).double())
    x, y = torch.randn(4, channels, side, side, dtype=F64), torch.randint(0, 3, (4,))
    expected = reference_per_sample(model, x, y, seed=0)
    with manualgrad.per_sample(model, grads=True):
        MF.cross_entropy(model(x), y).backward()
    assert bool(offsets) == (channels >= convolution.OFFSETS_AT)
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad_sample, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(p.norm_sample, want.flatten(1).norm(dim=1), rtol=0, atol=1e-10)


def test_grouped_convolutions_are_refused_clearly():
    model = torch.nn.Sequential(mnn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(InputError, match=r"per_sample: 0 \(Conv2d\) has groups=2"):
        manualgrad.per_sample(model)


# --- the defects of issue 16, each with the test that failed before its fix --------------------------------------


def per_sample_reference(layer, x, y, reduction="mean"):
    """Each sample's gradient of its own loss term for a single torch Linear layer's trainable parameters."""
    params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
    grads = []
    for n in range(x.shape[0]):
        out = torch.nn.functional.linear(x[n : n + 1], layer.weight, layer.bias)
        grads.append(torch.autograd.grad(torch.nn.functional.cross_entropy(out, y[n : n + 1]), params))
    return [torch.stack([g[i] for g in grads]) for i in range(len(params))]


def clipped_sum(per_sample_grads, clip):
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample_grads]).square().sum(0).sqrt()
    factor = (clip / (norms + EPSILON)).clamp(max=1.0)
    return [(g * factor.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for g in per_sample_grads], norms


@pytest.mark.parametrize("build", [per_layer_model, fused_model], ids=["per_layer", "fused"])
def test_an_empty_batch_is_a_zero_clipped_sum(build):
    model = build()
    x, y = torch.randn(0, 6, dtype=F64), torch.randint(0, 3, (0,))
    with manualgrad.per_sample(model, clip=1.0) as samples:
        MF.cross_entropy(model(x), y).backward()
    assert samples.norms.shape == (0,)
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_a_loss_whose_reduction_differs_from_the_declared_one_is_refused():
    torch.manual_seed(0)
    model = per_layer_model()
    x, y = torch.randn(5, 6, dtype=F64), torch.randint(0, 3, (5,))
    with manualgrad.per_sample(model, clip=1.0, loss_reduction="mean"):
        with pytest.raises(InputError, match=r"reduction='sum' but the context was declared with loss_reduction='mean"):
            MF.cross_entropy(model(x), y, reduction="sum").backward()
    with manualgrad.per_sample(model, loss_reduction="sum"):
        with pytest.raises(InputError, match=r"reduction='mean'"):
            MF.mse_loss(model(x), torch.zeros(5, 3, dtype=F64)).backward()


def test_a_frozen_weight_leaves_its_trainable_bias_clipped():
    """BitFit: only the biases train; their per-sample gradients are clipped and get a norm_sample."""
    torch.manual_seed(0)
    layer = mnn.Linear(6, 3).double()
    layer.weight.requires_grad_(False)
    x, y = 5 * torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    (bias_grads,) = per_sample_reference(layer, x, y)
    (want,), norms = clipped_sum([bias_grads], 0.001)
    with manualgrad.per_sample(layer, clip=0.001) as samples:
        MF.cross_entropy(layer(x), y).backward()
    torch.testing.assert_close(layer.bias.grad, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.norm_sample, norms, rtol=0, atol=1e-12)
    torch.testing.assert_close(samples.norms, norms, rtol=0, atol=1e-12)
    assert layer.bias.grad.norm() <= 8 * 0.001 + 1e-12
    assert layer.weight.grad is None and not hasattr(layer.weight, "norm_sample")


@pytest.mark.parametrize("build", [per_layer_model, fused_model], ids=["per_layer", "fused"])
def test_a_frozen_bias_gets_no_grad_and_does_not_count_in_the_norms(build):
    torch.manual_seed(0)
    model = build()
    for name, p in model.named_parameters():
        p.requires_grad_("bias" not in name)
    x, y = torch.randn(6, 6, dtype=F64), torch.randint(0, 3, (6,))
    with manualgrad.per_sample(model, grads=True) as samples:
        MF.cross_entropy(model(x), y).backward()
    weights = [p for name, p in model.named_parameters() if "weight" in name]
    total = torch.stack([w.norm_sample for w in weights]).square().sum(0).sqrt()
    torch.testing.assert_close(samples.norms, total, rtol=0, atol=1e-12)
    model.zero_grad()
    with manualgrad.per_sample(model, clip=0.01):
        MF.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == ("bias" in name), name
        assert hasattr(p, "norm_sample") != ("bias" in name), name


def test_a_pruned_layer_is_refused():
    model = per_layer_model()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.raises(InputError, match=r"per_sample: 0 \(Linear\) computes its weight .* pruning mask"):
        manualgrad.per_sample(model, clip=1.0)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["norms", "clip"])
def test_a_forward_outside_the_context_is_refused_in_backward(clip):
    torch.manual_seed(0)
    model = per_layer_model()
    x, y = torch.randn(4, 6, dtype=F64), torch.randint(0, 3, (4,))
    loss = MF.cross_entropy(model(x), y)
    with manualgrad.per_sample(model, clip=clip), pytest.raises(InputError, match="forward ran outside"):
        loss.backward()


def test_contexts_are_per_thread():
    """A context open in one thread neither clips another thread's plain step nor refuses its own context."""
    import threading

    torch.manual_seed(0)
    x, y = torch.randn(6, 6, dtype=F64), torch.randint(0, 3, (6,))
    models = [per_layer_model() for _ in range(3)]
    plain_model = models[2]
    MF.cross_entropy(plain_model(x), y).backward()
    plain = [p.grad.clone() for p in plain_model.parameters()]
    plain_model.zero_grad()
    expected = []
    for model in models[:2]:
        with manualgrad.per_sample(model, clip=0.01):
            MF.cross_entropy(model(x), y).backward()
        expected.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    barrier, errors = threading.Barrier(3, timeout=30), []

    def clipped(model):
        try:
            with manualgrad.per_sample(model, clip=0.01):
                barrier.wait()
                MF.cross_entropy(model(x), y).backward()
                barrier.wait()
        except Exception as e:  # reported below
            errors.append(e)

    def unclipped():
        barrier.wait()
        MF.cross_entropy(plain_model(x), y).backward()
        barrier.wait()

    threads = [threading.Thread(target=clipped, args=(m,)) for m in models[:2]] + [threading.Thread(target=unclipped)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for model, want in zip(models, expected):
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-14)
    for p, w in zip(plain_model.parameters(), plain):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-14)


def test_a_batchnorm_without_parameters_is_refused():
    model = torch.nn.Sequential(mnn.Linear(4, 4), torch.nn.BatchNorm1d(4, affine=False), mnn.Linear(4, 2))
    with pytest.raises(InputError, match=r"1 \(BatchNorm1d\) mixes the samples"):
        with manualgrad.per_sample(model):
            pass
    model.eval()  # running statistics: each sample on its own
    with manualgrad.per_sample(model):
        pass


def test_the_context_works_after_an_exception_mid_backward():
    torch.manual_seed(0)
    model = per_layer_model()
    x, y = torch.randn(5, 6, dtype=F64), torch.randint(0, 3, (5,))
    with manualgrad.per_sample(model, clip=0.1):
        MF.cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with manualgrad.per_sample(model, clip=0.1):
        h = model[0](x)  # the last layers record first; then this hook raises
        h.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            MF.cross_entropy(model[1:](h), y).backward()
        model.zero_grad()
        MF.cross_entropy(model(x), y).backward()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-14)


@pytest.mark.parametrize("clip", [True, False, "1", float("nan"), -1.0])
def test_clip_must_be_a_positive_number(clip):
    with pytest.raises(InputError, match="clip must be a positive number"):
        manualgrad.per_sample(per_layer_model(), clip=clip)


# --- the layers DP users train: LayerNorm, GroupNorm, Embedding -------------------------------------------------


class TextModel(torch.nn.Module):
    """Embedding, LayerNorm, Linear over a sequence; the loss is each sequence's mean over its positions."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6, padding_idx=padding_idx)
        self.norm = torch.nn.LayerNorm(6)
        self.act = torch.nn.Tanh()
        self.out = torch.nn.Linear(6, 3)

    def forward(self, tokens):
        return self.out(self.act(self.norm(self.embed(tokens))))


def group_norm_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    )


def torch_per_sample(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out.reshape(-1, 3), yi.reshape(-1))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize(
    "build,inputs",
    [
        (TextModel, lambda: (torch.randint(0, 11, (5, 7)), torch.randint(0, 3, (5, 7)))),
        (lambda: TextModel(padding_idx=2), lambda: (torch.randint(0, 11, (5, 7)), torch.randint(0, 3, (5, 7)))),
        (TextModel, lambda: (torch.randint(0, 11, (4, 40)), torch.randint(0, 3, (4, 40)))),  # norms by row sums
        (group_norm_cnn, lambda: (torch.randn(5, 2, 6, 6, dtype=F64), torch.randint(0, 3, (5,)))),
    ],
    ids=["text", "text,padding_idx", "text,40 positions", "groupnorm"],
)
@pytest.mark.parametrize("clip", [None, 0.05], ids=["grads", "clip"])
def test_norm_and_embedding_layers_per_sample(build, inputs, clip):
    """Per-sample gradients, norms (the embedding's by the Gram form) and the clipped sum against torch.func's
    vmap(grad) on the torch.nn model, float64."""
    torch.manual_seed(0)
    reference = build().double()
    model = manualgrad.convert(copy.deepcopy(reference))
    x, y = inputs()
    expected = torch_per_sample(reference, x, y)
    with manualgrad.per_sample(model, grads=clip is None, clip=clip) as samples:
        # the mean over N x T terms: sample n's term is the mean over its own T positions, as the reference's
        MF.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).square().sum(0).sqrt()
    torch.testing.assert_close(samples.norms, norms, rtol=0, atol=1e-10)
    for name, p in model.named_parameters():
        want = expected[name]
        torch.testing.assert_close(p.norm_sample, want.flatten(1).norm(dim=1), rtol=0, atol=1e-10)
        if clip is None:
            torch.testing.assert_close(p.grad_sample, want, rtol=0, atol=1e-10)
        else:
            factor = (clip / (norms + EPSILON)).clamp(max=1.0).reshape(-1, *[1] * (want.dim() - 1))
            torch.testing.assert_close(p.grad, (want * factor).sum(0), rtol=0, atol=1e-10)


def test_embedding_padding_idx_matches_torch():
    torch.manual_seed(0)
    theirs = torch.nn.Embedding(7, 4, padding_idx=3).double()
    ours = manualgrad.convert(copy.deepcopy(theirs))
    tokens = torch.tensor([[3, 1, 3], [0, 3, 6]])
    g = torch.randn(2, 3, 4, dtype=F64)
    ours(tokens).backward(g)
    theirs(tokens).backward(g)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0, atol=1e-14)
    assert not ours.weight.grad[3].any()


@pytest.mark.parametrize("clip", [None, 0.05], ids=["grads", "clip"])
def test_conv1d_per_sample(clip):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv1d(4, 3, 2, stride=2), torch.nn.Flatten()
    ).double()
    model = manualgrad.convert(copy.deepcopy(reference))
    x, y = torch.randn(5, 2, 6, dtype=F64), torch.randint(0, 3, (5, 3))
    params = {k: v.detach() for k, v in reference.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(reference, p, (xi[None],)).reshape(3, 3), yi)

    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    with manualgrad.per_sample(model, grads=clip is None, clip=clip) as samples:
        MF.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).square().sum(0).sqrt()
    torch.testing.assert_close(samples.norms, norms, rtol=0, atol=1e-10)
    for name, p in model.named_parameters():
        if clip is None:
            torch.testing.assert_close(p.grad_sample, expected[name], rtol=0, atol=1e-10)
        else:
            factor = (clip / (norms + EPSILON)).clamp(max=1.0).reshape(-1, *[1] * (p.dim()))
            torch.testing.assert_close(p.grad, (expected[name] * factor).sum(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "build,empty",
    [
        (
            lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3)),
            (0, 1, 4, 4),
        ),
        (
            lambda: torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.Flatten()),
            (0, 2, 3),
        ),
        (lambda: TextModel(), "tokens"),
    ],
    ids=["conv2d,linear", "conv1d,groupnorm", "embedding,layernorm"],
)
def test_an_empty_batch_through_every_layer_with_a_rule(build, empty):
    model = manualgrad.convert(build().double())
    x = torch.zeros(0, 4, dtype=torch.long) if empty == "tokens" else torch.zeros(empty, dtype=F64)
    with manualgrad.per_sample(model, clip=1.0) as samples:
        MF.cross_entropy(model(x).reshape(-1, 3), torch.zeros(0, dtype=torch.long)).backward()
    assert samples.norms.shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
