"""The run folder: ``config.json``, ``checkpoint.pt``, ``metrics.json`` and ``curves.png``.

Opening it (rank 0 only) creates the folder, locks it for the whole run (a
second run on the same folder stops with a one-line message; the lock dies
with its process, so a killed run never blocks the next), removes the
temporary files of writes that a killed run left behind, and refuses a
folder that holds any file a run writes (``config.json``, ``checkpoint.pt``,
``metrics.json``, ``curves.png``: another run's, or a user's own), unless it
is the folder of the checkpoint being resumed. Besides those, the folder
holds the lock file ``.lock``. Every file goes through :func:`train.files.write_atomically`.
"""

from __future__ import annotations

import os
import time

from . import checkpoint
from .files import FileError, FolderLock, read_only, remove_temporaries, write_atomically, write_json

CONFIG, METRICS, CURVES = "config.json", "metrics.json", "curves.png"
FILES = (CONFIG, checkpoint.FILENAME, METRICS, CURVES)


class RunFolder:
    """An open, locked run folder; :meth:`close` (or ``with``) releases it."""

    def __init__(self, path: str, lock: FolderLock | None):
        self.path, self._lock = path, lock  # lock None: another process's view of rank 0's folder

    @classmethod
    def open(cls, out: str | None, resuming: str | None = None) -> RunFolder:
        """Create (or reuse) ``out``, or a fresh ``runs/<timestamp>`` when None, and lock it. ``resuming``
        is the checkpoint the run continues from: the one checkpoint the folder may already hold."""
        path = _create(out)
        lock = FolderLock(path)
        try:
            remove_temporaries(path, FILES)
            existing = os.path.join(path, checkpoint.FILENAME)
            own = resuming and _same_file(existing, resuming)  # the folder of the run being resumed
            if os.path.exists(existing) and not own:
                if resuming:
                    raise FileError(
                        f"{path} already holds another run, which resuming would overwrite; choose another --out"
                    )
                raise FileError(
                    f"{path} already holds a run; continue it with --resume {path}, or choose another --out"
                )
            taken = [name for name in FILES if os.path.lexists(os.path.join(path, name))]
            if taken and not own:  # a user's own files, or a run whose checkpoint was deleted
                them = "it" if len(taken) == 1 else "them"
                raise FileError(
                    f"{path} already holds {', '.join(taken)}, which this run would overwrite; move {them} away "
                    "or choose another --out"
                )
        except BaseException:
            lock.close()
            raise
        return cls(path, lock)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_config(self, config: dict) -> None:
        write_json(self.file(CONFIG), config)

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.file(METRICS), metrics)

    def save_checkpoint(self, state: dict) -> None:
        checkpoint.save(state, self.file(checkpoint.FILENAME))

    def draw_curves(self, metrics: dict) -> None:
        from . import plot  # here, not at import: `python -m train.plot` must find train.plot not yet imported

        write_atomically(self.file(CURVES), plot.curves_png(metrics))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _create(out: str | None) -> str:
    if out is None:  # a new folder of its own: mkdir fails rather than share one with a run started alike
        base = os.path.join("runs", time.strftime("%Y-%m-%d_%H-%M-%S"))
        for suffix in range(1000):
            path = base if suffix == 0 else f"{base}-{suffix}"
            try:
                os.makedirs(path)
                return path
            except FileExistsError:
                continue
            except OSError as e:
                raise FileError(f"cannot create the run folder {path}: {e.strerror or e}") from None
        raise FileError(f"cannot find a free run folder name {base}-N; choose one with --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileError(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise FileError(f"cannot create the run folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        why = "it is on a read-only file system" if read_only(out) else "permission denied"
        raise FileError(f"cannot write to the run folder {out}: {why}")
    return out


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
