"""The run folder: its file names, the lock that keeps one run per folder, and ``metrics.jsonl``.

One run lives in one folder::

    .lock           held (flock) by the run that owns the folder
    metrics.jsonl   one JSON object per finished epoch
    last.pt         the full training state, rewritten atomically at the start, after every epoch
                    and on Ctrl-C / SIGTERM (mid-epoch)
    best.pt         the weights with the best val top-1 so far (model only)
    loss.png, accuracy.png   the curves, written at the end and by ``mobilenets plot``
    int8.safetensors         int8-ready weights of the final model, written at the end with ``qat``
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from pathlib import Path

from .. import checkpoint
from ..errors import MobilenetsError

LAST, BEST, METRICS, LOCK = "last.pt", "best.pt", "metrics.jsonl", ".lock"


class RunFolderError(MobilenetsError):
    """The run folder cannot be used: busy, unwritable, or holding another run."""


class RunLock:
    """An exclusive ``flock`` on ``out/.lock`` for the life of a run; a second run on the folder fails at once.

    The kernel drops the lock when the process dies, so a killed run never
    leaves the folder locked.  The file itself stays: deleting it would let
    two runs lock two different files of the same name.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.file = None

    def __enter__(self):
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out / LOCK, "a")
        except OSError as e:
            raise RunFolderError(f"cannot write to the run folder out={str(self.out)!r}: "
                                 f"{e.strerror or e}; choose a folder you can write to") from None
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"{self.out} is in use by another training run (it holds {self.out / LOCK}); "
                                     f"wait for it to finish, or choose another out folder") from None
            raise
        if not os.access(self.out, os.W_OK):
            self.__exit__()
            raise RunFolderError(f"cannot write to the run folder out={str(self.out)!r}: permission denied; "
                                 f"choose a folder you can write to")
        return self

    def claim(self, job: str) -> None:
        """Name the torchrun job (its rendezvous id) that holds the folder, for :func:`held_by`."""
        self.file.truncate(0)
        self.file.write(job)
        self.file.flush()

    @staticmethod
    def held_by(out: str | Path) -> str | None:
        """The torchrun job that last held ``out`` (:meth:`claim`), if any."""
        try:
            return (Path(out) / LOCK).read_text() or None
        except OSError:
            return None

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the flock
            self.file = None


def finite_or_none(obj):
    """``obj`` with every NaN or infinity replaced by None, so JSON output stays valid JSON (null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_line(obj) -> str:
    return json.dumps(finite_or_none(obj), allow_nan=False)


def write_metrics(out: str | Path, history: list[dict]) -> None:
    text = "".join(json_line(row) + "\n" for row in history)
    checkpoint.atomic_write(Path(out) / METRICS, lambda f: f.write(text.encode()))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a training run folder (train's out)?")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFolderError(f"{path} is not a metrics file written by train ({e})") from None
