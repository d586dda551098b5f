"""What the tests of the training program (``tests/test_train_*.py``) share: tiny IDX files written
here (read by the real reader), a small configuration, and ways to run the program and read its files."""

from __future__ import annotations

import dataclasses
import gzip
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import torch

from train import Config, checkpoint, run
from train.__main__ import main

REPO = Path(__file__).resolve().parents[1]


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


def make_mnist(folder: Path, n_train: int = 64, n_test: int = 32, gz: bool = False, seed: int = 0) -> Path:
    """Four tiny IDX files in ``folder/MNIST/raw`` (torchvision's layout); returns ``folder``."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = tiny_images(n, seed + offset)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, gz)
    return folder


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


def tiny_argv(data_dir: Path, out: Path, *more: str) -> list[str]:
    """The command line of :func:`tiny_config`."""
    return [
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--hidden",
        "32,16",
        "--dropout",
        "0",
        "--no-progress",
        "--threads",
        "1",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        *more,
    ]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m train ARGV`` in this process: exit status (a usage error's too), stdout, stderr."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def run_cli(*args, cwd=REPO, timeout=120, module="train", **env) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` in a subprocess: for what only a real process shows (exit status, signals)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def load_params(run_folder: Path) -> dict:
    return checkpoint.load(str(run_folder))["model"]


def without_timing(records: list[dict]) -> list[dict]:
    """Epoch records without what depends on the machine's speed (seconds, the auto thread count)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "threads")} for r in records]


def interrupt_at(epoch: int, step: int):
    """An on_step hook that presses Ctrl-C (a real SIGINT) after the given step."""

    def hook(e, s, trainer):
        if (e, s) == (epoch, step):
            signal.raise_signal(signal.SIGINT)

    return hook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(*args: str, processes: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=PROCESSES -m train ARGS`` in a subprocess, on loopback (gloo): one machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "train", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def clipped_sum_one_by_one(twin: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list:
    """DP-SGD's clipped sum by torch autograd, one example at a time: Σ_n min(1, C/‖g_n‖) g_n over ``twin``'s
    parameters; asserts each bound is active (so a test checks the clipping, not only the sum)."""
    expected = [torch.zeros_like(p) for p in twin.parameters()]
    for n in range(len(y)):
        loss = torch.nn.functional.cross_entropy(twin(x[n : n + 1]), y[n : n + 1])
        grads = torch.autograd.grad(loss, list(twin.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        assert norm > clip, (n, float(norm), clip)
        for e, g in zip(expected, grads):
            e += g * min(1.0, clip / float(norm))
    return expected


__all__ = [
    "REPO",
    "Config",
    "clipped_sum_one_by_one",
    "free_port",
    "interrupt_at",
    "load_params",
    "make_mnist",
    "run",
    "run_cli",
    "run_main",
    "run_torchrun",
    "tiny_argv",
    "tiny_config",
    "tiny_images",
    "without_timing",
    "write_idx",
]
