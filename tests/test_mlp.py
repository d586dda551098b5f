"""The fused MLP: one Function for the whole network, equal to the per-layer model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import F64

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import InputError, _compat


@pytest.mark.parametrize("activation", [*mnn.ACTIVATIONS, "gelu_tanh", "leaky_negative", "elu_negative"])
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


# ---- the fused MLP computes what its children are now (issue: a structure cached at construction)


def _fused_equals_per_layer(model, x, y, dropout_seed=5):
    """The fused forward, loss and gradients equal the per-layer model's (the same modules run one by one)."""
    leaves = list(model.parameters())
    results = []
    for run in (lambda: model.loss(x, y), lambda: MF.cross_entropy(model.per_layer()(x), y)):
        torch.manual_seed(dropout_seed)
        loss = run()
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (fused, fused_grads), (reference, reference_grads) = results
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    outputs = []
    for run in (model, model.per_layer()):
        torch.manual_seed(dropout_seed)
        outputs.append(run(x))
    torch.testing.assert_close(*outputs)


def test_replacing_the_last_layer_is_what_the_fused_path_computes():
    """Transfer learning: a new head with another number of classes."""
    model = mnn.MLP([6, 5, 4]).double()
    model[-1] = mnn.Linear(5, 7).double()
    assert model.sizes == (6, 5, 7)
    x, y = torch.randn(3, 6, dtype=F64), torch.tensor([0, 6, 3])
    assert model(x).shape == (3, 7)
    _fused_equals_per_layer(model, x, y)
    model[-1] = torch.nn.Linear(5, 2).double()  # a plain torch.nn.Linear computes the same map
    _fused_equals_per_layer(model, x, torch.tensor([0, 1, 1]))


def test_changed_activation_parameter_and_dropout_probability():
    model = mnn.MLP([6, 5, 5, 3], activation="leaky_relu", dropout=0.2).double()
    model[1].negative_slope = 0.3
    model[2].p = 0.6
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    _fused_equals_per_layer(model, x, y)
    model[4] = mnn.Tanh()  # a different activation in the second hidden layer
    _fused_equals_per_layer(model, x, y)
    model.eval()
    torch.testing.assert_close(model(x), model.per_layer()(x))


def test_an_activation_subclass_with_its_own_forward_is_refused():
    class Swish(torch.nn.SiLU):
        def forward(self, input):
            return input * torch.sigmoid(2 * input)

    class NamedReLU(torch.nn.ReLU):  # keeps ReLU's forward: the fused path may compute it
        pass

    model = mnn.MLP([4, 3, 2]).double()
    model[1] = NamedReLU()
    x, y = torch.randn(2, 4, dtype=F64), torch.tensor([0, 1])
    _fused_equals_per_layer(model, x, y)
    model[1] = Swish()
    with pytest.raises(InputError, match=r"MLP: child 1 \(Swish\) is not what the fused MLP can compute.*per_layer"):
        model(x)
    with pytest.raises(InputError, match=r"MLP.loss: child 1 \(Swish\)"):
        model.loss(x, y)
    with pytest.raises(InputError, match="not one of"):
        mnn.MLP([4, 3, 2], activation=Swish())


def test_the_last_child_must_be_linear():
    model = mnn.MLP([4, 3, 2])
    model.append(mnn.ReLU())
    with pytest.raises(InputError, match="the last child must be a Linear layer, got ReLU"):
        model(torch.randn(2, 4))


def test_empty_batch_loss_is_nan_with_zero_gradients_like_torch():
    model = mnn.MLP([4, 3, 2]).double()
    x, y = torch.randn(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long)
    for smoothing in (0.0, 0.1):
        loss = model.loss(x, y, label_smoothing=smoothing)
        reference = torch.nn.functional.cross_entropy(model.per_layer()(x), y, label_smoothing=smoothing)
        assert torch.isnan(loss) and torch.isnan(reference)
        for g in torch.autograd.grad(loss, list(model.parameters())):
            assert torch.equal(g, torch.zeros_like(g))


# ---- the fused MLP honours its children's own state: modes, hooks, pruning, parametrisations


def test_a_dropout_child_in_training_mode_drops_alone_in_an_eval_mlp():
    """Monte Carlo dropout: ``m.eval(); m[2].train()`` drops as the per-layer model does, with its masks."""
    model = mnn.MLP([6, 8, 8, 4], dropout=0.5).double()
    model.eval()
    model[2].train()
    x, y = torch.randn(10, 6, dtype=F64), torch.randint(0, 4, (10,))
    _fused_equals_per_layer(model, x, y)
    torch.manual_seed(0)
    first = model(x)
    assert not torch.equal(first, model(x))  # a new mask each call: it does drop


def test_a_dropout_child_in_eval_mode_does_not_drop_in_a_training_mlp():
    model = mnn.MLP([6, 8, 8, 4], dropout=0.5).double()
    model[2].eval()
    x, y = torch.randn(10, 6, dtype=F64), torch.randint(0, 4, (10,))
    _fused_equals_per_layer(model, x, y)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "full_backward_pre"])
def test_hooks_on_children_run(kind):
    """A hook on a child runs and what it returns counts, in forward, loss and backward."""
    model = mnn.MLP([5, 6, 3]).double()
    calls = []

    def hook(module, *args):
        calls.append(kind)
        if kind == "forward":
            return args[-1] * 2  # the child's output doubled
        if kind == "forward_pre":
            return (args[0][0] + 1,)  # the child's input shifted
        return tuple(g * 3 for g in args[-1])  # the gradient tripled

    getattr(model[1], f"register_{kind}_hook")(hook)
    x, y = torch.randn(4, 5, dtype=F64, requires_grad=True), torch.tensor([0, 1, 2, 0])
    _fused_equals_per_layer(model, x, y)
    calls.clear()
    model.loss(x, y).backward()
    assert calls == [kind]


def test_a_pruned_child_computes_with_its_masked_weight():
    """``prune.l1_unstructured(m[0], "weight", 0.5)`` recomputes the weight in a forward-pre hook: after an
    optimizer step the fused MLP still uses weight_orig * mask, as the per-layer model does."""
    import torch.nn.utils.prune as prune

    model = mnn.MLP([6, 8, 4]).double()
    prune.l1_unstructured(model[0], "weight", 0.5)
    x, y = torch.randn(7, 6, dtype=F64), torch.randint(0, 4, (7,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.loss(x, y).backward()
    optimizer.step()
    _fused_equals_per_layer(model, x, y)
    torch.testing.assert_close(model(x), model.per_layer()(x), rtol=0, atol=0)


def test_a_global_module_hook_runs_for_the_children():
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        mnn.MLP([3, 4, 2])(torch.randn(2, 3))
    finally:
        handle.remove()
    assert seen == ["Linear", "ReLU", "Linear", "MLP"]


def test_a_parametrised_child_is_computed_through_its_parametrisation():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Symmetric(torch.nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(0, 1)

    model = mnn.MLP([6, 6, 4]).double()
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    weight_norm(model[2])
    x, y = torch.randn(5, 6, dtype=F64), torch.randint(0, 4, (5,))
    _fused_equals_per_layer(model, x, y)


_ACTIVATION_MODULES = st.sampled_from(
    [
        lambda draw: mnn.ReLU(),
        lambda draw: mnn.Tanh(),
        lambda draw: mnn.Sigmoid(),
        lambda draw: mnn.SiLU(),
        lambda draw: mnn.LeakyReLU(draw(st.floats(-1.0, 1.0))),
        lambda draw: mnn.ELU(draw(st.floats(0.1, 2.0))),
        lambda draw: torch.nn.GELU(draw(st.sampled_from(["none", "tanh"]))),
        lambda draw: torch.nn.Softplus(draw(st.floats(0.5, 3.0))),
    ]
)


@st.composite
def _mlps(draw):
    """An MLP with random widths and dropout, its activations replaced at random (torch.nn's or ours, random
    slopes), and random child states: each child's mode, hooks, a pruned or parametrised Linear."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    dropout = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    model = mnn.MLP(sizes, dropout=dropout).double()
    model.train(draw(st.booleans()))
    for index, child in enumerate(model):
        if not isinstance(child, (torch.nn.Linear, torch.nn.Dropout)):
            model[index] = draw(_ACTIVATION_MODULES)(draw)
        if isinstance(child, torch.nn.Dropout):
            child.p = draw(st.sampled_from([child.p, 0.0, 0.5]))
        model[index].train(draw(st.booleans()))
        if draw(st.integers(0, 9)) == 0:
            model[index].register_forward_hook(lambda m, i, o: o * 0.5)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    touched = draw(st.sampled_from([None, "prune", "parametrize"]))
    if touched == "prune":
        import torch.nn.utils.prune as prune

        prune.random_unstructured(draw(st.sampled_from(linears)), "weight", 0.5)
    elif touched == "parametrize":
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(draw(st.sampled_from(linears)), "weight", torch.nn.Tanh())
    return model


@settings(max_examples=60, deadline=None)
@given(model=_mlps(), rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_fused_equals_per_layer_under_random_child_states(model, rows, seed):
    x = torch.randn(rows, model.sizes[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, model.sizes[-1], (rows,), generator=torch.Generator().manual_seed(seed))
    _fused_equals_per_layer(model, x, y, dropout_seed=seed)
    hooked = any(_compat.has_call_hooks(module) for module in model)  # then the children run one by one
    fused = type(model.loss(x, y).grad_fn).__name__ == "MLPCrossEntropyFunctionBackward"
    assert fused != hooked


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32], ids=str)
def test_loss_takes_the_target_dtypes_cross_entropy_takes(dtype):
    """``mlp.loss(x, t)`` equals ``cross_entropy(mlp(x), t)``: for the targets torch takes (int64, uint8), and an
    InputError naming MLP.loss for the others."""
    model = mnn.MLP([4, 5, 3]).double()
    x, y = torch.randn(6, 4, dtype=F64), torch.tensor([0, 1, 2, 2, 1, 0]).to(dtype)
    if dtype == torch.int32:
        with pytest.raises(InputError, match=r"^MLP.loss: target must be class indices of dtype int64"):
            model.loss(x, y)
        return
    torch.testing.assert_close(model.loss(x, y), torch.nn.functional.cross_entropy(model(x), y))
