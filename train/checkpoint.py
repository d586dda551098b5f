"""Atomic files: checkpoints (``torch.save``) and JSON.

Each file is written to a temporary name in the same folder and renamed over
the old one with ``os.replace``, so a crash or Ctrl-C mid-write leaves the
previous version intact, never half a file.

A checkpoint holds everything a run needs to continue exactly where it
stopped: model, optimizer and scheduler states, the number of finished epochs,
and, when it was written in the middle of an epoch (Ctrl-C), that epoch's batch
order, the next step and the loss summed so far; plus the RNG states (the
data generator, which orders batches and draws augmentations, and every
process's torch RNG, which draws dropout masks) and the metrics so far.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(state: dict, path: str) -> None:
    _atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def write_json(obj, path: str) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def checkpoint_path(path: str) -> str:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a run folder."""
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message is meant for the user."""


def load(path: str, map_location="cpu") -> dict:
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise CheckpointError(f"--resume: cannot read {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {path} is not a checkpoint of this training program")
    return state
