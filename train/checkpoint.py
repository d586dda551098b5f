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
stream's state (``rng["noise"]``); a ``--compare-native`` run's, the torch.nn
twin's epochs (``native_history``). :func:`load` is the only reader, and checks
all of that as the command line would (the configuration) and by type, shape
and range (the state), so that a checkpoint forged with a valid checksum is a
one-line error too; :func:`mismatch` checks the model, optimizer and scheduler
states against the run's own before they are loaded.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re

import torch

from .config import RUN_OPTIONS, Config, check, check_values
from .errors import ConfigError, RunError
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
    """Everything :func:`load` promises: the keys and their types, the configuration as the command line
    would take it, and the state's types and shapes (RNG states, history, position, privacy)."""

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
        check_values(saved, skip=RUN_OPTIONS)  # those come from the resuming command line (e.g. --threads)
        check(saved)
    except (TypeError, ValueError, ConfigError) as e:
        raise bad(f"has an invalid configuration ({_first_line(e)})") from None
    if not 0 <= state["epoch"] <= saved.epochs:
        raise bad(f"says {state['epoch']} epochs are done, of {saved.epochs}")
    if not 1 <= state["world_size"] <= 2**16:
        raise bad(f"says it was written by {state['world_size']} processes")
    facts = state["data"]
    if not isinstance(facts.get("fingerprint"), str):
        raise bad("lacks the fingerprint of its data")
    if not all(_is_int(facts.get(k)) and 1 <= facts[k] < 2**31 for k in ("train", "test")):
        raise bad("has no valid sizes of its training and test sets")
    for key in ("model", "optimizer"):
        if not all(isinstance(k, (str, int)) for k in state[key]):
            raise bad(f"has a {key} state with keys that are not names")
    if not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        raise bad("has a model state holding something other than tensors")
    _check_rng(state, saved, bad)
    _check_history(state["history"], state["epoch"], "history", bad)
    if "native_history" in state:  # --compare-native's torch.nn twin (may stop short: see train.runner)
        _check_history(state["native_history"], state["epoch"], "native_history", bad, complete=False)
    if state["position"] is not None:
        _check_position(state["position"], state, saved, bad)
    if saved.dp:
        private = state.get("privacy")
        if not isinstance(private, dict) or not _is_int(private.get("steps")) or "noise" not in state["rng"]:
            raise bad("of a --dp run lacks its privacy state (steps taken, noise stream)")
        sigma = private.get("noise_multiplier")
        if private["steps"] < 0 or not _is_number(sigma) or not 0 < sigma < math.inf:
            raise bad("of a --dp run has an invalid privacy state (steps taken, noise multiplier)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rng(state: dict, saved: Config, bad) -> None:
    """Each RNG state is one a generator takes: tried on a scratch generator of its kind."""
    rng = state["rng"]
    streams = [rng.get("data")]
    per_rank = rng.get("torch")
    if not isinstance(per_rank, list) or not per_rank or not all(isinstance(r, dict) for r in per_rank):
        raise bad("has incomplete RNG states")
    streams += [r.get("cpu") for r in per_rank]
    for r in per_rank:  # a CUDA run's: checked by the device's own generator when it is set; here its type
        cuda = r.get("cuda", torch.zeros(1, dtype=torch.uint8))
        if not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8 or cuda.dim() != 1:
            raise bad("has an invalid RNG state")
    if saved.dp and "noise" in rng:
        streams.append(rng["noise"])
    for stream in streams:
        try:
            torch.Generator().set_state(stream)
        except (TypeError, RuntimeError, ValueError):
            raise bad("has an invalid RNG state") from None


def _check_history(history: list, epochs: int, key: str, bad, complete: bool = True) -> None:
    """One record per finished epoch (all of them, unless not ``complete``): epoch numbers 1, 2, ..., numbers."""
    if len(history) > epochs or (complete and len(history) != epochs):
        raise bad(f"has {len(history)} records in {key} for {epochs} finished epochs")
    for number, record in enumerate(history, 1):
        if not isinstance(record, dict) or not _is_int(record.get("epoch")) or record["epoch"] != number:
            raise bad(f"has an invalid record in {key} (epoch {number})")
        needed = ("train_loss", "seconds")
        optional = ("test_loss", "test_accuracy", "epsilon", "steps")
        if not set(record) <= {"epoch", "threads", *needed, *optional}:
            raise bad(f"has an invalid record in {key} (epoch {number}: unknown entries)")
        if not all(_is_number(record.get(k)) for k in needed) or not all(
            _is_number(record[k]) for k in optional if record.get(k) is not None
        ):
            raise bad(f"has an invalid record in {key} (epoch {number})")
        if "threads" in record and not (record["threads"] is None or _is_number(record["threads"])):
            raise bad(f"has an invalid record in {key} (epoch {number})")


def _check_position(position: dict, state: dict, saved: Config, bad) -> None:
    """Where an interrupted epoch stopped: a step inside an unfinished epoch, the epoch's batch order (a
    permutation of the training rows; empty with --dp), and the loss, rows and seconds so far."""
    from . import data, engine

    if set(position) != set(POSITION_KEYS):
        raise bad(f"has an incomplete position (needs {', '.join(POSITION_KEYS)}, nothing else)")
    n = state["data"]["train"]
    steps = engine.dp_steps_per_epoch(n, saved.batch_size) if saved.dp else data.num_batches(n, saved.batch_size)
    step, order = position["step"], position["order"]
    if state["epoch"] >= saved.epochs or not _is_int(step) or not 1 <= step < steps:
        raise bad(
            f"has an invalid position (step {describe(step)} of epoch {state['epoch'] + 1}, which has {steps} steps)"
        )
    expected = torch.zeros(0, dtype=torch.long) if saved.dp else torch.arange(n)
    if (
        not isinstance(order, torch.Tensor)
        or order.dtype != torch.long
        or order.shape != expected.shape
        or not torch.equal(order.sort().values, expected)
    ):
        raise bad("has an invalid position (its batch order is not an order of the training rows)")
    numbers = [position[k] for k in ("loss_sum", "rows", "seconds")]
    if not all(_is_number(v) and 0 <= v < math.inf for v in numbers) or not _is_int(position["rows"]):
        raise bad("has an invalid position (loss, rows or seconds so far)")


def mismatch(expected, actual, where: str) -> str | None:
    """Where ``actual`` (a loaded state) differs in structure from ``expected`` (a fresh one of the same run):
    other keys, lengths or types, tensors of other shapes or dtypes, non-finite numbers; None when they fit."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape or actual.dtype != expected.dtype:
            got = f"{tuple(actual.shape)} {actual.dtype}" if isinstance(actual, torch.Tensor) else describe(actual)
            return f"{where} is {got}, expected {tuple(expected.shape)} {expected.dtype}"
        return None
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return f"{where} has other entries" if isinstance(actual, dict) else f"{where} is {describe(actual)}"
        return next((m for k in expected if (m := mismatch(expected[k], actual[k], f"{where}[{k!r}]"))), None)
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"{where} is {describe(actual)}, expected {len(expected)} entries"
        return next((m for i, e in enumerate(expected) if (m := mismatch(e, actual[i], f"{where}[{i}]"))), None)
    if _is_number(expected):
        return None if _is_number(actual) and math.isfinite(actual) else f"{where} is {describe(actual)}, not a number"
    return None if type(actual) is type(expected) else f"{where} is {describe(actual)}"  # bool, str, None, ...


def describe(value) -> str:
    """``value`` for a one-line message: a short repr of a plain value, else its type."""
    if isinstance(value, (int, float, str, type(None))):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
