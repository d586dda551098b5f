"""Files that are never half-written, and folders that one process at a time may write.

:func:`write_atomically` is the one way this program writes a file: the bytes go
to a temporary file in the same folder (``<name>.<8 hex>.tmp``), are flushed
to disk, and the temporary file is renamed over ``path``. A crash, a Ctrl-C
or a full disk mid-write leaves the previous version intact, never half a
file; a process killed mid-write (SIGKILL) can leave only a temporary file,
which :func:`remove_temporaries` recognises by that pattern.

:class:`FolderLock` keeps two processes from writing one folder: an exclusive
``flock`` on a lock file, which the kernel releases when the process ends,
however it ends, so a killed run never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import secrets

from .errors import RunError

TEMP_SUFFIX = ".tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class FileError(RunError):
    """A file or folder cannot be written as needed; the message is meant for the user."""


def write_atomically(path: str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) in one step: readers see the old
    file or the new one, never a mixture. Errors become a one-line :class:`FileError`."""
    if isinstance(data, str):
        data = data.encode()
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f"{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode a plain open() gives
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _sync_folder(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (a power cut after it must not bring the old file back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: str, e: OSError) -> FileError:
    name = os.path.basename(path)
    kept = f"the previous {name} is intact" if os.path.exists(path) else f"no {name} was written"
    if e.errno in _DISK_FULL:
        return FileError(f"disk full while writing {path}; {kept}")
    return FileError(f"cannot write {path}: {e.strerror or e}; {kept}")


def json_text(obj) -> str:
    """``obj`` as JSON text. Non-finite floats (NaN, ±inf) become ``null``: most JSON readers reject
    ``NaN``, and ``allow_nan=False`` makes any that slipped through an error instead of bad JSON."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_only(path: str) -> bool:
    """Whether ``path`` is on a file system mounted read-only (no write is possible, whatever the permissions)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_json(path: str, obj) -> None:
    write_atomically(path, json_text(obj))


def remove_temporaries(folder: str, names) -> list[str]:
    """Delete what :func:`write_atomically` leaves behind when its process is killed mid-write:
    ``<name>.<8 characters>.tmp`` for each of ``names``, in ``folder`` only. Call it only while holding
    the folder's lock (another process's temporary file may be in use). Returns the paths removed."""
    pattern = re.compile(rf"(?:{'|'.join(re.escape(n) for n in names)})\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and pattern.fullmatch(entry.name):
            os.remove(entry.path)
            removed.append(entry.path)
    return removed


class FolderLock:
    """An exclusive lock on ``folder`` for as long as this object is open (``with`` or :meth:`close`).

    The lock file (``.lock``, holding the owner's process id) stays in the folder; the lock itself is
    the kernel's ``flock``, gone when the owner closes it or dies.
    """

    NAME = ".lock"

    def __init__(self, folder: str):
        self.path = os.path.join(folder, self.NAME)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise FileError(f"cannot lock {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                by = f" (process {owner})" if owner.isdigit() else ""
                raise FileError(
                    f"{folder} is in use by another run{by}; wait for it to end or choose another --out"
                ) from None
            raise FileError(f"cannot lock {folder}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
