"""Checkpoints forged with a valid header and checksum: their configuration is checked as the command line
would check it, their state by type, shape and range; whatever is wrong is a one-line error, never a traceback.

The fuzz tests change one entry of a real checkpoint at random (a value replaced by another type, an empty or
odd-shaped tensor, a number out of range; an entry removed or added) and resume from it.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import pytest
import torch
from train_helpers import run, run_main, tiny_config

from train import checkpoint
from train.checkpoint import CheckpointError


@pytest.fixture
def interrupted(tiny, tmp_path) -> dict:
    """A real checkpoint of a run interrupted in epoch 2 of 3 (so it has a position), with dropout."""
    cfg = tiny_config(tiny, tmp_path / "run", epochs=3, dropout=0.2)
    run(cfg, on_step=lambda e, s, t: (e, s) == (2, 2) and os.kill(os.getpid(), 2))
    state = checkpoint.load(cfg.out)
    assert state["position"] is not None and state["epoch"] == 1
    return state


def _resume(state: dict, tiny: Path, tmp_path: Path, capsys, name: str = "forged") -> tuple[int, str]:
    """Save ``state`` as a valid checkpoint and resume from it (data, threads and download fixed on the
    command line, so that a forged data folder is not downloaded into): exit status, stderr."""
    path = tmp_path / f"{name}.pt"
    checkpoint.save(state, str(path))
    argv = ["--resume", str(path), "--out", str(tmp_path / f"{name}-out"), "--no-progress", "--threads", "1"]
    status, _, err = run_main([*argv, "--data-dir", str(tiny), "--no-download"], capsys)
    return status, err


def _set(state: dict, path: tuple, value) -> dict:
    forged = copy.deepcopy(state)
    where = forged
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    return forged


FORGERIES = {
    "batch_size=0": (("config", "batch_size"), 0, "--batch-size 0: must be a positive integer"),
    "hidden='abc'": (("config", "hidden"), "abc", "--hidden"),
    "lr='fast'": (("config", "lr"), "fast", "--lr fast: 'fast' is not a number"),
    "bad activation": (("config", "activation"), "swish", "--activation swish: invalid choice: 'swish'"),
    "activation importing a file": (("config", "activation"), "evil.py:x", "is not a registered activation's name"),
    "epochs=2.5": (("config", "epochs"), 2.5, "--epochs 2.5"),
    "dp=1": (("config", "dp"), 1, "--dp: expected true or false"),
    "bad data RNG": (("rng", "data"), torch.zeros(3, dtype=torch.uint8), "invalid RNG state"),
    "bad torch RNG": (("rng", "torch"), [{"cpu": torch.ones(7)}], "invalid RNG state"),
    "RNG not a dict": (("rng", "torch"), ["x"], "incomplete RNG states"),
    "history of strings": (("history",), ["epoch one"], "invalid record in history"),
    "history too long": (("history",), [], "0 records in history for 1 finished epochs"),
    "loss a string": (("history", 0, "train_loss"), "low", "invalid record in history (epoch 1)"),
    "step past the epoch": (("position", "step"), 99, "invalid position (step 99"),
    "step 0": (("position", "step"), 0, "invalid position (step 0"),
    "step a float": (("position", "step"), 2.0, "invalid position"),
    "order short": (("position", "order"), torch.arange(10), "batch order is not an order"),
    "order repeats": (("position", "order"), torch.zeros(64, dtype=torch.long), "batch order is not an order"),
    "loss negative": (("position", "loss_sum"), -1.0, "invalid position (loss, rows or seconds"),
    "world 0": (("world_size",), 0, "written by 0 processes"),
    "no data sizes": (("data", "train"), "many", "no valid sizes"),
    "a huge data size": (("data", "train"), 10**30, "no valid sizes"),
    "history with a tensor": (("history", 0, "unexpected"), torch.zeros(2), "epoch 1: unknown entries"),
    "optimizer state entry": (("optimizer", "state", 0, 7), torch.zeros(1), "optimizer state[0] has other entries"),
    "CUDA RNG state": (("rng", "torch", 0, "cuda"), "x", "invalid RNG state"),
    "long string": (("config", "activation"), "x" * 10_000, "--activation: 'xxxx"),
    "long number": (("config", "lr"), "9" * 10_000, "--lr: '9999"),
    "model entry not a tensor": (("model", "0.weight"), [[0.0]], "model['0.weight'] is a list"),
    "model entry wrong shape": (("model", "0.weight"), torch.zeros(3, 3), "model['0.weight'] is (3, 3)"),
    "model entry wrong dtype": (("model", "0.bias"), torch.zeros(32, dtype=torch.float64), "torch.float64"),
    "optimizer lr a string": (("optimizer", "param_groups", 0, "lr"), "fast", "param_groups"),
    "optimizer state shape": (("optimizer", "state", 0, "exp_avg"), torch.zeros(2), "exp_avg'] is (2,) torch.float32"),
    "optimizer state emptied": (("optimizer", "state"), {}, "optimizer state has other entries"),
    "optimizer state key": (("optimizer", "state", 99), {}, "optimizer state has other entries"),
    "scheduler step a string": (("scheduler", "last_epoch"), "ten", "scheduler['last_epoch']"),
    "scheduler missing": (("scheduler",), None, "scheduler"),
}


@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_forged_checkpoint_is_a_one_line_error(interrupted, tiny, tmp_path, capsys, forgery):
    path, value, problem = forgery
    status, err = _resume(_set(interrupted, path, value), tiny, tmp_path, capsys)
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert problem in err and len(err) < 400, err


def test_the_unforged_checkpoint_resumes(interrupted, tiny, tmp_path, capsys):
    """The fixture itself is fine: what the forgeries change is what gets refused."""
    status, err = _resume(interrupted, tiny, tmp_path, capsys)
    assert status == 0, err


# ---- fuzz: one entry changed at random


JUNK = [
    None,
    -1,
    0,
    1,
    10**30,
    2.5,
    float("nan"),
    float("inf"),
    "abc",
    "",
    True,
    [],
    {},
    [1, 2],
    {"x": 1},
    torch.zeros(0),
    torch.zeros(3, 3),
    torch.ones(5, dtype=torch.uint8),
]


def _paths(value, prefix=()) -> list[tuple]:
    """Every entry of the nested dicts and lists of a checkpoint (tensors are leaves)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _forge(state: dict, rng: random.Random) -> tuple[dict, str]:
    """``state`` with one entry replaced by junk, removed, or given an unknown neighbour; and what was done."""
    path = rng.choice(_paths(state))
    forged = copy.deepcopy(state)
    parent = forged
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(["replace"] * 4 + ["remove", "add"])
    if action == "remove" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent["unexpected"] = rng.choice(JUNK)
    else:
        junk = rng.choice(JUNK)
        parent[path[-1]] = junk.clone() if isinstance(junk, torch.Tensor) else copy.deepcopy(junk)
        action = f"replace with {junk!r}"[:60]
    return forged, f"{action} at {path}"


def test_fuzz_the_checkpoint_loader(interrupted, tmp_path):
    """``checkpoint.load`` of 300 forged checkpoints: each loads or raises a one-line CheckpointError."""
    rng = random.Random(19)
    path = tmp_path / "forged.pt"
    for _ in range(300):
        forged, what = _forge(interrupted, rng)
        checkpoint.save(forged, str(path))
        try:
            checkpoint.load(str(path))
        except CheckpointError as e:
            assert len(str(e).splitlines()) == 1, (what, str(e))


OTHER_RUNS = {
    "sgd-cosine": dict(optimizer="sgd", schedule="cosine", augment="shift"),
    "adam-constant": dict(optimizer="adam", schedule="none", hidden=()),
    "cnn": dict(model="cnn", impl="layers", hidden=(8,), augment="none"),
}


@pytest.mark.slow
@pytest.mark.parametrize("run_kind", ["adamw-onecycle", *OTHER_RUNS])
def test_fuzz_resuming_from_forged_checkpoints(interrupted, tiny, tmp_path, capsys, run_kind):
    """``python -m train --resume`` of 60 forged checkpoints of each kind of run (optimizer, schedule, model):
    each resumes (and finishes) or stops with a one-line error; never a traceback."""
    state = interrupted
    if run_kind in OTHER_RUNS:
        cfg = tiny_config(tiny, tmp_path / run_kind, epochs=3, dropout=0.2, **OTHER_RUNS[run_kind])
        run(cfg, on_step=lambda e, s, t: (e, s) == (2, 2) and os.kill(os.getpid(), 2))
        state = checkpoint.load(cfg.out)
    rng = random.Random(f"1919-{run_kind}")
    for case in range(60):
        forged, what = _forge(state, rng)
        status, err = _resume(forged, tiny, tmp_path, capsys, name=f"forged-{case}")
        assert status in (0, 1, 2) and "Traceback" not in err, (what, err)
        assert status == 0 or len(err.strip().splitlines()) == 1, (what, err)


def test_a_checkpoint_from_a_machine_with_more_cores_resumes(interrupted, tiny, tmp_path, capsys):
    """Where and how a run runs (--threads, --device, ...) comes from the resuming command line: a stored
    --threads beyond this machine's range is no reason to refuse the checkpoint."""
    from train.config import MAX_THREADS

    status, err = _resume(_set(interrupted, ("config", "threads"), MAX_THREADS + 1), tiny, tmp_path, capsys)
    assert status == 0, err


def test_optimizer_options_an_older_torch_lacked_are_no_reason_to_refuse(interrupted, tiny, tmp_path, capsys):
    """A checkpoint written by an older torch lacks param_group options added since (torch's load_state_dict
    fills them in): it resumes. An option torch does not know is refused."""
    older = copy.deepcopy(interrupted)
    del older["optimizer"]["param_groups"][0]["differentiable"]
    status, err = _resume(older, tiny, tmp_path, capsys)
    assert status == 0, err
    status, err = _resume(_set(interrupted, ("optimizer", "param_groups", 0, "novel"), 1.0), tiny, tmp_path, capsys)
    assert status == 1 and "optimizer param_groups[0] has other entries" in err
