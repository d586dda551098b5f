"""manualgrad.privacy across processes (torchrun, 2 processes on loopback, gloo): DPDDP, DistributedDPOptimizer and
the distributed Poisson sampler. One torchrun run (``WORKER``, below) does everything that needs the process group
and saves what it saw; the tests compare it with one process here: the parameters against a single-process run on
the union of the processes' batches (float64, without noise, and with rank 0's noise generator replayed), the
noise's scale, the sampler's rates and independence, ε, and the refusals. The bad inputs that need no process
group are tried here."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from support import F64
from train_helpers import REPO, free_port

from manualgrad import InputError
from manualgrad.privacy import (
    DPDDP,
    DifferentiallyPrivateDistributedDataParallel,
    DistributedDPOptimizer,
    DistributedPoissonSampler,
    DPDataLoader,
    PrivacyEngine,
    PrivacyWarning,
    get_noise_multiplier,
)

N, BATCH, EPOCHS, CLIP = 40, 8, 2, 0.5  # q = 1/5, 10 logical steps, clipping active (norms above 0.5)
SIGMA, NOISE_SEED, PHYSICAL = 0.7, 123, 3
SAMPLER_SIZE, SAMPLER_RATE, SAMPLER_STEPS = 1000, 0.1, 400  # shares of 500: alike generators would draw alike
WORKER = textwrap.dedent(
    f"""
    import contextlib, os, sys, warnings
    import torch, torch.distributed as dist
    import manualgrad
    from manualgrad import InputError
    from manualgrad.privacy import (
        DPDDP, BatchMemoryManager, DistributedDPOptimizer, DistributedPoissonSampler, PrivacyEngine,
        get_noise_multiplier,
    )

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {{}}


    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn({N}, 5, generator=g, dtype=torch.float64) * 3
        y = torch.randint(0, 3, ({N},), generator=g)
        return torch.utils.data.TensorDataset(x, y, torch.arange({N}))


    def mlp(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


    def train(sigma, physical):
        model = DPDDP(mlp(seed=10 + rank))  # different weights per process before the broadcast
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        loader = torch.utils.data.DataLoader(data(), batch_size={BATCH})
        engine = PrivacyEngine()
        noise = torch.Generator().manual_seed({NOISE_SEED})  # the same seed on every process: only rank 0 draws
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm={CLIP}, noise_generator=noise,
        )
        assert isinstance(optimizer, DistributedDPOptimizer), type(optimizer)
        logical, current, physical_batches = [], [], 0
        for _ in range({EPOCHS}):
            manager = (
                BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer)
                if physical else contextlib.nullcontext(loader)
            )
            with manager as batches:
                for x, y, index in batches:
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    before = sum(k for *_, k in engine.accountant.history)
                    optimizer.step()
                    current += index.tolist()
                    physical_batches += 1
                    if sum(k for *_, k in engine.accountant.history) > before:  # the end of a logical batch
                        logical.append(current)
                        current = []
        return {{
            "start": start, "end": [p.detach().clone() for p in model.parameters()], "batches": logical,
            "physical": physical_batches, "history": engine.accountant.history,
            "epsilon": engine.get_epsilon(1e-5) if sigma else None, "expected": optimizer.expected_batch_size,
            "sample_rate": loader.sample_rate, "noise_state": noise.get_state(),
        }}


    out["plain"] = train(0.0, 0)
    out["noisy"] = train({SIGMA}, {PHYSICAL})

    # the noise alone: zero clipped sums (no backward), so .grad is rank 0's σC z / expected batch size
    wide = DPDDP(torch.nn.Linear(200, 50))
    engine = PrivacyEngine()
    noise = torch.Generator().manual_seed(7)
    wide, optimizer, loader = engine.make_private(
        module=wide, optimizer=torch.optim.SGD(wide.parameters(), lr=0.0),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(400, 200)), batch_size=40),
        noise_multiplier=2.0, max_grad_norm=0.5, noise_generator=noise,
    )
    optimizer.step()
    out["noise"] = {{"grads": [p.grad.clone() for p in wide.parameters()], "state": noise.get_state(),
                    "expected": optimizer.expected_batch_size}}

    # the sampler, every process seeded alike (as a script would): its share of each Poisson sample
    torch.manual_seed(0)
    sampler = DistributedPoissonSampler(
        total_size={SAMPLER_SIZE}, sample_rate={SAMPLER_RATE}, steps={SAMPLER_STEPS})
    out["sampler"] = {{"batches": list(sampler), "num_samples": sampler.num_samples}}
    small = DistributedPoissonSampler(total_size=7, sample_rate=0.1, steps=50)
    out["small"] = {{"batches": list(small), "num_samples": small.num_samples}}

    # make_private_with_epsilon: the noise multiplier of the whole data set's rate
    model = DPDDP(mlp(seed=0))
    _, optimizer, loader = PrivacyEngine().make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data(), batch_size={BATCH}),
        target_epsilon=3.0, target_delta=1e-5, epochs=4, max_grad_norm=1.0,
    )
    out["calibrated"] = {{"sigma": optimizer.noise_multiplier, "sample_rate": loader.sample_rate}}

    # refusals
    def refusal(fn):
        try:
            fn()
        except InputError as e:
            return str(e)
        return None

    ddp = torch.nn.parallel.DistributedDataParallel(manualgrad.convert(mlp(seed=0)))
    out["ddp"] = refusal(lambda: PrivacyEngine().make_private(
        module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data(), batch_size={BATCH}), noise_multiplier=1.0, max_grad_norm=1.0))
    # why: under torch's DDP, the clipped sums never reach DDP's all-reduce, and .grad comes out zero
    x, y, _ = data().tensors
    for through in (ddp, ddp.module):
        with manualgrad.per_sample(ddp.module, clip={CLIP}):
            torch.nn.functional.cross_entropy(through(x[:8]), y[:8]).backward()
        out["ddp_grads" if through is ddp else "own_grads"] = [p.grad.clone() for p in ddp.module.parameters()]
        ddp.module.zero_grad()
    inner = torch.nn.Sequential(DPDDP(mlp(seed=0)))
    out["nested"] = refusal(lambda: PrivacyEngine().make_private(
        module=inner, optimizer=torch.optim.SGD(inner.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data(), batch_size={BATCH}), noise_multiplier=1.0, max_grad_norm=1.0))

    gathered = [None, None]
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, sys.argv[1])
    del ddp, inner  # torch's DDP (its reducer) before the process group it uses
    dist.barrier()
    dist.destroy_process_group()
    # Everything asked is saved: no interpreter teardown, where gloo's threads can abort a process ("terminate called
    # without an active exception", pytorch/pytorch#190489; once in a CI run here: rank 1, SIGABRT, exit -6).
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two processes saw (a list indexed by rank)."""
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", str(folder / "worker.py")]
    command += [str(folder / "out.pt")]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-6000:]
    return torch.load(folder / "out.pt", weights_only=False)


def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=F64) * 3
    return x, torch.randint(0, 3, (N,), generator=g)


def single_process(run: dict, sigma: float) -> list[torch.Tensor]:
    """One process from the same start on the union of the processes' logical batches, with a noise generator seeded
    as every process's was: the parameters after the same steps."""
    x, y = dataset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p, start in zip(model.parameters(), run["start"]):
            p.copy_(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(NOISE_SEED),
        )
    for batch in run["batches"]:
        index = torch.tensor(sorted(batch), dtype=torch.long)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("run, sigma", [("plain", 0.0), ("noisy", SIGMA)])
def test_parameters_equal_one_process_on_the_union_of_the_batches(ranks, run, sigma):
    """Without noise: the sum over processes of their clipped sums, / the whole batch's expected size, is one
    process's step. With noise (and BatchMemoryManager's physical batches of 3): the same, plus rank 0's noise
    alone, once per logical step: one process replaying that generator lands on the same parameters."""
    first, second = ranks[0][run], ranks[1][run]
    for a, b in zip(first["start"], second["start"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # DPDDP: rank 0's weights everywhere
    for a, b in zip(first["end"], second["end"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # every process takes the same step
    assert len(first["batches"]) == len(second["batches"]) == EPOCHS * N // BATCH
    union = [sorted(a + b) for a, b in zip(first["batches"], second["batches"])]
    for a, b in zip(first["batches"], second["batches"]):
        assert not set(a) & set(b)
        assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)  # each its own share
    assert first["expected"] == BATCH and first["sample_rate"] == 1 / (N // BATCH)
    reference = single_process({**first, "batches": union}, sigma)
    moved = max((a - b).abs().max().item() for a, b in zip(first["end"], first["start"]))
    assert moved > 0.05  # the steps did something
    for got, want in zip(first["end"], reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if run == "noisy":  # physical batches of at most 3 (more of them than logical ones), and noise once per step
        assert first["physical"] > len(first["batches"]) and second["physical"] > len(second["batches"])


def test_only_rank_0_draws_noise_and_its_scale_is_one_processs(ranks):
    """Zero clipped sums: .grad is the noise / 40. Rank 0's generator moved and rank 1's did not (seeded alike);
    .grad is rank 0's σC z / 40 exactly, the same on both; its std over the 10,050 entries is σC/40 = 0.025 within
    5% (the sample std's relative standard error is 1/√(2·10050) = 0.7%, so 5% is 7 errors; two processes each
    adding noise would give √2 times it, 41% more)."""
    sigma, clip, expected = 2.0, 0.5, 40
    assert ranks[0]["noise"]["expected"] == expected
    fresh = torch.Generator().manual_seed(7)
    assert torch.equal(ranks[1]["noise"]["state"], fresh.get_state())
    assert not torch.equal(ranks[0]["noise"]["state"], fresh.get_state())
    grads = ranks[0]["noise"]["grads"]
    for a, b in zip(grads, ranks[1]["noise"]["grads"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g in grads:
        z = torch.randn(g.shape, generator=fresh, dtype=g.dtype)
        torch.testing.assert_close(g, sigma * clip * z / expected, rtol=1e-6, atol=1e-9)
    std = torch.cat([g.flatten() for g in grads]).std().item()
    assert abs(std / (sigma * clip / expected) - 1) < 0.05, std
    # the runs with noise: rank 0 drew one σC z per logical step, rank 1 nothing
    noisy = ranks[0]["noisy"]
    assert torch.equal(ranks[1]["noisy"]["noise_state"], torch.Generator().manual_seed(NOISE_SEED).get_state())
    replay = torch.Generator().manual_seed(NOISE_SEED)
    for _ in noisy["batches"]:
        for p in noisy["start"]:
            torch.randn(p.shape, generator=replay, dtype=p.dtype)
    assert torch.equal(noisy["noise_state"], replay.get_state())


def test_sampler_shares_one_poisson_sample_of_the_whole_data_set(ranks):
    """400 steps at q = 0.1 over 1000 examples, both processes seeded alike. Each keeps its share (even / odd
    indices, 500 each), every step (also empty ones: 7 examples at q = 0.1, shares of 4 and 3). Bounds at 5
    standard errors: each process's mean batch size q·share (sd √(q(1-q)·share/400) ≈ 0.2); each example's
    frequency q, jointly: Σ (count - 40)² / (400 q (1-q)) is χ² with 1000 degrees of freedom (sd 44.7); the shares
    independent: examples 2i and 2i+1 together in q² of the draws (2,000 expected, sd ≈ 45; each share drawn from
    its process's generator, seeded alike, would give q, 20,000)."""
    size, q, steps = SAMPLER_SIZE, SAMPLER_RATE, SAMPLER_STEPS
    counts = torch.zeros(size)
    together = 0
    batches = [ranks[r]["sampler"]["batches"] for r in (0, 1)]
    assert [ranks[r]["sampler"]["num_samples"] for r in (0, 1)] == [500, 500]
    assert len(batches[0]) == len(batches[1]) == steps
    for r, share in ((0, 500), (1, 500)):
        assert all(i % 2 == r for b in batches[r] for i in b)
        mean = sum(len(b) for b in batches[r]) / steps
        assert abs(mean - q * share) < 5 * math.sqrt(q * (1 - q) * share / steps), (r, mean)
    for a, b in zip(*batches):
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        counts[a] += 1
        counts[b] += 1
        together += len({i + 1 for i in a} & set(b))
    chi2 = ((counts - steps * q) ** 2).sum().item() / (steps * q * (1 - q))
    assert abs(chi2 - size) < 5 * math.sqrt(2 * size), chi2
    pairs = size // 2
    assert abs(together - pairs * steps * q * q) < 5 * math.sqrt(pairs * steps * q * q), together
    small = [ranks[r]["small"]["batches"] for r in (0, 1)]
    assert [ranks[r]["small"]["num_samples"] for r in (0, 1)] == [4, 3]
    assert len(small[0]) == len(small[1]) == 50 and [] in small[0] and [] in small[1]  # empty batches are steps
    assert all(i in (0, 2, 4, 6) for b in small[0] for i in b) and all(i in (1, 3, 5) for b in small[1] for i in b)


def test_epsilon_and_noise_are_the_single_process_ones(ranks):
    """The accountant composes one step of rate q = 1/5 per logical step, as one process would: the same history
    and the same ε as a single-process engine after the same 10 steps; and make_private_with_epsilon picks the
    single process's σ for that rate."""
    steps = EPOCHS * N // BATCH
    for r in (0, 1):
        assert ranks[r]["noisy"]["history"] == [(SIGMA, 1 / (N // BATCH), steps)]
    x, y = dataset()
    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
    )
    for _ in range(EPOCHS):
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    assert ranks[0]["noisy"]["epsilon"] == ranks[1]["noisy"]["epsilon"] == engine.get_epsilon(1e-5)
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=1 / (N // BATCH), epochs=4)
    for r in (0, 1):
        assert ranks[r]["calibrated"] == {"sigma": sigma, "sample_rate": 1 / (N // BATCH)}


def test_torch_ddp_and_a_dpddp_inside_the_model_are_refused(ranks):
    """Refused, with the reason: the clipped sums reach .grad past DDP's hooks, and DDP leaves .grad zero where the
    model alone (the same batch) has its clipped sum."""
    for r in (0, 1):
        assert all(not g.any() for g in ranks[r]["ddp_grads"])
        assert all(g.any() for g in ranks[r]["own_grads"])
        message = ranks[r]["ddp"]
        assert message is not None and "DistributedDataParallel" in message and "DPDDP" in message
        assert "never reduces them" in message
        message = ranks[r]["nested"]
        assert message is not None and "0 is a DPDDP inside the model" in message


def test_without_a_process_group_everything_distributed_refuses():
    assert DPDDP is DifferentiallyPrivateDistributedDataParallel
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(3, 2)
    with pytest.raises(InputError, match="DPDDP needs torch.distributed's default process group"):
        DPDDP(model)
    with pytest.raises(InputError, match="DPDDP: module must be a torch.nn.Module, got list"):
        DPDDP([model])
    with pytest.raises(InputError, match="DistributedDPOptimizer needs torch.distributed"):
        DistributedDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
        )
    with pytest.raises(InputError, match="DistributedPoissonSampler needs torch.distributed"):
        DistributedPoissonSampler(total_size=10, sample_rate=0.5, steps=2)
    for bad, match in (
        ({"total_size": 0}, "total_size must be an int >= 1, got 0"),
        ({"total_size": 10.0}, "total_size must be an int >= 1, got 10.0"),
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\], got 1.5"),
    ):
        with pytest.raises(InputError, match=match):
            DistributedPoissonSampler(**{"total_size": 10, "sample_rate": 0.5, "steps": 2, **bad})
    data = torch.utils.data.TensorDataset(torch.zeros(10, 3))
    with pytest.raises(InputError, match="DistributedPoissonSampler needs"):
        DPDataLoader(data, sample_rate=0.5, steps=2, distributed=True)
    with pytest.raises(InputError, match="DistributedPoissonSampler needs"):
        DPDataLoader.from_data_loader(torch.utils.data.DataLoader(data, batch_size=5), distributed=True)
