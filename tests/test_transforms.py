"""torch.func (vmap per-sample gradients, jvp, jacrev), torch.compile (no graph breaks, same gradients)
and autocast (dtypes like torch.nn): for every registered operation, and on models of manualgrad modules."""

from __future__ import annotations

import pytest
import torch
from support import CUDA, F64, differentiable, example, example_params, op_params, seeded
from torch.func import functional_call, grad, jacrev, jvp, vmap

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import testing


def _samples(op, index, n=3):
    """``n`` independent draws of an example, stacked along a new first dimension (kwargs from the first)."""
    draws = [example(op, index, F64, seed=s) for s in range(n)]
    args = [
        torch.stack([d[0][i] for d in draws]).detach() if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(draws[0][0])
    ]
    return args, draws[0][1], [d[0] for d in draws]


@pytest.mark.parametrize("op,index", example_params())
def test_vmap_per_sample_gradients_match_a_loop(op, index):
    """vmap(grad(...)) over a batch of calls: outputs and per-sample gradients equal a Python loop's."""
    stacked, kwargs, loop = _samples(op, index)
    positions = differentiable(loop[0])
    assert positions, "an example without a differentiable input"
    g = torch.randn_like(torch.stack([seeded(op.functional)(*a, **kwargs) for a in loop]))

    def objective(*args):
        out = op.functional(*args[:-1], **kwargs)
        return (out * args[-1]).sum()

    randomness = "same" if testing.is_random(op) else "error"
    torch.manual_seed(7)
    in_dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in stacked) + (0,)  # options are shared
    per_sample = vmap(grad(objective, argnums=tuple(positions)), in_dims=in_dims, randomness=randomness)(*stacked, g)
    for n, args in enumerate(loop):
        torch.manual_seed(7)
        expected = torch.autograd.grad(objective(*args, g[n]), [args[i] for i in positions])
        for got, want in zip(per_sample, expected):
            torch.testing.assert_close(got[n], want)


@pytest.mark.slow
@pytest.mark.parametrize("op", op_params())
def test_compile_has_no_graph_breaks_and_same_gradients(op):
    """Each operation's first example (compiling is slow) under torch.compile(fullgraph=True)."""
    args, kwargs = example(op, 0, F64)
    positions = differentiable(args)

    def fn(*a):
        return op.functional(*a, **kwargs)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.manual_seed(7)  # the same dropout mask in both runs
    out = compiled(*args)
    torch.manual_seed(7)
    expected = fn(*args)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    leaves = [args[i] for i in positions]
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op,index", example_params())
def test_autocast_dtypes_like_torch(op, index):
    """Under CPU bfloat16 autocast: the output and every gradient in the dtype torch's own op gives them."""
    args, kwargs = example(op, index, torch.float32)
    positions = differentiable(args)
    results = []
    for fn in (op.functional, op.reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = seeded(fn)(*args, **kwargs)
        grads = torch.autograd.grad(out, [args[i] for i in positions], torch.ones_like(out)) if positions else ()
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype and [g.dtype for g in grads] == [g.dtype for g in ref_grads]
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2, equal_nan=True)


def small_model(activation=mnn.GELU):
    return torch.nn.Sequential(mnn.Linear(6, 8), activation(), mnn.Linear(8, 8), mnn.Tanh(), mnn.Linear(8, 3)).double()


def torch_twin(model):
    twin = torch.nn.Sequential(
        *[
            torch.nn.Linear(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else type(m).__mro__[1]()
            for m in model
        ]
    ).double()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize(
    "activation", [mnn.GELU, mnn.ReLU, mnn.SiLU, mnn.ELU, mnn.Softplus, mnn.LeakyReLU, mnn.Sigmoid]
)
def test_vmap_per_sample_gradients(activation):
    model = small_model(activation)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))

    def loss(p, xi, yi):
        return MF.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        model.zero_grad()
        loss({k: v for k, v in model.named_parameters()}, x[i], y[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)


def test_jvp_matches_torch():
    model = small_model()
    twin = torch_twin(model)
    x, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    out, tangent = jvp(model, (x,), (t,))
    ref_out, ref_tangent = jvp(twin, (x,), (t,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tangent, ref_tangent)


def test_forward_ad_through_parameters_and_loss():
    import torch.autograd.forward_ad as fwAD

    w, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    wt, bt = torch.randn_like(w), torch.randn_like(b)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    tangents = []
    for linear, ce, relu in (
        (MF.linear, MF.cross_entropy, MF.relu),
        (torch.nn.functional.linear, torch.nn.functional.cross_entropy, torch.relu),
    ):
        with fwAD.dual_level():
            out = ce(relu(linear(x, fwAD.make_dual(w, wt), fwAD.make_dual(b, bt))), y, label_smoothing=0.1)
            tangents.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(*tangents)


def test_jacrev_matches_torch():
    model = small_model(mnn.Softplus)
    twin = torch_twin(model)
    x = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(jacrev(model)(x), jacrev(twin)(x))


def _count_graph_breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("activation", [mnn.ReLU, mnn.GELU, mnn.ELU, mnn.Softplus])
def test_compile_model_has_no_graph_breaks_and_same_gradients(activation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(mnn.Linear(6, 8), activation(), mnn.Dropout(0.0), mnn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))

    def step(x, y):
        return MF.cross_entropy(model(x), y, label_smoothing=0.1)

    breaks, reasons = _count_graph_breaks(step, x, y)
    assert breaks == 0, reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(step(x, y), list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled(x, y), list(model.parameters()))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("fused_loss", [False, True], ids=["mlp", "mlp_loss"])
def test_compile_fused_mlp(fused_loss):
    torch.manual_seed(0)
    model = mnn.MLP([6, 8, 8, 3], activation="gelu").double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))

    def step(x, y):
        return model.loss(x, y) if fused_loss else MF.cross_entropy(model(x), y)

    breaks, reasons = _count_graph_breaks(step, x, y)
    assert breaks == 0, reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, b in zip(
        torch.autograd.grad(compiled(x, y), list(model.parameters())),
        torch.autograd.grad(step(x, y), list(model.parameters())),
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compile_with_inductor():
    """The default backend, end to end: generated code, same loss and gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(mnn.Linear(6, 8), mnn.SiLU(), mnn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = MF.cross_entropy(compiled(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = MF.cross_entropy(model(x), y)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _autocast_pair(device):
    torch.manual_seed(0)
    ours = torch.nn.Sequential(mnn.Linear(10, 16), mnn.ReLU(), mnn.Linear(16, 16), mnn.GELU(), mnn.Linear(16, 4)).to(
        device
    )
    theirs = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)
    ).to(device)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=CUDA),
        pytest.param("cuda", torch.bfloat16, marks=CUDA),
    ],
)
def test_autocast_behaves_like_torch_nn(device, dtype):
    ours, theirs = _autocast_pair(device)
    x, y = torch.randn(8, 10, device=device), torch.randint(0, 4, (8,), device=device)
    results = []
    for model, ce in ((ours, MF.cross_entropy), (theirs, torch.nn.functional.cross_entropy)):
        with torch.autocast(device, dtype=dtype):
            logits = model(x)
            loss = ce(logits, y)
        loss.backward()
        results.append((logits, loss, [p.grad for p in model.parameters()]))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results
    assert logits.dtype == ref_logits.dtype == dtype
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    for g, r, p in zip(grads, ref_grads, ours.parameters()):
        assert g.dtype == r.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=CUDA),
        pytest.param("cuda", torch.bfloat16, marks=CUDA),
    ],
)
def test_autocast_fused_mlp(device, dtype):
    torch.manual_seed(0)
    model = mnn.MLP([10, 16, 16, 4], activation="gelu").to(device)
    twin = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)
    ).to(device)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 10, device=device), torch.randint(0, 4, (8,), device=device)
    with torch.autocast(device, dtype=dtype):
        logits, ref_logits = model(x), twin(x)
        loss, ref_loss = model.loss(x, y), torch.nn.functional.cross_entropy(twin(x), y)
    assert logits.dtype == ref_logits.dtype == dtype and loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    loss.backward()
    ref_loss.backward()
    for p, r in zip(model.parameters(), twin.parameters()):
        assert p.grad.dtype == r.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, r.grad, rtol=5e-2, atol=5e-3)
