"""Every file mobilenets writes is written whole or not at all.

Two doors, one mechanism: :func:`atomic_write` for bytes we produce, and
:func:`replacing` for a runtime that insists on writing a path itself (ONNX,
OpenVINO, Core ML, matplotlib).  Both write under a temporary name in the
target's own folder (a rename across file systems would not be atomic), fsync,
then rename over the target.  A write that fails (disk full, a file-size limit,
a runtime's error, a killed process) leaves the previous file untouched and no
partial file behind, and the error names the file; the temporary files only a
killed process can leave are found by :func:`temporary_files`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import resource
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import MobilenetsError


class WriteError(MobilenetsError):
    """A file could not be written (no space, a file-size limit, no permission); the previous one is untouched."""


class _Sink(io.RawIOBase):
    """The temp file as ``write`` sees it, remembering the OSError a writer may swallow.

    ``torch.save`` turns a failed write into "enforce fail ... unexpected pos": keeping the OSError lets the
    message say what went wrong (no space left, file too large).
    """

    def __init__(self, f):
        super().__init__()
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:  # the file is atomic_write's to close
        pass


def _refusal(path: Path, error: BaseException, existed: bool) -> WriteError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    kept = "the previous file is untouched" if existed else "no partial file was left"
    return WriteError(f"cannot write {path}: {reason} ({kept}); free space, raise the file-size limit or "
                      f"write somewhere else, then run again")


def _cause(error: BaseException, sink: _Sink | None = None) -> OSError | None:
    """The OSError behind ``error``: itself, the one a sink saw, or one in its chain of causes."""
    if sink is not None and sink.error is not None:
        return sink.error
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _diagnose(error: BaseException, written: list[Path], folder: Path) -> OSError | None:
    """Why a runtime's own writer failed where it keeps the OSError to itself (OpenVINO says only "iostream
    error" and deletes its partial files): a file at the file-size limit, or a full disk."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limited = limit != resource.RLIM_INFINITY
    if limited and any(p.is_file() and p.stat().st_size >= limit for p in written):
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    # without a partial file to show it, only an error that speaks of writing is put down to the disk
    if not re.search(r"i/?o|stream|writ|space|disk", str(error), re.IGNORECASE):
        return None
    if limited:
        return OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)} (the file-size limit is {limit} bytes)")
    try:
        disk = os.statvfs(folder)
    except OSError:
        return None
    if disk.f_bavail * disk.f_frsize < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _new_file_mode(fd: int) -> None:
    # mkstemp creates the file 0600; give it the mode any new file gets here (0666 less the umask)
    os.fchmod(fd, 0o666 & ~_umask())


def _parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _refusal(path, e, path.exists()) from None


def atomic_write(path: str | Path, write: Callable, *, check: Callable | None = None) -> Path:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync it, then atomically rename it into place.

    ``check(temp_path)``, if given, inspects the finished file before the rename and raises to discard it.
    A failed write raises :class:`WriteError` naming ``path``; the old file stays as it was.
    """
    path = Path(path)
    _parent(path)
    existed = path.exists()
    sink = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _refusal(path, e, existed) from None
    try:
        _new_file_mode(fd)
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _cause(e, sink) if isinstance(e, Exception) else None
        if cause is not None and not isinstance(e, MobilenetsError):
            raise _refusal(path, cause, existed) from cause
        raise
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | Path, *, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary path beside ``path``, with its suffix, for a runtime to write; renamed over ``path`` on success.

    ``companions``: suffixes of files the runtime writes beside the one it is
    given (OpenVINO's ``.bin`` beside its ``.xml``); they are renamed first, so
    the main file never names missing data.  A folder (Core ML's ``.mlpackage``)
    replaces the old folder whole.  On any error everything the runtime wrote
    is removed and the old files are untouched; an OSError becomes a
    :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    _parent(path)
    existed = path.exists()
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    written = [tmp] + [tmp.with_suffix(s) for s in companions]
    try:
        yield tmp
        if not tmp.exists():
            raise WriteError(f"cannot write {path}: the runtime wrote nothing")
        for p in written:
            if p.is_file():
                _fsync(p)
        for p, target in list(zip(written[1:], [path.with_suffix(s) for s in companions])) + [(tmp, path)]:
            if p.is_dir():
                _swap_folder(p, target)
            else:
                os.replace(p, target)
    except BaseException as e:
        cause = (_cause(e) or _diagnose(e, written, path.parent)) if isinstance(e, Exception) else None
        for p in written:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        # a WriteError from an atomic_write inside names our temporary path: name the file the user asked for
        if cause is not None and (not isinstance(e, MobilenetsError) or isinstance(e, WriteError)):
            raise _refusal(path, cause, existed) from cause
        raise


def _swap_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``: a folder cannot be renamed over a full one, so the old one steps aside."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old.tmp")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def temporary_files(folder: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_write` and :func:`replacing` leave in ``folder`` when their process is killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(".*.tmp*") if p.is_file() and (p.name.endswith(".tmp") or ".tmp." in p.name))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what killed writers left in ``folder``; call only while no other process writes there."""
    removed = temporary_files(folder)
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
