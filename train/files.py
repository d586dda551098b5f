"""The run folder (``config.json``, ``checkpoint.pt``, ``metrics.json``, ``curves.png``, and the lock ``.lock``),
and files that are never half-written: :func:`write_atomically` is the one way this program writes a file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
import time

from .errors import RunError

TEMP_SUFFIX, LOCK = ".tmp", ".lock"
FILES = ("config.json", "checkpoint.pt", "metrics.json", "curves.png")  # what a run writes in its folder


class FileError(RunError):
    """A file or folder cannot be written as needed; the message is meant for the user."""


def write_atomically(path: str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` in one step (a temporary file, flushed, renamed): never half a file."""
    data = data.encode() if isinstance(data, str) else data
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f"{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:  # x: a new file, never another's
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)  # make the rename durable: a power cut must not bring the old file back
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        kept = f"the previous {name} is intact" if os.path.exists(path) else f"no {name} was written"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FileError(f"disk full while writing {path}; {kept}") from None
        raise FileError(f"cannot write {path}: {e.strerror or e}; {kept}") from None


def write_json(path: str, obj) -> None:
    """``obj`` as strict JSON: non-finite floats (which most readers reject) become ``null``."""

    def finite(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: finite(v) for k, v in obj.items()}
        return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj

    write_atomically(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def lock(folder: str) -> int:
    """An exclusive ``flock`` on ``folder/.lock`` (holding our pid) until the returned descriptor closes or we die."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise FileError(f"cannot lock {folder}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            by = f" (process {owner})" if owner.isdigit() else ""
            busy = f"{folder} is in use by another run{by}"
            raise FileError(f"{busy}; wait for it to end or choose another --out") from None
        raise FileError(f"cannot lock {folder}: {e.strerror or e}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class RunFolder:
    """An open, locked run folder; :meth:`close` releases it. Rank 0 alone holds the lock."""

    def __init__(self, path: str, lock_fd: int | None):
        self.path, self._lock_fd = path, lock_fd  # None: another process's view of rank 0's folder

    @classmethod
    def open(cls, out: str | None, resuming: str | None = None) -> RunFolder:
        """Create or reuse ``out`` (None: ``runs/<timestamp>``), lock it; refuse a run's files but ``resuming``'s."""
        path = _create(out)
        fd = lock(path)
        try:
            stale = re.compile(rf"(?:{'|'.join(map(re.escape, FILES))})\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
            for entry in os.scandir(path):  # the temporary files a killed write left (we hold the lock)
                if entry.is_file(follow_symlinks=False) and stale.fullmatch(entry.name):
                    os.remove(entry.path)
            existing = os.path.join(path, "checkpoint.pt")
            own = False
            with contextlib.suppress(OSError):  # the folder of the run being resumed?
                own = bool(resuming) and os.path.samefile(existing, resuming)
            if os.path.exists(existing) and not own:
                what = "another run, which resuming would overwrite" if resuming else "a run"
                advice = "" if resuming else f"continue it with --resume {path}, or "
                raise FileError(f"{path} already holds {what}; {advice}choose another --out")
            taken = [name for name in FILES if os.path.lexists(os.path.join(path, name))]
            if taken and not own:  # a user's own files, or a run whose checkpoint was deleted
                them = "it" if len(taken) == 1 else "them"
                overwritten = f"{', '.join(taken)}, which this run would overwrite"
                raise FileError(f"{path} already holds {overwritten}; move {them} away or choose another --out")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _create(out: str | None) -> str:
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise FileError(f"--out {out} is a file, not a folder")
    base = os.path.join("runs", time.strftime("%Y-%m-%d_%H-%M-%S"))
    for path in [out] if out is not None else [base, *(f"{base}-{n}" for n in range(1, 1000))]:
        try:  # a new folder: mkdir fails rather than share one with a run started alike
            os.makedirs(path, exist_ok=out is not None)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise FileError(f"cannot create the run folder {path}: {e.strerror or e}") from None
    else:
        raise FileError(f"cannot find a free run folder name {base}-N; choose one with --out")
    if not os.access(path, os.W_OK | os.X_OK):
        why = "permission denied"
        with contextlib.suppress(OSError):  # a file system mounted read-only allows no write, whatever the permissions
            why = "it is on a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else why
        raise FileError(f"cannot write to the run folder {path}: {why}")
    return path
