"""Tests of the training program (``train/``): files, resume, errors, options, several processes.

Most tests train in-process on tiny IDX files written here (the real reader
reads them); one trains an epoch on the real MNIST named by the environment
variable ``MANUALGRAD_MNIST_DIR``. Command-line behaviour (exit statuses,
messages) is checked through ``python -m train`` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import Config, augment, checkpoint, data, run
from train.config import parse_args
from train.engine import TrainingError

REPO = Path(__file__).resolve().parents[1]


# ---- tiny IDX files


def write_idx(path: Path, array: torch.Tensor, gz: bool = False) -> None:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, the dimensions, the bytes."""
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">I", 0x0800 | array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    payload = header + array.numpy().tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def tiny_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: class c lights up row block c (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 250
    return images, labels


def make_mnist(folder: Path, n_train: int = 64, n_test: int = 32, gz: bool = False) -> Path:
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = tiny_images(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, gz)
    return folder


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_mnist(tmp_path / "mnist")


def tiny_config(data_dir: Path, out: Path, **changes) -> Config:
    base = Config(
        data_dir=str(data_dir),
        out=str(out),
        download=False,
        epochs=1,
        batch_size=16,
        hidden=(32, 16),
        dropout=0.0,
        progress=False,
        threads=1,
        lr=3e-3,
        device="cpu",
    )
    return dataclasses.replace(base, **changes)


def run_cli(*args, cwd=REPO, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def load_params(run_folder: Path) -> dict:
    return torch.load(run_folder / "checkpoint.pt", weights_only=True)["model"]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# ---- files of a run


def test_smoke_writes_well_formed_files(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny, out, dropout=0.1, augment="elastic")
    metrics = run(cfg)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"]
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert [r["epoch"] for r in saved["epochs"]] == [1]
    record = saved["epochs"][0]
    assert set(record) >= {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
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


def test_learns_the_tiny_problem(tiny, tmp_path):
    metrics = run(tiny_config(tiny, tmp_path / "run", epochs=10, lr=1e-2))
    losses = [r["train_loss"] for r in metrics["epochs"]]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["test_accuracy"] >= 0.8


def test_reads_gzipped_files_and_plain_folder(tmp_path):
    folder = make_mnist(tmp_path / "gz", n_train=20, n_test=10, gz=True)
    mnist = data.load(str(folder), torch.device("cpu"), download=False)
    assert mnist.train_x.shape == (20, 784) and mnist.test_y.shape == (10,)
    images, labels = tiny_images(20, 0)
    assert torch.equal(mnist.train_y, labels)
    assert torch.allclose(mnist.train_x, data.normalise(images))
    # the four files directly in --data-dir work too
    flat = make_mnist(tmp_path / "flat", n_train=20, n_test=10) / "MNIST" / "raw"
    assert data.locate(str(flat), download=False) == str(flat)


# ---- real data (CI sets MANUALGRAD_MNIST_DIR=../shared/mnist)


def test_one_epoch_on_real_mnist(tmp_path):
    folder = os.environ.get("MANUALGRAD_MNIST_DIR")
    if not folder:
        pytest.skip("set MANUALGRAD_MNIST_DIR to a folder with the MNIST IDX files to run this test")
    cfg = Config(data_dir=folder, out=str(tmp_path / "run"), download=False, epochs=1, progress=False)
    metrics = run(cfg)
    assert metrics["test_accuracy"] >= 0.95, metrics["epochs"]


# ---- resume


def interrupt_at(epoch: int, step: int):
    """An on_step hook that presses Ctrl-C (a real SIGINT) after the given step."""

    def hook(e, s, trainer):
        if (e, s) == (epoch, step):
            signal.raise_signal(signal.SIGINT)

    return hook


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

    assert without_seconds(resumed["epochs"]) == without_seconds(whole["epochs"])
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    ours, reference = load_params(Path(part.out)), load_params(Path(cfg.out))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_resume_cli_refuses_changed_training_options(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(tiny, out))
    cfg = parse_args(["--resume", str(out), "--threads", "1"])  # where and how it runs may change
    assert cfg.hidden == (32, 16) and cfg.batch_size == 16 and cfg.out is None and cfg.threads == 1
    with pytest.raises(SystemExit) as e:
        parse_args(["--resume", str(out), "--lr", "0.5"])
    assert e.value.code == 2


def test_new_run_refuses_a_folder_holding_a_run(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run")
    run(cfg)
    with pytest.raises(TrainingError, match="already holds a run"):
        run(cfg)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    def poison(epoch, step, trainer):
        if (epoch, step) == (2, 1):
            with torch.no_grad():
                next(iter(trainer.params)).fill_(float("nan"))

    cfg = tiny_config(tiny, tmp_path / "run", epochs=3)
    with pytest.raises(TrainingError, match="nan at epoch 2, step 2"):
        run(cfg, on_step=poison)
    state = checkpoint.load(cfg.out)
    assert state["epoch"] == 1 and state["position"] is None
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert len(json.loads((Path(cfg.out) / "metrics.json").read_text())["epochs"]) == 1


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
    assert "epoch-time ratio" in printed
    native = metrics["native"]
    assert len(native["epochs"]) == 2 and native["time_ratio"]["mean"] > 0
    # same initial weights, batches and dropout masks: the two runs differ only by float rounding
    for ours, theirs in zip(metrics["epochs"], native["epochs"]):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-4)


def test_check_grads_reports_a_wrong_gradient(tiny, tmp_path, monkeypatch):
    from manualgrad.functions import mlp as fused_mlp

    original = fused_mlp._backward

    def wrong(spec, grad, *args):  # doubles every gradient
        return [g * 2 if g is not None else None for g in original(spec, grad, *args)]

    monkeypatch.setattr(fused_mlp, "_backward", wrong)
    with pytest.raises(TrainingError, match="check-grads"):
        run(tiny_config(tiny, tmp_path / "run", check_grads=True))


# ---- augmentation


def test_shift_moves_whole_pixels_and_elastic_keeps_the_background():
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 28, 28)
    images[:, 10:18, 12:16] = 1.0
    x = (images.view(8, -1) - data.MEAN) / data.STD
    (theta,) = augment.draw("shift", 8, g)
    shifted = augment.apply(x, (theta,))
    for i in range(8):
        dx, dy = (theta[i, :, 2] * 28 / 2).round().long().tolist()
        expected = torch.roll(images[i], shifts=(-dy, -dx), dims=(0, 1))  # grid offsets sample from +d
        assert torch.allclose(shifted[i].view(28, 28) * data.STD + data.MEAN, expected, atol=1e-5)
    elastic = augment.apply(x, augment.draw("elastic", 8, g))
    assert elastic.shape == x.shape
    corner = elastic.view(8, 28, 28)[:, 0, 0]
    assert torch.allclose(corner, torch.full_like(corner, augment.BACKGROUND), atol=1e-4)
    assert not torch.allclose(elastic, x)


# ---- errors the user sees: short, name the folder, no traceback


@pytest.mark.parametrize("damage", ["bad-magic", "truncated"])
def test_corrupt_file_gives_a_short_message(tmp_path, damage):
    folder = make_mnist(tmp_path / "mnist")
    victim = folder / "MNIST" / "raw" / "train-images-idx3-ubyte"
    content = victim.read_bytes()
    victim.write_bytes(b"\x00\x00\x09\x99" + content[4:] if damage == "bad-magic" else content[:-100])
    result = run_cli("--data-dir", str(folder), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(folder / "MNIST" / "raw") in result.stderr and "train-images-idx3-ubyte" in result.stderr
    assert ("magic number" if damage == "bad-magic" else "truncated") in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3


def test_missing_files_without_download(tmp_path):
    result = run_cli("--data-dir", str(tmp_path / "empty"), "--no-download", "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "empty") in result.stderr and "IDX files" in result.stderr
    assert not (tmp_path / "run").exists(), "the run folder is made only once the data is there"


def test_failed_download_gives_a_short_message(tmp_path, monkeypatch):
    def offline(folder):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(data, "fetch", offline)
    with pytest.raises(data.DataError) as e:
        data.locate(str(tmp_path / "nowhere"), download=True)
    message = str(e.value)
    assert "download failed" in message and str(tmp_path / "nowhere") in message and "--data-dir" in message


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "-1"],
        ["--epochs", "2.5"],
        ["--lr", "fast"],
        ["--lr", "-0.1"],
        ["--activation", "swish"],
        ["--hidden", "512,x"],
        ["--dropout", "1"],
        ["--batch-size", "0"],
        ["--preset", "fastest"],
    ],
)
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_bad_option_from_the_command_line(tmp_path):
    result = run_cli("--lr", "abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--lr" in result.stderr


def test_preset_values_are_defaults_that_flags_override():
    best = parse_args(["--preset", "best"])
    assert best.augment != "none" and best.hidden != Config().hidden
    mine = parse_args(["--preset", "best", "--epochs", "3", "--hidden", "64"])
    assert (mine.epochs, mine.hidden, mine.augment) == (3, (64,), best.augment)


# ---- several processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny, tmp_path):
    # 64 images in batches of 15: shares of 8 and 7 rows, and a last batch of 4
    options = dict(epochs=2, batch_size=15, augment="affine", threads=1)
    single = run(tiny_config(tiny, tmp_path / "one", **options))

    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "train",
        "--data-dir",
        str(tiny),
        "--no-download",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "15",
        "--hidden",
        "32,16",
        "--dropout",
        "0",
        "--lr",
        "3e-3",
        "--augment",
        "affine",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]  # gloo on loopback
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
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
