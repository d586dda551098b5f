"""Tests of a whole training run (``train.run``): its files, learning, resuming, the three ways of
computing gradients, several processes, and one epoch on the real MNIST.

Runs train in-process on tiny IDX files written by the test; the real MNIST is read from the folder
named by the environment variable ``MANUALGRAD_MNIST_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    REPO,
    Config,
    interrupt_at,
    load_params,
    run,
    run_torchrun,
    tiny_argv,
    tiny_config,
    without_timing,
)

import manualgrad.nn as mnn
from train import checkpoint
from train.engine import TrainingError

# ---- files of a run


def test_smoke_writes_well_formed_files(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny, out, dropout=0.1, augment="elastic")
    metrics = run(cfg)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"]
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["completed"] and not saved["interrupted"]
    assert [r["epoch"] for r in saved["epochs"]] == [1]
    record = saved["epochs"][0]
    assert set(record) >= {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds", "threads"}
    assert record["train_loss"] > 0 and record["test_loss"] > 0 and record["seconds"] > 0
    assert saved["config"] == cfg.to_dict()
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()

    state = checkpoint.load(str(out))
    assert state["epoch"] == 1 and state["position"] is None
    assert list(state["model"]) == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"]
    assert state["model"]["0.weight"].shape == (32, 784)

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    import matplotlib.pyplot as plt

    assert plt.imread(str(out / "curves.png")).ndim == 3
    assert not list(out.glob("*.tmp")), "temporary files left behind"


def test_curves_are_drawn_once_at_the_end(tiny, tmp_path, monkeypatch):
    from train import plot

    drawn = []
    monkeypatch.setattr(plot, "curves_png", lambda metrics: drawn.append(len(metrics["epochs"])) or b"png")
    run(tiny_config(tiny, tmp_path / "run", epochs=3))
    assert drawn == [3]


def test_plot_command_redraws_the_curves(tiny, tmp_path, capsys):
    from train.plot import main as plot_main

    out = tmp_path / "run"
    run(tiny_config(tiny, out, epochs=2))
    (out / "curves.png").unlink()
    assert plot_main([str(out)]) == 0
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert plot_main([str(tmp_path)]) == 1
    assert "no metrics.json" in capsys.readouterr().err


def test_drawing_the_curves_leaves_the_callers_matplotlib_as_it_was(tiny, tmp_path):
    """A run drawn from a notebook keeps its backend (not switched to Agg) and adds no pyplot figure."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        run(tiny_config(tiny, tmp_path / "run", epochs=1))
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_learns_the_tiny_problem(tiny, tmp_path):
    metrics = run(tiny_config(tiny, tmp_path / "run", epochs=10, lr=1e-2))
    losses = [r["train_loss"] for r in metrics["epochs"]]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["test_accuracy"] >= 0.8


# ---- real data (CI sets MANUALGRAD_MNIST_DIR to a folder holding MNIST)


@pytest.mark.slow
def test_one_epoch_on_real_mnist(tmp_path):
    folder = os.environ.get("MANUALGRAD_MNIST_DIR")
    if not folder:
        pytest.skip("set MANUALGRAD_MNIST_DIR to a folder with the MNIST IDX files to run this test")
    cfg = Config(data_dir=folder, out=str(tmp_path / "run"), download=False, epochs=1, progress=False)
    metrics = run(cfg)
    assert metrics["test_accuracy"] >= 0.95, metrics["epochs"]


# ---- resume


@pytest.mark.slow
@pytest.mark.parametrize("where", [(1, 4), (1, 2), (2, 1)], ids=["epoch-end", "mid-epoch-1", "mid-epoch-2"])
def test_resume_gives_identical_results(tiny, tmp_path, where):
    # dropout and augmentation on, so that every random stream must be restored
    cfg = tiny_config(tiny, tmp_path / "whole", epochs=2, dropout=0.2, augment="affine")
    whole = run(cfg)

    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    first = run(part, on_step=interrupt_at(*where))
    assert first["interrupted"] and not first["completed"]
    state = checkpoint.load(part.out)
    assert state["epoch"] == where[0] - (where[1] < 4)  # finished epochs
    resumed = run(dataclasses.replace(part, resume=part.out))

    assert without_timing(resumed["epochs"]) == without_timing(whole["epochs"])
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    ours, reference = load_params(Path(part.out)), load_params(Path(cfg.out))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_resume_of_a_finished_run_does_nothing(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path / "run")
    first = run(cfg)
    again = run(dataclasses.replace(cfg, resume=cfg.out))
    assert "nothing to do" in capsys.readouterr().out
    assert without_timing(again["epochs"]) == without_timing(first["epochs"]) and again["completed"]


# ---- the three ways of computing gradients agree


def test_layers_impl_trains_like_fused(tiny, tmp_path):
    fused = run(tiny_config(tiny, tmp_path / "fused", epochs=2, dropout=0.2))
    layers = run(tiny_config(tiny, tmp_path / "layers", epochs=2, dropout=0.2, impl="layers"))
    a, b = load_params(tmp_path / "fused"), load_params(tmp_path / "layers")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert layers["epochs"][-1]["train_loss"] == pytest.approx(fused["epochs"][-1]["train_loss"], rel=1e-4)


def test_compare_native_and_check_grads(tiny, tmp_path, capsys):
    cfg = tiny_config(
        tiny, tmp_path / "run", epochs=2, dropout=0.2, label_smoothing=0.1, compare_native=True, check_grads=True
    )
    metrics = run(cfg)
    printed = capsys.readouterr().out
    assert "largest relative difference" in printed and "MISMATCH" not in printed
    assert "check-grads [fused]" in printed and "check-grads [layers]" in printed
    assert "epoch-time ratio" in printed
    native = metrics["native"]
    assert len(native["epochs"]) == 2 and native["time_ratio"]["mean"] > 0
    # same initial weights, batches and dropout masks: the two runs differ only by float rounding
    for ours, theirs in zip(metrics["epochs"], native["epochs"]):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-4)


class _DoubleGradient(torch.autograd.Function):
    """The identity, whose backward doubles the gradient: a wrong gradient for --check-grads to catch."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_check_grads_reports_a_wrong_gradient(tiny, tmp_path, monkeypatch):
    original = mnn.MLP.loss

    def wrong(self, *args, **kwargs):  # the fused loss's value, with every gradient doubled
        return _DoubleGradient.apply(original(self, *args, **kwargs))

    monkeypatch.setattr(mnn.MLP, "loss", wrong)
    with pytest.raises(TrainingError, match=r"check-grads: the fused gradients differ"):
        run(tiny_config(tiny, tmp_path / "run", check_grads=True))


# ---- several processes


@pytest.mark.slow
def test_two_processes_match_one(tiny, tmp_path):
    # 64 images in batches of 15: shares of 8 and 7 rows, and a last batch of 4
    options = dict(epochs=2, batch_size=15, augment="affine", threads=1)
    single = run(tiny_config(tiny, tmp_path / "one", **options))

    out = tmp_path / "two"
    argv = tiny_argv(tiny, out, "--epochs", "2", "--batch-size", "15", "--augment", "affine")
    result = run_torchrun(*argv)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 processes" in result.stdout

    two = json.loads((out / "metrics.json").read_text())
    assert two["environment"]["processes"] == 2
    a, b = load_params(tmp_path / "one"), load_params(out)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    for r1, r2 in zip(single["epochs"], two["epochs"]):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
        assert r2["test_accuracy"] == pytest.approx(r1["test_accuracy"], abs=1 / 32)


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_writes_a_checkpoint_and_exits_130(tiny, tmp_path):
    """The whole command line: a SIGINT mid-run is a checkpoint, exit status 130 and a resume hint."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *tiny_argv(tiny, out, "--epochs", "200")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("epoch "):  # the first epoch's summary: it is training
                process.send_signal(signal.SIGINT)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    assert checkpoint.load(str(out))["epoch"] >= 1
    assert json.loads((out / "metrics.json").read_text())["interrupted"] is True
    assert (out / "curves.png").exists()
