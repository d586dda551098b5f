"""``checkpoint.pt``: everything a run needs to continue exactly where it stopped, checked on the way in.

The file is one header line and a ``torch.save`` archive::

    manualgrad-train checkpoint format 2 bytes <n> sha256 <hex digest of the n bytes>\\n<n bytes>

so that :func:`load` can tell an empty, truncated, corrupted or foreign file
from a checkpoint, and say which, before unpickling anything. It is written
atomically (:func:`train.files.write_atomically`).

The archive holds a dict: the model, optimizer and scheduler states; the
number of finished epochs; ``position``, when it was written in the middle of
an epoch (Ctrl-C): that epoch's batch order, the next step and the loss summed
so far; the RNG states (the data generator, which orders batches and draws
augmentations, and every process's torch RNG, which draws dropout masks); the
metrics so far; the configuration; and the fingerprint of the data it was
trained on. A ``--dp`` run's also holds ``privacy`` (the steps taken, which
are the accountant's whole state, and the noise multiplier) and the noise
stream's state (``rng["noise"]``). :func:`load` is the only reader, and checks
all of that.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import torch

from .config import Config
from .errors import RunError
from .files import write_atomically

FORMAT = 2
FILENAME = "checkpoint.pt"
MAGIC = b"manualgrad-train checkpoint"
_HEADER = re.compile(rb"manualgrad-train checkpoint format (\d+) bytes (\d+) sha256 ([0-9a-f]{64})\n")
_ZIP = b"PK\x03\x04"  # how a torch.save archive begins

# Every key a checkpoint holds, and the type its value must have.
KEYS = {
    "config": dict,
    "data": dict,
    "epoch": int,
    "position": (dict, type(None)),
    "history": list,
    "rng": dict,
    "world_size": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": (dict, type(None)),
}
POSITION_KEYS = ("step", "order", "loss_sum", "rows", "seconds")


class CheckpointError(RunError):
    """A checkpoint that cannot be used; the message is meant for the user."""


def checkpoint_path(path: str) -> str:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a run folder."""
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def save(state: dict, path: str) -> None:
    """Write ``state`` (see the module docstring for its keys) to ``path``, atomically, with its checksum."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = MAGIC + f" format {FORMAT} bytes {len(payload)} sha256 {digest}\n".encode()
    write_atomically(path, header + payload)


def load(path: str) -> dict:
    """The checkpoint at ``path`` (a file, or a run folder holding one), on the CPU, checked: its
    checksum, its format and every key. Anything else is a one-line :class:`CheckpointError`."""
    path = checkpoint_path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    state = _unpack(raw, path)
    _check(state, path)
    return state


def _unpack(raw: bytes, path: str) -> dict:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"cannot resume from {path}: {problem}")

    if not raw:
        raise bad("empty file")
    if not raw.startswith(MAGIC):
        if raw.startswith(_ZIP):
            raise bad(f"{_foreign_archive(raw)}; start a new run")
        raise bad("not a checkpoint (neither this program's checkpoint nor a torch.save archive)")
    end = raw.find(b"\n", 0, 200)
    header = _HEADER.fullmatch(raw[: end + 1]) if end >= 0 else None
    if header is None:
        raise bad("truncated or damaged header" if end < 0 else "checkpoint is corrupt (damaged header)")
    version, size, digest = int(header[1]), int(header[2]), header[3].decode()
    if version != FORMAT:
        raise bad(f"written in checkpoint format {version}; this version reads format {FORMAT}")
    payload = raw[end + 1 :]
    if len(payload) < size:
        raise bad(f"truncated ({len(payload):,} of {size:,} bytes)")
    if len(payload) > size:
        raise bad(f"checkpoint is corrupt ({len(payload) - size:,} bytes more than its header says)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise bad("checkpoint is corrupt (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)  # tensors and plain data
    except Exception as e:  # the checksum matched, so this is not damage in transit: report torch's reason
        raise bad(f"cannot unpickle it ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise bad("not a checkpoint of this training program")
    return state


def _foreign_archive(raw: bytes) -> str:
    """What a torch.save archive without our header is: a checkpoint of format 1, or something else."""
    try:
        old = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:
        return "a torch.save archive that cannot be read (truncated or corrupt?), not a checkpoint of this program"
    if isinstance(old, dict) and old.get("format") == 1:
        return "written by an older version of this program (checkpoint format 1, without a checksum)"
    return "a torch.save file, not a checkpoint of this training program"


def _check(state: dict, path: str) -> None:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"cannot resume from {path}: the checkpoint {problem}")

    missing = [k for k in KEYS if k not in state]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    for key, kind in KEYS.items():
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise bad(f"has a {type(state[key]).__name__} for {key}")
    try:
        saved = Config.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise bad(f"has an invalid configuration ({e})") from None
    if not 0 <= state["epoch"] <= saved.epochs:
        raise bad(f"says {state['epoch']} epochs are done, of {saved.epochs}")
    position = state["position"]
    if position is not None and any(k not in position for k in POSITION_KEYS):
        raise bad(f"has an incomplete position (needs {', '.join(POSITION_KEYS)})")
    rng = state["rng"]
    if not isinstance(rng.get("data"), torch.Tensor) or not isinstance(rng.get("torch"), list) or not rng["torch"]:
        raise bad("has incomplete RNG states")
    if not isinstance(state["data"].get("fingerprint"), str):
        raise bad("lacks the fingerprint of its data")
    if saved.dp:
        private = state.get("privacy")
        if not isinstance(private, dict) or not isinstance(private.get("steps"), int) or "noise" not in rng:
            raise bad("of a --dp run lacks its privacy state (steps taken, noise stream)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
