"""manualgrad.privacy: DP-SGD with Opacus's interface. The clipping against torch's own per-sample gradients, the
noise's scale, the sampler's rate, BatchMemoryManager against one big batch, ε against Opacus's own accountants,
an Opacus example run by changing its import line, a torch.nn model, and the bad inputs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support import F64
from torch.func import functional_call, grad, vmap

import manualgrad
from manualgrad import InputError
from manualgrad.per_sample import EPSILON
from manualgrad.privacy import (
    BatchMemoryManager,
    DPOptimizer,
    PoissonSampler,
    PrivacyEngine,
    PrivacyWarning,
    get_noise_multiplier,
)


def dataset(n=40, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=F64) * 3
    return torch.utils.data.TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def torch_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def per_sample_grads(model, x, y):
    """Each sample's gradient of its own loss term, by torch.func on a torch.nn model."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def clipped_sum(grads: dict, clip: float) -> dict:
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).square().sum(0).sqrt()
    factor = (clip / (norms + EPSILON)).clamp(max=1.0)
    return {k: (g * factor.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in grads.items()}


def private(model=None, data=None, batch_size=8, sigma=0.0, clip=0.05, lr=1.0, generator=None, workers=0, **kwargs):
    model = model if model is not None else torch_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(
        data or dataset(), batch_size=batch_size, generator=generator, num_workers=workers
    )
    engine = PrivacyEngine(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)  # sigma = 0
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip
        )
    return engine, model, optimizer, loader


def test_the_clipped_sum_with_the_noise_off():
    """σ = 0: the step is -lr Σ_n min(1, C/‖g_n‖) g_n / (qN), and that sum is at most N·C."""
    reference = torch_mlp()
    engine, model, optimizer, loader = private(torch_mlp(), clip=0.05)
    x, y = next(iter(loader))
    assert len(x) > 0
    want = clipped_sum(per_sample_grads(reference, x, y), 0.05)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total <= len(x) * 0.05 * (1 + 1e-12)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=0, atol=1e-12)
    optimizer.step()
    expected_batch = optimizer.expected_batch_size
    assert expected_batch == 8  # 40 examples, 5 steps an epoch: q = 1/5
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - want[k] / expected_batch, rtol=0, atol=1e-12)
    assert engine.accountant.history == [(0.0, 0.2, 1)]
    assert engine.get_epsilon(1e-5) == math.inf


def test_the_noise_has_std_sigma_times_clip_over_the_expected_batch():
    """A zero clipped sum (an empty batch): the step is exactly σ C z / (qN), z ~ N(0, I); its moments, fixed seed."""
    model = nn.Sequential(nn.Linear(100, 100)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(dataset(64, 100), batch_size=16)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.5,
        max_grad_norm=0.4,
        noise_generator=torch.Generator().manual_seed(0),
    )
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer.zero_grad()
    optimizer.step()  # no backward: a zero clipped sum
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    z = (before - after) * optimizer.expected_batch_size / (1.5 * 0.4)
    n = z.numel()  # 10,100 draws: the mean's std is 1/√n ≈ 0.01, the std's ≈ 1/√(2n) ≈ 0.007
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 4 / math.sqrt(2 * n)
    assert len(engine.accountant.history) == 1


def test_the_sampler_draws_each_example_with_the_rate_and_empty_batches_happen():
    generator = torch.Generator().manual_seed(0)
    sampler = PoissonSampler(num_samples=10, sample_rate=0.2, steps=20000, generator=generator)
    batches = list(sampler)
    sizes = torch.tensor([len(b) for b in batches], dtype=F64)
    # sizes ~ Binomial(10, 0.2): mean 2, P(empty) = 0.8^10 ≈ 0.107; tolerances are 5 standard errors
    assert abs(sizes.mean().item() - 2) < 5 * math.sqrt(10 * 0.2 * 0.8 / 20000)
    p_empty = 0.8**10
    assert abs((sizes == 0).double().mean().item() - p_empty) < 5 * math.sqrt(p_empty * (1 - p_empty) / 20000)
    counts = torch.bincount(torch.tensor([i for b in batches for i in b]), minlength=10).double() / 20000
    assert (counts - 0.2).abs().max() < 5 * math.sqrt(0.2 * 0.8 / 20000)
    # through the data loader: an empty batch has the examples' structure with 0 rows, and is a valid step
    engine, model, optimizer, loader = private(batch_size=20, generator=torch.Generator().manual_seed(3))
    loader.batch_sampler.sample_rate = 0.0  # every batch empty
    for x, y in loader:
        assert x.shape == (0, 6) and x.dtype == F64 and y.shape == (0,) and y.dtype == torch.int64
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        optimizer.step()
    assert engine.accountant.history == [(0.0, 0.5, 2)]


@pytest.mark.parametrize("workers", [0, 1], ids=["in process", "1 worker"])
def test_batch_memory_manager_equals_one_big_batch(workers):
    """Float64, noise off: physical chunks of at most 3 add up to the logical batch's clipped sum. With a worker
    the loader draws batches ahead of the steps (the optimizer queues which step ends a logical batch)."""
    runs = []
    for physical in (None, 3):
        engine, model, optimizer, loader = private(
            batch_size=20, clip=0.1, lr=0.5, generator=torch.Generator().manual_seed(5), workers=workers
        )
        steps = 0
        for _ in range(3):
            if physical is None:
                batches = loader
            else:
                manager = BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer)
                batches = manager.__enter__()
            for x, y in batches:
                assert physical is None or len(x) <= physical
                optimizer.zero_grad()
                nn.CrossEntropyLoss()(model(x), y).backward()
                optimizer.step()
                steps += 1
        runs.append(([p.detach().clone() for p in model.parameters()], engine.accountant.history, steps))
    (big, big_history, big_steps), (chunked, chunked_history, chunked_steps) = runs
    assert chunked_steps > big_steps  # it did split
    assert big_history == chunked_history == [(0.0, 0.5, 6)]  # one accounted step per logical batch
    for a, b in zip(big, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma,rate,steps", [(1.0, 256 / 60000, 2343), (0.8, 0.01, 1000), (2.0, 0.05, 200)])
def test_epsilon_agrees_with_opacus_accountants(sigma, rate, steps):
    """Tolerances: RDP is the same bound minimised over two libraries' grids of Rényi orders (0.1% relative);
    dp-accounting's PLD against Opacus's PRV, two numerical accountants with their own discretisation errors, 2%
    relative (both are upper bounds)."""
    accountants = pytest.importorskip("opacus.accountants")
    engine = PrivacyEngine(accountant="rdp")
    pld = PrivacyEngine()
    for e in (engine, pld):
        for _ in range(3):
            e.accountant.step(noise_multiplier=sigma, sample_rate=rate)
        e.accountant.history[-1] = (sigma, rate, steps)
    opacus_rdp, opacus_prv = accountants.RDPAccountant(), accountants.PRVAccountant()
    opacus_rdp.history = opacus_prv.history = [(sigma, rate, steps)]
    assert engine.get_epsilon(1e-5) == pytest.approx(opacus_rdp.get_epsilon(1e-5), rel=1e-3)
    epsilon, order = engine.accountant.get_privacy_spent(delta=1e-5)  # Opacus's RDP form: (ε, best order)
    assert epsilon == engine.get_epsilon(1e-5) and order > 1
    assert pld.get_epsilon(1e-5) == pytest.approx(opacus_prv.get_epsilon(1e-5), rel=0.02)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_calibrated_noise_is_the_smallest_private_one(accountant):
    sigma = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, epochs=5, accountant=accountant
    )
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [(sigma, 0.01, 500)]
    assert engine.get_epsilon(1e-5) <= 2.0
    engine.accountant.history = [(sigma * 0.99, 0.01, 500)]
    assert engine.get_epsilon(1e-5) > 2.0


def test_a_very_large_epsilon_says_what_it_means_and_is_quick():
    """Issue 19: ``--dp --epsilon 1e9`` ran out of memory (a PLD of tiny noise) after minutes of silence."""
    import time

    start = time.perf_counter()
    with pytest.warns(PrivacyWarning, match="no meaningful privacy guarantee"):
        sigma = get_noise_multiplier(target_epsilon=1e9, target_delta=1e-5, sample_rate=256 / 60000, epochs=10)
    assert 0 < sigma < 0.01
    assert time.perf_counter() - start < 30  # was a MemoryError (1.41 TiB)
    engine = PrivacyEngine()
    engine.accountant.history = [(sigma, 256 / 60000, 2343)]
    assert engine.get_epsilon(1e-5) <= 1e9


# --- an Opacus example, transcribed: examples/mnist.py's model and loops, on random images ------------------------


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        # x of shape [B, 1, 28, 28]
        x = F.relu(self.conv1(x))  # -> [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 16, 13, 13]
        x = F.relu(self.conv2(x))  # -> [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 32, 4, 4]
        x = x.view(-1, 32 * 4 * 4)  # -> [B, 512]
        x = F.relu(self.fc1(x))  # -> [B, 32]
        x = self.fc2(x)  # -> [B, 10]
        return x


OPACUS_EXAMPLE = """
from manualgrad.privacy import PrivacyEngine   # the one line changed: was "from opacus import PrivacyEngine"


def train(model, train_loader, optimizer, privacy_engine, delta):
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses = []
    for _batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    epsilon, best_alpha = privacy_engine.accountant.get_privacy_spent(delta=delta)
    return losses, epsilon


model = SampleConvNet()
optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0)
privacy_engine = PrivacyEngine(secure_mode=False)
model, optimizer, train_loader = privacy_engine.make_private(
    module=model,
    optimizer=optimizer,
    data_loader=train_loader,
    noise_multiplier=1.0,
    max_grad_norm=1.0,
)
for epoch in range(1, 3):
    losses, epsilon = train(model, train_loader, optimizer, privacy_engine, 1e-5)
"""


def test_an_opacus_example_runs_by_changing_its_import_line():
    torch.manual_seed(0)
    images = torch.randn(64, 1, 28, 28)
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.randint(0, 10, (64,))), batch_size=16
    )
    namespace = {"nn": nn, "optim": torch.optim, "SampleConvNet": SampleConvNet, "train_loader": train_loader}
    exec(OPACUS_EXAMPLE, namespace)
    engine, model = namespace["privacy_engine"], namespace["model"]
    assert isinstance(model.conv1, manualgrad.nn.Conv2d) and isinstance(model.fc2, manualgrad.nn.Linear)
    assert isinstance(namespace["optimizer"], DPOptimizer)
    assert engine.accountant.history == [(1.0, 0.25, 8)]
    assert 0 < namespace["epsilon"] < math.inf
    assert all(math.isfinite(v) or math.isnan(v) for v in namespace["losses"])  # nan: an empty batch's mean


def test_a_torch_nn_model_through_make_private_keeps_its_parameters_and_clips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    images = torch.utils.data.TensorDataset(torch.randn(24, 1, 6, 6, dtype=F64), torch.randint(0, 3, (24,)))
    _, private_model, optimizer, loader = private(model, images, batch_size=6, clip=0.2)
    assert private_model is model and list(model.parameters()) == parameters
    assert optimizer.param_groups[0]["params"] == parameters  # the optimizer built before stays valid
    x, y = next(iter(loader))
    want = clipped_sum(per_sample_grads(reference, x, y), 0.2)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=0, atol=1e-12)


def test_make_private_with_epsilon_spends_at_most_epsilon():
    engine = PrivacyEngine()
    model = torch_mlp()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8),
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=2,
        max_grad_norm=1.0,
    )
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert engine.accountant.history[0][2] == 10
    assert 2.9 < engine.get_epsilon(1e-5) <= 3.0


# --- bad inputs ---------------------------------------------------------------------------------------------------


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from dataset()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a positive"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive"),
        ({"max_grad_norm": True}, "max_grad_norm must be a positive"),
        ({"max_grad_norm": [1.0, 1.0]}, "max_grad_norm must be a positive"),
        ({"noise_multiplier": -0.5}, "noise_multiplier must be a finite number >= 0"),
        ({"noise_multiplier": math.nan}, "noise_multiplier must be a finite number >= 0"),
        ({"loss_reduction": "none"}, "loss_reduction must be 'mean' or 'sum'"),
        ({"data_loader": torch.utils.data.DataLoader(Stream(), batch_size=4)}, "dataset has no length"),
        ({"module": nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))}, r"1 \(BatchNorm1d\) has parameters but no"),
        ({"module": nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, affine=False))}, r"1 \(BatchNorm1d\) mixes"),
        ({"module": nn.Sequential(nn.Bilinear(6, 6, 3))}, r"0 \(Bilinear\) has parameters but no per-sample rule"),
        ({"optimizer": torch.optim.SGD(torch_mlp().parameters(), lr=0.1)}, "not the module's"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_inputs_are_refused_clearly(change, message):
    model = change.get("module", torch_mlp())
    arguments = {
        "module": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "data_loader": torch.utils.data.DataLoader(dataset(), batch_size=8),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        **change,
    }
    with pytest.raises(InputError, match=message):
        PrivacyEngine().make_private(**arguments)


@pytest.mark.parametrize(
    "target,message",
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be a positive"),
        ({"target_epsilon": -1.0}, "target_epsilon must be a positive"),
        ({"target_delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"target_delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"epochs": 0}, "epochs must be a positive number"),
    ],
)
def test_an_unreachable_privacy_target_is_refused_clearly(target, message):
    model = torch_mlp()
    arguments = {"target_epsilon": 1.0, "target_delta": 1e-5, "epochs": 1, **target}
    with pytest.raises(InputError, match=message):
        PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8),
            max_grad_norm=1.0,
            **arguments,
        )


def test_engine_options_are_checked():
    with pytest.raises(InputError, match="secure_mode=True needs a cryptographically secure generator"):
        PrivacyEngine(secure_mode=True)
    with pytest.raises(InputError, match="accountant must be one of 'prv', 'pld', 'rdp'"):
        PrivacyEngine(accountant="gdp")


def test_no_noise_says_epsilon_is_infinite():
    model = torch_mlp()
    with pytest.warns(PrivacyWarning, match=r"no privacy \(ε is infinite\)"):
        engine = PrivacyEngine()
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(dataset(), batch_size=8),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
        )
    assert engine.get_epsilon(1e-5) == 0.0  # no step yet
    engine.accountant.step(noise_multiplier=0.0, sample_rate=0.2)
    assert engine.get_epsilon(1e-5) == math.inf


def test_the_fused_mlp_through_make_private_clips_as_the_torch_model():
    reference = torch_mlp()
    fused = manualgrad.nn.MLP([6, 8, 3], activation="tanh").double()
    fused.load_state_dict(reference.state_dict())
    _, model, optimizer, loader = private(fused, clip=0.05)
    x, y = next(iter(loader))
    want = clipped_sum(per_sample_grads(reference, x, y), 0.05)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=0, atol=1e-12)


def test_two_backward_passes_before_a_step_are_refused():
    """Poisson sampling forbids accumulating two batches' clipped sums into one noisy step (Opacus refuses too)."""
    _, model, optimizer, loader = private(sigma=1.0)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(InputError, match="2 backward passes before optimizer.step"):
        optimizer.step()
    optimizer.zero_grad()  # a fresh start is fine
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_a_private_model_is_freed_with_its_parameters():
    """make_private keeps the model's recorder open for the model's life, but not beyond it."""
    import gc
    import weakref

    from manualgrad.functions import recorder

    engine, model, optimizer, loader = private()
    parameter = weakref.ref(next(model.parameters()))
    assert len(recorder._OWNERS) > 0
    del engine, model, optimizer, loader
    gc.collect()
    assert parameter() is None and len(recorder._OWNERS) == 0


def test_an_open_private_model_leaves_a_compiled_loss_without_graph_breaks():
    """A recorder open for one model (as make_private's is) must not break another computation's compiled graph."""
    private_model = private()  # kept open (alive) while the loss is compiled
    logits, target = torch.randn(5, 3, requires_grad=True), torch.randint(0, 3, (5,))

    def loss(z):
        return manualgrad.functional.cross_entropy(z, target)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(logits)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert private_model[1] is not None
