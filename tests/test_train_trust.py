"""Tests that the training program never gives a silently wrong result, a traceback, or loses a run:
locked run folders, finite checkpoints and valid JSON, one-line messages for what goes wrong, checked
checkpoints, resuming only on the same data, and temporary files of killed writes cleaned up."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import load_params, make_mnist, run, run_main, tiny_argv, tiny_config

from train import checkpoint, files
from train.checkpoint import CheckpointError
from train.engine import TrainingError
from train.errors import RunError
from train.files import LOCK, FileError


def strict_json(path: Path):
    """Parse JSON as strict readers do: NaN and Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---- one run per folder


def test_new_run_refuses_a_folder_holding_a_run(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run")
    run(cfg)
    with pytest.raises(FileError, match="already holds a run"):
        run(cfg)


def test_resume_into_another_runs_folder_is_refused(tiny, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_config(tiny, a, epochs=2), on_step=lambda e, s, t: e == 1 and s == 2 and os.kill(os.getpid(), 2))
    run(tiny_config(tiny, b, epochs=2, seed=1))
    before = (b / "checkpoint.pt").read_bytes()
    status, _, err = run_main(["--resume", str(a), "--out", str(b), "--no-progress"], capsys)
    assert status == 1 and f"{b} already holds another run" in err and "Traceback" not in err
    assert (b / "checkpoint.pt").read_bytes() == before, "the other run's checkpoint was overwritten"
    # into a fresh folder it works, and the original stays as it was
    status, _, err = run_main(["--resume", str(a), "--out", str(tmp_path / "c"), "--no-progress"], capsys)
    assert status == 0, err
    assert checkpoint.load(str(tmp_path / "c"))["epoch"] == 2 and checkpoint.load(str(a))["epoch"] == 0


def test_a_second_run_on_the_same_folder_fails_while_the_first_runs(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", epochs=2)
    second = []

    def start_another(epoch, step, trainer):
        if (epoch, step) == (1, 1):
            try:
                run(dataclasses.replace(cfg, resume=None))
            except RunError as e:
                second.append(str(e))

    metrics = run(cfg, on_step=start_another)
    assert metrics["completed"]
    assert len(second) == 1 and "is in use by another run" in second[0] and str(os.getpid()) in second[0]


def test_a_killed_runs_lock_does_not_block(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / "checkpoint.pt.0a1b2c3d.tmp").write_bytes(b"half")
        with pytest.raises(FileError, match="in use by another run"):
            run(tiny_config(tiny, out))
        assert (out / "checkpoint.pt.0a1b2c3d.tmp").exists(), "removed another run's temporary file"
    finally:
        holder.kill()  # SIGKILL: no chance to unlock
        holder.wait()
    assert run(tiny_config(tiny, out))["completed"]


def test_stale_temporary_files_are_removed_and_others_kept(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = ["checkpoint.pt.0a1b2c3d.tmp", "metrics.json.k_9zq2ab.tmp", "curves.png.12345678.tmp"]
    kept = ["notes.tmp", "checkpoint.pt.tmp", "other.txt.0a1b2c3d.tmp", "checkpoint.pt.0a1b2c3d.tmp.bak"]
    for name in stale + kept:
        (out / name).write_bytes(b"x")
    run(tiny_config(tiny, out))
    left = {p.name for p in out.iterdir()}
    assert not left & set(stale)
    assert set(kept) <= left


# ---- no non-finite state saved, no NaN in JSON


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
    assert len(strict_json(Path(cfg.out) / "metrics.json")["epochs"]) == 1


@pytest.mark.parametrize("where", ["epoch-1", "epoch-2"])
def test_divergence_on_an_epochs_last_step_is_not_saved(tiny, tmp_path, where, capsys):
    epoch = 1 if where == "epoch-1" else 2

    def poison(e, step, trainer):  # 64 rows in batches of 16: step 4 is the epoch's last
        if (e, step) == (epoch, 4):
            with torch.no_grad():
                next(iter(trainer.params))[0, 0] = float("inf")

    cfg = tiny_config(tiny, tmp_path / "run", epochs=2)
    with pytest.raises(TrainingError, match=rf"non-finite \(0.weight\) in epoch {epoch}; not saved"):
        run(cfg, on_step=poison)
    path = Path(cfg.out) / "checkpoint.pt"
    if epoch == 1:
        assert not path.exists()
    else:
        state = checkpoint.load(cfg.out)
        assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
        metrics = strict_json(Path(cfg.out) / "metrics.json")
        assert [r["epoch"] for r in metrics["epochs"]] == [1] and not metrics["completed"]


def test_json_has_null_where_a_value_is_not_finite(tmp_path):
    target = tmp_path / "m.json"
    files.write_json(str(target), {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (2.0, "x")})
    assert strict_json(target) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2.0, "x"]}


# ---- one-line messages instead of tracebacks


def test_out_is_a_file(tiny, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "afile"), capsys)
    assert status == 1 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "afile" / "run"), capsys)
    assert status == 1 and "cannot create the run folder" in err and "Traceback" not in err


def test_out_cannot_be_created(tiny, tmp_path, capsys, monkeypatch):
    def refuse(path, *args, **kwargs):  # as for a folder whose parent the user may not write to
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", refuse)
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "run"), capsys)
    assert status == 1 and err.strip() == f"error: cannot create the run folder {tmp_path / 'run'}: Permission denied"


def test_disk_full_keeps_the_previous_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    real_fsync, syncs = os.fsync, []

    def fsync(fd):  # where a full disk shows (or on the write before it)
        if ".tmp" in os.readlink(f"/proc/self/fd/{fd}") and "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            syncs.append(fd)
            if len(syncs) > 1:  # the second checkpoint: the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    status, _, err = run_main(tiny_argv(tiny, out, "--epochs", "2"), capsys)
    monkeypatch.undo()
    assert status == 1 and "Traceback" not in err
    assert (
        err.strip() == f"error: disk full while writing {out / 'checkpoint.pt'}; the previous checkpoint.pt is intact"
    )
    assert checkpoint.load(str(out))["epoch"] == 1
    assert not list(out.glob("*.tmp"))


def test_largest_seed_trains(tiny, tmp_path):
    assert run(tiny_config(tiny, tmp_path / "run", seed=2**64 - 1, dropout=0.1))["completed"]


def test_a_model_too_large_for_memory_is_a_one_line_error(tiny, tmp_path, capsys):
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "run", "--hidden", "2000000000"), capsys)
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not enough memory" in err and "GB" in err and "--hidden" in err


# ---- checkpoints: checked on load, with messages that say what is wrong


def test_checkpoint_with_flipped_bytes_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(tiny, out))
    path = out / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint is corrupt \(checksum mismatch\)"):
        checkpoint.load(str(out))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty file"),
        (b"hello, world\n" * 10, "not a checkpoint"),
        ("truncated", "truncated"),
        ("old-format", "older version of this program (checkpoint format 1"),
        ("foreign", "a torch.save file, not a checkpoint"),
        ("header-only", "truncated"),
    ],
)
def test_unreadable_checkpoints_say_what_is_wrong(tiny, tmp_path, capsys, content, problem):
    out = tmp_path / "run"
    run(tiny_config(tiny, out))
    good = (out / "checkpoint.pt").read_bytes()
    victim = tmp_path / "victim.pt"
    if content == "truncated":
        victim.write_bytes(good[: len(good) // 2])
    elif content == "header-only":
        victim.write_bytes(good[:30])
    elif content == "old-format":
        torch.save({"format": 1, "model": {}}, victim)
    elif content == "foreign":
        torch.save({"weight": torch.zeros(3)}, victim)
    else:
        victim.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        checkpoint.load(str(victim))
    status, _, err = run_main(["--resume", str(victim), "--out", str(tmp_path / "new")], capsys)
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and problem in err


def test_checkpoint_missing_keys_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_config(tiny, out))
    state = checkpoint.load(str(out))
    del state["optimizer"], state["history"]
    checkpoint.save(state, str(tmp_path / "partial.pt"))
    status, _, err = run_main(["--resume", str(tmp_path / "partial.pt"), "--out", str(tmp_path / "new")], capsys)
    assert status == 1 and "Traceback" not in err
    assert "the checkpoint lacks history, optimizer" in err


def test_checkpoint_that_does_not_fit_the_model_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(tiny, out, epochs=2), on_step=lambda e, s, t: (e, s) == (1, 4) and os.kill(os.getpid(), 2))
    state = checkpoint.load(str(out))
    state["model"]["0.weight"] = torch.zeros(3, 3)
    checkpoint.save(state, str(tmp_path / "bad.pt"))
    cfg = tiny_config(tiny, tmp_path / "new", epochs=2, resume=str(tmp_path / "bad.pt"))
    with pytest.raises(CheckpointError, match="its state does not fit"):
        run(cfg)


# ---- resuming on other data


@pytest.mark.parametrize("where", [(1, 2), (1, 4)], ids=["mid-epoch", "epoch-end"])
def test_resume_on_other_data_is_refused(tiny, tmp_path, where):
    cfg = tiny_config(tiny, tmp_path / "run", epochs=2)
    run(cfg, on_step=lambda e, s, t: (e, s) == where and os.kill(os.getpid(), 2))
    other = make_mnist(tmp_path / "other", seed=7)
    with pytest.raises(CheckpointError, match="trained on other data"):
        run(dataclasses.replace(cfg, resume=cfg.out, data_dir=str(other)))
    assert checkpoint.load(cfg.out)["epoch"] == where[0] - (where[1] < 4)


def test_resume_on_the_same_data_elsewhere_is_fine(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", epochs=2)
    whole = run(dataclasses.replace(cfg, out=str(tmp_path / "whole")))
    run(cfg, on_step=lambda e, s, t: (e, s) == (1, 2) and os.kill(os.getpid(), 2))
    copy = make_mnist(tmp_path / "copy", gz=True)  # the same images, compressed, in another folder
    resumed = run(dataclasses.replace(cfg, resume=cfg.out, data_dir=str(copy)))
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    a, b = load_params(Path(cfg.out)), load_params(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- a fresh run never overwrites a file it would write


def _files_a_fresh_run_writes(tiny, tmp_path) -> list[str]:
    out = tmp_path / "probe"
    run(tiny_config(tiny, out))
    return sorted(p.name for p in out.iterdir() if p.name != LOCK)  # .lock: reused, never data


def test_a_fresh_run_refuses_a_folder_holding_any_file_it_writes(tiny, tmp_path, capsys):
    """Each file a fresh run writes (found by running one), put alone in a folder (a user's own file, or a run
    whose checkpoint was deleted): the run refuses with a one-line error and the file is left as it was."""
    written = _files_a_fresh_run_writes(tiny, tmp_path)
    assert {"config.json", "checkpoint.pt", "metrics.json", "curves.png"} <= set(written)
    for name in written:
        out = tmp_path / f"holds-{name}"
        out.mkdir()
        (out / name).write_text('{"mine": 1}\n')
        status, _, err = run_main(tiny_argv(tiny, out), capsys)
        assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert f"{out} already holds" in err and name in err, err
        assert (out / name).read_text() == '{"mine": 1}\n', f"{name} was overwritten"
        assert {p.name for p in out.iterdir()} <= {name, LOCK}


def test_resuming_into_another_folder_refuses_its_files_too(tiny, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_config(tiny, a, epochs=2), on_step=lambda e, s, t: (e, s) == (1, 2) and os.kill(os.getpid(), 2))
    b.mkdir()
    (b / "metrics.json").write_text("mine")
    status, _, err = run_main(["--resume", str(a), "--out", str(b), "--no-progress"], capsys)
    assert status == 1 and "already holds metrics.json" in err and (b / "metrics.json").read_text() == "mine"


def test_resuming_in_its_own_folder_still_works(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", epochs=2)
    run(cfg, on_step=lambda e, s, t: (e, s) == (1, 2) and os.kill(os.getpid(), 2))
    assert run(dataclasses.replace(cfg, resume=cfg.out, out=None))["completed"]


# ---- --compare-native: the torch.nn twin's history survives a resume


def test_resuming_a_finished_compare_native_run_keeps_its_native_block(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path / "run", epochs=2, compare_native=True)
    first = run(cfg)
    before = strict_json(Path(cfg.out) / "metrics.json")["native"]
    assert len(before["epochs"]) == 2
    status, _, err = run_main(["--resume", cfg.out, "--no-progress"], capsys)
    assert status == 0, err
    after = strict_json(Path(cfg.out) / "metrics.json")["native"]
    assert after["epochs"] == before["epochs"] and after["test_accuracy"] == first["native"]["test_accuracy"]
    assert after["time_ratio"]["per_epoch"] == before["time_ratio"]["per_epoch"]


def test_resuming_an_interrupted_compare_native_run_keeps_the_native_epochs_recorded(tiny, tmp_path, capsys):
    """Interrupted in epoch 2 of 3: the torch.nn epoch 1 already recorded stays in metrics.json, and the
    comparison at the end covers the epochs both trained."""
    cfg = tiny_config(tiny, tmp_path / "run", epochs=3, compare_native=True)
    run(cfg, on_step=lambda e, s, t: (e, s) == (2, 2) and os.kill(os.getpid(), 2))
    recorded = strict_json(Path(cfg.out) / "metrics.json")["native"]["epochs"]
    assert [r["epoch"] for r in recorded] == [1]
    status, out, err = run_main(["--resume", cfg.out, "--no-progress"], capsys)
    assert status == 0, err
    assert "--compare-native record (torch.nn epochs 1-1) is kept" in out
    metrics = strict_json(Path(cfg.out) / "metrics.json")
    assert metrics["completed"] and len(metrics["epochs"]) == 3
    assert metrics["native"]["epochs"] == recorded
    assert len(metrics["native"]["time_ratio"]["per_epoch"]) == 1
    assert checkpoint.load(cfg.out)["native_history"] == recorded
