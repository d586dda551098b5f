"""Tests of ``--dp`` (DP-SGD): Poisson sampling, per-sample clipping, the noise, the accountant's epsilon,
resuming, several processes, and the options' errors.

Tiny IDX files written by the tests. The tests use the RDP accountant where the accountant is not the
subject: its calibration takes about a second, PLD's several at the tiny sets' large sampling rates.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import (
    interrupt_at,
    load_params,
    run,
    run_main,
    run_torchrun,
    tiny_argv,
    tiny_config,
    without_timing,
)

import manualgrad.functional as MF
from manualgrad import privacy
from train import checkpoint, data, engine
from train import model as train_model
from train.config import Config, parse_args
from train.errors import ConfigError


def dp_config(tiny, out, **changes):
    options = dict(dp=True, epsilon=2.0, clip=1.0, accountant="rdp", label_smoothing=0.0, weight_decay=0.0)
    return tiny_config(tiny, out, **{**options, **changes})


def plain_sgd(**changes) -> dict:
    """lr 1, no momentum, no weight decay, no schedule: a step moves the weights by minus the gradient."""
    return dict(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, schedule="none", **changes)


def params_after_each_step(trainer, record: list) -> None:
    record.append(([p.detach().clone() for p in trainer.params], trainer.last_batch.clone()))


def without_noise(monkeypatch) -> None:
    """A test hook: the noise multiplier is 0 when the noise is added (the planned sigma is still reported)."""
    original = privacy.DPOptimizer.add_noise

    def add_no_noise(self):
        sigma, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            original(self)
        finally:
            self.noise_multiplier = sigma

    monkeypatch.setattr(privacy.DPOptimizer, "add_noise", add_no_noise)


# ---- Poisson sampling


@pytest.mark.slow
def test_poisson_batches_vary_and_can_be_empty(tiny, tmp_path):
    # 64 images, expected batch 2: q = 1/32, 32 steps an epoch; P(empty batch) = (31/32)^64 ≈ 13%
    sizes = []
    metrics = run(
        dp_config(tiny, tmp_path / "run", batch_size=2, epochs=3),
        on_step=lambda e, s, t: sizes.append(len(t.last_batch)),
    )
    assert len(sizes) == 3 * 32 and metrics["completed"]
    assert 0 in sizes and len(set(sizes)) >= 4
    assert 1.5 <= sum(sizes) / len(sizes) <= 2.5
    assert all(math.isfinite(r["train_loss"]) for r in metrics["epochs"])


def test_poisson_batch_rows_are_independent_draws():
    g = torch.Generator().manual_seed(0)
    batches = [privacy.poisson_sample(1000, 0.05, g) for _ in range(400)]
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert abs(sizes.mean().item() - 50) < 1.5  # binomial(1000, 0.05): mean 50, sd 6.9 (sd of the mean 0.34)
    assert 5.5 < sizes.std().item() < 8.5
    counts = torch.bincount(torch.cat(batches), minlength=1000).double()  # every row, alike: about 400 * 0.05
    assert counts.min() >= 5 and counts.max() <= 40 and all(len(b.unique()) == len(b) for b in batches)
    assert engine.steps_per_epoch(60000, 256, dp=True) == 234 and engine.steps_per_epoch(64, 1000, dp=True) == 1


# ---- clipping


def test_the_step_is_the_clipped_sum_over_the_expected_batch(tiny, tmp_path, monkeypatch):
    """With the noise off: Δθ = -Σ_n min(1, C/‖g_n‖) g_n / B, each g_n computed alone by torch autograd."""
    without_noise(monkeypatch)
    clip, expected = 0.5, 8
    cfg = dp_config(tiny, tmp_path / "run", batch_size=expected, clip=clip, **plain_sgd())
    torch.manual_seed(cfg.seed)
    reference = train_model.build(cfg, torch.device("cpu")).module  # the run's initial weights
    steps = []
    run(cfg, on_step=lambda e, s, t: s <= 2 and e == 1 and params_after_each_step(t, steps))
    images = data.load(str(tiny), torch.device("cpu"), download=False)
    before = [p.detach().clone() for p in reference.parameters()]
    for after, rows in steps:
        clipped = [torch.zeros_like(p) for p in before]
        for n in rows.tolist():
            loss = MF.cross_entropy(reference(images.train_x[n : n + 1]), images.train_y[n : n + 1])
            g = torch.autograd.grad(loss, list(reference.parameters()))
            factor = min(1.0, clip / (math.sqrt(sum(float(t.square().sum()) for t in g)) + 1e-6))
            clipped = [c + factor * t for c, t in zip(clipped, g)]
        for p, a, c in zip(before, after, clipped):
            assert torch.allclose(p - a, c / expected, atol=1e-6), (p - a - c / expected).abs().max()
        with torch.no_grad():
            for p, a in zip(reference.parameters(), after):
                p.copy_(a)
        before = after
    assert len(steps) == 2 and any(len(rows) for _, rows in steps)


@pytest.mark.slow
def test_a_tiny_clip_bounds_every_update(tiny, tmp_path, monkeypatch):
    """Every per-sample gradient is far above C = 1e-3: ‖Δθ‖ ≤ C · |batch| / B, and is about that."""
    without_noise(monkeypatch)
    clip, expected = 1e-3, 16
    steps = []
    cfg = dp_config(tiny, tmp_path / "run", batch_size=expected, clip=clip, epochs=2, dropout=0.2, **plain_sgd())
    run(cfg, on_step=lambda e, s, t: params_after_each_step(t, steps))
    previous = None
    for params, rows in steps:
        if previous is not None:
            moved = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(params, previous)))
            bound = clip * len(rows) / expected
            assert moved <= bound * (1 + 1e-4) + 1e-9, (moved, bound)
            if len(rows) > 1:
                assert moved > 0.1 * bound  # the clipped gradients point roughly alike: not all scaled to 0
        previous = params


# ---- noise


def test_the_noise_is_sigma_clip_z_over_the_expected_batch():
    cfg = dataclasses.replace(Config(), dp=True, epsilon=2.0, clip=0.5, batch_size=32, accountant="rdp")
    plan = engine.PrivatePlan(cfg, sample_rate=0.1, noise_multiplier=1.7, steps=10)
    params = [torch.nn.Parameter(torch.zeros(300, 400)), torch.nn.Parameter(torch.zeros(50))]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    optimizer = plan.optimizer(torch.optim.SGD(params, lr=0.0), torch.Generator().manual_seed(5))
    optimizer.step()
    g = torch.Generator().manual_seed(5)
    for p in params:  # the same generator, in parameter order
        z = torch.randn(p.shape, generator=g)
        assert torch.allclose(p.grad, (3.0 + 1.7 * 0.5 * z) / 32.0, atol=1e-6)
    noise = params[0].grad.flatten() - 3.0 / 32
    assert noise.std().item() == pytest.approx(1.7 * 0.5 / 32, rel=0.01)  # 120,000 draws: sd error ~0.2%
    assert abs(noise.mean().item()) < 5 * 1.7 * 0.5 / 32 / math.sqrt(noise.numel())


@pytest.mark.slow
def test_the_noise_in_a_run_has_the_planned_scale(tiny, tmp_path):
    """Each step moves every weight by σ C z / B plus the clipped sum over B, whose norm is at most C: spread
    over the >100k weights it is ~300x smaller than the noise per weight. (C is not smaller still: the moves
    must stay well above float32's resolution at the weights' magnitude.)"""
    clip, expected = 1e-3, 8
    steps = []
    cfg = dp_config(tiny, tmp_path / "run", batch_size=expected, clip=clip, **plain_sgd())
    run(cfg, on_step=lambda e, s, t: params_after_each_step(t, steps))
    sigma = json.loads((tmp_path / "run" / "metrics.json").read_text())["privacy"]["noise_multiplier"]
    moves = torch.cat(
        [torch.cat([(a - b).flatten() for a, b in zip(p1, p0)]) for (p0, _), (p1, _) in zip(steps, steps[1:])]
    )
    assert moves.numel() > 100_000
    assert moves.std().item() == pytest.approx(sigma * clip / expected, rel=0.02)


# ---- the accountant


@pytest.mark.slow
def test_epsilon_is_reported_increasing_up_to_the_target(tiny, tmp_path, capsys):
    cfg = dp_config(tiny, tmp_path / "run", epochs=3, epsilon=1.5, delta=1e-4)
    metrics = run(cfg)
    printed = capsys.readouterr().out
    spent = [r["epsilon"] for r in metrics["epochs"]]
    assert 0 < spent[0] < spent[1] < spent[2] <= 1.5 and spent[2] == pytest.approx(1.5, rel=1e-3)
    assert [r["steps"] for r in metrics["epochs"]] == [4, 8, 12]  # 64 images, expected batch 16
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["epochs"] == metrics["epochs"]
    p = saved["privacy"]
    assert (p["epsilon"], p["delta"], p["clip"], p["planned_steps"], p["steps"]) == (1.5, 1e-4, 1.0, 12, 12)
    assert p["sample_rate"] == 16 / 64 and p["spent_epsilon"] == spent[-1] and p["noise_multiplier"] > 0
    lines = printed.strip().splitlines()
    assert "epsilon" in lines[-2] and f"epsilon {spent[0]:.3f}" in printed
    assert f"({spent[-1]:.3f}, 0.0001)-DP" in lines[-1]
    assert "noise multiplier" in printed and "(reproducible: see --secure-rng)" in printed


@pytest.mark.slow
def test_the_accountants_agree_with_opacus():
    """Our plan's epsilon from dp-accounting against Opacus's own RDP accountant (another implementation)."""
    opacus = pytest.importorskip("opacus.accountants")
    cfg = dataclasses.replace(tiny_config(Path("."), Path(".")), dp=True, epsilon=3.0, batch_size=600, epochs=5)
    plan = engine.PrivatePlan.plan(dataclasses.replace(cfg, accountant="rdp"), 60000, 100)
    theirs = opacus.RDPAccountant()
    theirs.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    assert theirs.get_epsilon(cfg.delta) == pytest.approx(3.0, rel=0.03)  # they use fewer RDP orders
    tight = engine.PrivatePlan.plan(dataclasses.replace(cfg, accountant="pld"), 60000, 100)
    assert tight.noise_multiplier < plan.noise_multiplier  # PLD is tighter: less noise for the same epsilon
    assert tight.epsilon(tight.steps) == pytest.approx(3.0, rel=1e-3) and tight.epsilon(tight.steps) <= 3.0
    prv = opacus.PRVAccountant()
    prv.history = [(tight.noise_multiplier, tight.sample_rate, tight.steps)]
    assert prv.get_epsilon(cfg.delta) == pytest.approx(3.0, rel=0.03)


def test_an_impossible_budget_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="batch-size 100 is larger than the 64 training images"):
        run(dp_config(tiny, tmp_path / "run", batch_size=100))
    assert not (tmp_path / "run").exists()


# ---- resume, secure streams, processes


@pytest.mark.slow
@pytest.mark.parametrize("where", [(1, 4), (2, 2)], ids=["epoch-end", "mid-epoch"])
def test_dp_resume_gives_identical_results(tiny, tmp_path, where):
    cfg = dp_config(tiny, tmp_path / "whole", epochs=2, dropout=0.2, augment="affine")
    whole = run(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    assert run(part, on_step=interrupt_at(*where))["interrupted"]
    state = checkpoint.load(part.out)
    position = state["position"]["step"] if state.get("position") else 0  # steps done in the unfinished epoch
    assert state["privacy"]["steps"] == 4 * state["epoch"] + position > 0  # what the accountant goes on from
    resumed = run(dataclasses.replace(part, resume=part.out))
    assert without_timing(resumed["epochs"]) == without_timing(whole["epochs"])  # epsilon included
    assert resumed["privacy"] == whole["privacy"]
    ours, reference = load_params(Path(part.out)), load_params(Path(cfg.out))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_a_dp_checkpoint_without_its_privacy_state_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    run(dp_config(tiny, out, epochs=2), on_step=interrupt_at(1, 2))
    state = checkpoint.load(str(out))
    del state["privacy"]
    checkpoint.save(state, str(tmp_path / "bad.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="lacks its privacy state"):
        checkpoint.load(str(tmp_path / "bad.pt"))


@pytest.mark.slow
def test_secure_rng_is_not_the_seed(tiny, tmp_path):
    cfg = dp_config(tiny, tmp_path / "a", epochs=2, secure_rng=True)
    a = run(cfg)
    b = run(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    pa, pb = load_params(tmp_path / "a"), load_params(tmp_path / "b")
    assert not torch.equal(pa["0.weight"], pb["0.weight"])  # other batches and noise, same seed
    assert a["epochs"][-1]["epsilon"] == b["epochs"][-1]["epsilon"]  # the same plan


@pytest.mark.slow
def test_secure_rng_resume_continues_the_saved_streams(tiny, tmp_path, monkeypatch):
    seeds = iter(range(1000, 2000))
    monkeypatch.setattr(engine.secrets, "randbits", lambda bits: next(seeds))  # the same entropy for both runs
    cfg = dp_config(tiny, tmp_path / "whole", epochs=2, secure_rng=True)
    whole = run(cfg)
    seeds = iter(range(1000, 2000))
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    run(part, on_step=interrupt_at(1, 3))
    resumed = run(dataclasses.replace(part, resume=part.out))  # would draw new seeds: the checkpoint's win
    assert without_timing(resumed["epochs"]) == without_timing(whole["epochs"])
    a, b = load_params(Path(part.out)), load_params(Path(cfg.out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_with_dp(tiny, tmp_path):
    """Under torchrun the clipped sums add up over the processes and the noise is added once."""
    single = run(dp_config(tiny, tmp_path / "one", epochs=2, batch_size=15))
    out = tmp_path / "two"
    result = run_torchrun(
        *tiny_argv(tiny, out, "--epochs", "2", "--batch-size", "15"),
        *("--dp", "--epsilon", "2", "--clip", "1", "--accountant", "rdp", "--label-smoothing", "0"),
        *("--weight-decay", "0"),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    assert two["environment"]["processes"] == 2 and two["privacy"] == single["privacy"]
    a, b = load_params(tmp_path / "one"), load_params(out)
    for k in a:  # noise added twice would move the weights by sqrt(2) times as much
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())


# ---- options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dp", "--epsilon", "0"], "--epsilon"),
        (["--dp", "--epsilon", "-1"], "--epsilon"),
        (["--dp", "--epsilon", "inf"], "--epsilon"),
        (["--dp", "--epsilon", "1", "--delta", "0"], "--delta"),
        (["--dp", "--epsilon", "1", "--delta", "1"], "--delta"),
        (["--dp", "--epsilon", "1", "--clip", "0"], "--clip"),
        (["--dp", "--epsilon", "1", "--clip", "-0.5"], "--clip"),
        (["--dp", "--epsilon", "1", "--accountant", "moments"], "--accountant"),
        (["--dp"], "--dp needs --epsilon"),
        (["--epsilon", "1"], "--epsilon: only with --dp"),
        (["--clip", "1", "--secure-rng"], "--clip, --secure-rng: only with --dp"),
        (["--dp", "--epsilon", "1", "--compare-native"], "--compare-native cannot be combined with --dp"),
    ],
)
def test_bad_dp_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_without_dp_accounting_the_error_says_how_to_install_it(tiny, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_dp_accounting(name, *args, **kwargs):
        if name == "dp_accounting" or name.startswith("dp_accounting."):
            raise ImportError("No module named 'dp_accounting'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dp_accounting)
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "run", "--dp", "--epsilon", "2"), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "pip install 'manualgrad[dp]'" in err and "dp-accounting" in err
    assert not (tmp_path / "run").exists()


def test_a_very_large_epsilon_is_planned_quickly_and_says_what_it_means(tiny, tmp_path, capsys):
    """Issue 19: ``--dp --epsilon 1e9`` said "MemoryError: Unable to allocate 1.41 TiB" after minutes of silence."""
    import time

    start = time.perf_counter()
    metrics = run(dp_config(tiny, tmp_path / "run", epsilon=1e9, accountant="pld"))
    assert time.perf_counter() - start < 60 and metrics["completed"]
    printed = capsys.readouterr().out
    assert "no meaningful privacy guarantee" in printed and "MemoryError" not in printed
    assert 0 < metrics["privacy"]["spent_epsilon"] <= 1e9
