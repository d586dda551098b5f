"""``checkpoint.pt``: a header line, ``manualgrad-train checkpoint format 2 bytes <n> sha256 <hex>\\n``, then the
``n`` bytes of a ``torch.save`` archive of a dict (:data:`KEYS`). :func:`load` checks the bytes before unpickling, then
every entry (the configuration as the command line would), so that a forged checkpoint is a one-line error too."""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import os
import re

import torch

from .config import RUN_OPTIONS, Config, check, check_values
from .engine import Trainer, steps_per_epoch
from .errors import ConfigError, RunError, first_line, short
from .files import write_atomically

FORMAT = 2
FILENAME = "checkpoint.pt"
MAGIC = b"manualgrad-train checkpoint"
_HEADER = re.compile(rb"manualgrad-train checkpoint format (\d+) bytes (\d+) sha256 ([0-9a-f]{64})\n")
_ZIP = b"PK\x03\x04"  # how a torch.save archive begins
# Every key a checkpoint holds, and its type (--dp: also privacy; --compare-native: native_history). position: where
# an interrupted epoch stopped (its batch order, next step, loss so far); rng: the data generator's state and every
# process's torch RNG (dropout).
KEYS = dict(config=dict, data=dict, epoch=int, position=(dict, type(None)), history=list, rng=dict, world_size=int)
KEYS.update(model=dict, optimizer=dict, scheduler=(dict, type(None)))
POSITION_KEYS = ("step", "order", "loss_sum", "rows", "seconds")
# An optimizer's hyperparameters that a learning-rate schedule moves, and the bound of their range.
_SCHEDULED = {"lr": math.inf, "betas": 1.0, "momentum": 1.0}
# What a learning-rate scheduler's state_dict holds of its progress: the rest is fixed by the configuration.
_SCHEDULE_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step"})


class CheckpointError(RunError):
    """A checkpoint that cannot be used; the message is meant for the user."""


def checkpoint_path(path: str) -> str:
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def save(state: dict, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    write_atomically(path, MAGIC + f" format {FORMAT} bytes {len(payload)} sha256 {digest}\n".encode() + payload)


def load(path: str) -> dict:
    """The checkpoint at ``path`` (a file or its run folder), on the CPU, checked, else a :class:`CheckpointError`."""
    path = checkpoint_path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    state = _unpack(raw, lambda problem: CheckpointError(f"cannot resume from {path}: {problem}"))
    _check(state, lambda problem: CheckpointError(f"cannot resume from {path}: the checkpoint {problem}"))
    return state


def _unpack(raw: bytes, bad) -> dict:
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
    if len(payload) != size:
        too_long = f"checkpoint is corrupt ({len(payload) - size:,} bytes more than its header says)"
        raise bad(f"truncated ({len(payload):,} of {size:,} bytes)" if len(payload) < size else too_long)
    if hashlib.sha256(payload).hexdigest() != digest:
        raise bad("checkpoint is corrupt (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)  # tensors and plain data
    except Exception as e:  # the checksum matched, so this is not damage in transit: report torch's reason
        raise bad(f"cannot unpickle it ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise bad("not a checkpoint of this training program")
    return state


def _foreign_archive(raw: bytes) -> str:
    try:
        old = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:
        return "a torch.save archive that cannot be read (truncated or corrupt?), not a checkpoint of this program"
    if isinstance(old, dict) and old.get("format") == 1:
        return "written by an older version of this program (checkpoint format 1, without a checksum)"
    return "a torch.save file, not a checkpoint of this training program"


def _check(state: dict, bad) -> None:
    if missing := [k for k in KEYS if k not in state]:
        raise bad(f"lacks {', '.join(missing)}")
    for key, kind in KEYS.items():
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise bad(f"has a {type(state[key]).__name__} for {key}")
    try:
        saved = Config.from_dict(state["config"])
        check_values(saved, skip=RUN_OPTIONS)  # those come from the resuming command line (e.g. --threads)
        check(saved)
    except (TypeError, ValueError, ConfigError) as e:
        raise bad(f"has an invalid configuration ({first_line(e)})") from None
    if not 0 <= state["epoch"] <= saved.epochs:
        raise bad(f"says {state['epoch']} epochs are done, of {saved.epochs}")
    if not 1 <= state["world_size"] <= 2**16:
        raise bad(f"says it was written by {state['world_size']} processes")
    facts = state["data"]
    if not isinstance(facts.get("fingerprint"), str):
        raise bad("lacks the fingerprint of its data")
    if not all(type(facts.get(k)) is int and 1 <= facts[k] < 2**31 for k in ("train", "test")):  # not a bool
        raise bad("has no valid sizes of its training and test sets")
    rng, per_rank = state["rng"], state["rng"].get("torch")
    if not isinstance(per_rank, list) or not per_rank or not all(isinstance(r, dict) for r in per_rank):
        raise bad("has incomplete RNG states")
    cuda = [r.get("cuda", torch.zeros(1, dtype=torch.uint8)) for r in per_rank]  # its generator checks it when set
    if not all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1 for c in cuda):
        raise bad("has an invalid RNG state")
    streams = [rng.get("data"), *(r.get("cpu") for r in per_rank)]
    for stream in streams + ([rng["noise"]] if saved.dp and "noise" in rng else []):
        try:  # a state a generator takes
            torch.Generator().set_state(stream)
        except (TypeError, RuntimeError, ValueError):
            raise bad("has an invalid RNG state") from None
    _check_history(state["history"], state["epoch"], "history", bad)
    if "native_history" in state:  # --compare-native's torch.nn twin (may stop short: a resumed run stops it)
        _check_history(state["native_history"], state["epoch"], "native_history", bad, complete=False)
    if state["position"] is not None:
        _check_position(state["position"], state, saved, bad)
    if saved.dp:
        private = state.get("privacy")
        if not isinstance(private, dict) or type(private.get("steps")) is not int or "noise" not in state["rng"]:
            raise bad("of a --dp run lacks its privacy state (steps taken, noise stream)")
        sigma = private.get("noise_multiplier")
        if private["steps"] < 0 or type(sigma) not in (int, float) or not 0 < sigma < math.inf:
            raise bad("of a --dp run has an invalid privacy state (steps taken, noise multiplier)")


def _check_history(history: list, epochs: int, key: str, bad, complete: bool = True) -> None:
    """One record per finished epoch (all of them, unless not ``complete``): epoch numbers 1, 2, ..., numbers."""
    if len(history) > epochs or (complete and len(history) != epochs):
        raise bad(f"has {len(history)} records in {key} for {epochs} finished epochs")
    needed, optional = ("train_loss", "seconds"), ("test_loss", "test_accuracy", "epsilon", "steps", "threads")
    for number, record in enumerate(history, 1):
        if not isinstance(record, dict) or type(record.get("epoch")) is not int or record["epoch"] != number:
            raise bad(f"has an invalid record in {key} (epoch {number})")
        if not set(record) <= {"epoch", *needed, *optional}:
            raise bad(f"has an invalid record in {key} (epoch {number}: unknown entries)")
        present = [k for k in optional if record.get(k) is not None]
        if not all(type(record.get(k)) in (int, float) for k in (*needed, *present)):
            raise bad(f"has an invalid record in {key} (epoch {number})")


def _check_position(position: dict, state: dict, saved: Config, bad) -> None:
    """A step inside an unfinished epoch, its batch order (--dp: empty), the loss, rows and seconds so far."""
    if set(position) != set(POSITION_KEYS):
        raise bad(f"has an incomplete position (needs {', '.join(POSITION_KEYS)}, nothing else)")
    n = state["data"]["train"]
    steps = steps_per_epoch(n, saved.batch_size, saved.dp)
    step, order = position["step"], position["order"]
    if state["epoch"] >= saved.epochs or type(step) is not int or not 1 <= step < steps:
        where = f"step {describe(step)} of epoch {state['epoch'] + 1}, which has {steps} steps"
        raise bad(f"has an invalid position ({where})")
    expected = torch.zeros(0, dtype=torch.long) if saved.dp else torch.arange(n)
    well_formed = isinstance(order, torch.Tensor) and order.dtype == torch.long and order.shape == expected.shape
    if not well_formed or not torch.equal(order.sort().values, expected):
        raise bad("has an invalid position (its batch order is not an order of the training rows)")
    numbers = [position[k] for k in ("loss_sum", "rows", "seconds")]
    if not all(type(v) in (int, float) and 0 <= v < math.inf for v in numbers) or type(position["rows"]) is not int:
        raise bad("has an invalid position (loss, rows or seconds so far)")


def describe(value) -> str:  # for a one-line message
    return short(value) if isinstance(value, (int, float, str, type(None))) else f"a {type(value).__name__}"


def mismatch(expected, actual, where: str) -> str | None:
    """Where ``actual`` differs in structure (keys, lengths, types, shapes, dtypes, finiteness) from ``expected``."""
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
    if type(expected) in (int, float):  # a number, not a bool (torch.load gives plain ints and floats)
        number = type(actual) in (int, float) and math.isfinite(actual)
        return None if number else f"{where} is {describe(actual)}, not a number"
    return None if type(actual) is type(expected) else f"{where} is {describe(actual)}"  # bool, str, None, ...


def restore(trainer: Trainer, resumed: dict, path: str) -> bool:
    """Load the checkpoint into ``trainer`` if it fits; False when another number of processes wrote it."""
    options = [set(group) for group in trainer.optimizer.param_groups]
    reason = misfit(trainer, resumed)
    if reason is None:
        try:
            same_world = trainer.load_state_dict(resumed)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            reason = first_line(e)
        else:  # what an older torch's groups lacked, load_state_dict filled in: all of it?
            groups = zip(trainer.optimizer.param_groups, options)
            if lacking := sorted({k for group, keys in groups for k in keys - set(group)}):
                reason = f"optimizer param_groups lack {', '.join(lacking)}"
    if reason is not None:
        raise CheckpointError(f"cannot resume from {path}: its state does not fit ({reason})") from None
    return same_world


def misfit(trainer: Trainer, resumed: dict) -> str | None:
    """How the checkpoint's state differs from this run's (load_state_dict takes some misfits without a word)."""
    fresh, saved = trainer.optimizer.state_dict(), resumed["optimizer"]
    if set(saved) != {"state", "param_groups"} or not isinstance(saved["state"], dict):
        return "optimizer has other entries"
    if found := mismatch(trainer.net.module.state_dict(), resumed["model"], "model"):
        return found
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        return "optimizer param_groups are not this run's"
    for number, (ours, theirs) in enumerate(zip(fresh["param_groups"], groups)):
        # an older torch's groups may lack options added since (load_state_dict fills them in), never add any
        if not isinstance(theirs, dict) or not set(theirs) <= set(ours):
            return f"optimizer param_groups[{number}] has other entries"
        if found := mismatch({k: ours[k] for k in theirs}, theirs, f"optimizer param_groups[{number}]"):
            return found
        for key, value in theirs.items():  # the schedule moves lr and momentum; the rest is the configuration's
            if key in _SCHEDULED:
                values = value if isinstance(value, (list, tuple)) else [value]
                if not all(0 <= v < _SCHEDULED[key] for v in values):
                    return f"optimizer param_groups[{number}][{key!r}] is {value!r}, out of range"
            elif value != ours[key]:
                return f"optimizer param_groups[{number}][{key!r}] is {value!r}, this run's is {ours[key]!r}"
    if found := mismatch(_state_after_one_step(trainer.optimizer), saved["state"], "optimizer state"):
        return found
    if trainer.scheduler is None:
        return None if resumed["scheduler"] is None else "scheduler is there, but this run has none"
    fresh, saved = trainer.scheduler.state_dict(), resumed["scheduler"]
    if found := mismatch(fresh, saved, "scheduler"):
        return found
    # the schedule is the configuration's; only how far along it is (the steps taken) comes from the checkpoint
    if changed := [k for k in fresh if k not in _SCHEDULE_PROGRESS and saved[k] != fresh[k]]:
        return f"scheduler {', '.join(changed)} differ from this run's schedule"
    position = resumed["position"]
    steps = resumed["epoch"] * trainer.steps_per_epoch + (position["step"] if position else 0)
    if saved["last_epoch"] != steps or saved["_step_count"] != steps + 1:
        return f"scheduler is at step {saved['last_epoch']!r}, the checkpoint at step {steps}"
    return None


def _state_after_one_step(optimizer: torch.optim.Optimizer) -> dict:
    """The state one step of ``optimizer``'s kind and options leaves: on zeros of its parameters' shapes, on the CPU."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    probes = [torch.nn.Parameter(torch.zeros_like(p, device="cpu")) for p in params]
    for probe in probes:
        probe.grad = torch.zeros_like(probe)
    accepted = inspect.signature(type(optimizer)).parameters
    throwaway = type(optimizer)(probes, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    throwaway.step()
    return throwaway.state_dict()["state"]
