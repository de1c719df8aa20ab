"""The released weights, fetched once into the cache, checked, converted once.

Downloads go through a temp file (never a half-written file), under an
overall deadline and a size cap, so a server that trickles bytes or sends
gigabytes cannot hang or fill the machine.  A file's sha256 is checked
against the registry's pinned digest when there is one, else recorded on
first use in ``sha256.json`` and checked on every later use; the record is
updated under a lock (read, modify, write a temp file, rename), so
processes that fetch weights at once do not lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import checkpoint
from ..cache import cache_dir
from . import file, keras, registry
from .layout import WeightsError

DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a download is abandoned
DEFAULT_TOTAL_TIMEOUT = 900.0  # seconds for a whole download (the largest file is 17 MB)
DEFAULT_MAX_BYTES = 128 * 1024 * 1024  # the largest released Keras MobileNet file is about 17 MB
RECORD = "sha256.json"


def base_url() -> str:
    """$MOBILENETS_WEIGHTS_URL (a mirror, or a local server in tests), else the Keras applications bucket."""
    url = os.environ.get("MOBILENETS_WEIGHTS_URL") or registry.KERAS_BASE_URL
    return url if url.endswith("/") else url + "/"


def pretrained(alpha: float = 1.0, resolution: int = 224, *, progress: bool = True) -> Path:
    """The converted .safetensors for the released Keras weights of alpha x resolution, fetched once.

    Downloads the registry's file from :func:`base_url` into
    ``mobilenets.cache.cache_dir()``, checks it is an HDF5 file holding a
    MobileNet of that alpha, checks its sha256 (see :func:`verify_sha256`),
    converts it once and caches the result beside it.
    """
    entry = registry.get(alpha, resolution)
    folder = cache_dir()
    h5 = folder / entry.keras_file
    out = h5.with_suffix(".safetensors")
    if out.is_file():
        try:
            file.read(out)
            return out
        except WeightsError:
            out.unlink()  # a damaged cached conversion: redo it from the download
    if not h5.is_file():
        download(base_url() + entry.keras_file, h5, progress=progress)
    verify_sha256(h5, pinned=entry.sha256)
    try:
        converted = keras.from_keras(h5, resolution=resolution)
    except WeightsError as e:
        raise WeightsError(f"{h5} is not a usable MobileNet file ({e}); delete it and try again") from None
    if converted.config.alpha != entry.alpha or converted.config.num_classes != entry.num_classes:
        raise WeightsError(f"{h5} holds alpha {converted.config.alpha:g} with {converted.config.num_classes} "
                           f"classes, not alpha {alpha:g} with 1000; delete it and try again")
    file.save(converted, out)
    return out


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(record: Path):
    """An exclusive lock on ``record``'s lock file, held across its read-modify-write."""
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record.with_name(record.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def verify_sha256(path, *, pinned: str | None = None) -> str:
    """Check ``path`` against a pinned digest, else trust on first use: record it once, then compare."""
    path = Path(path)
    digest = file_sha256(path)
    if pinned is not None:
        if digest != pinned:
            raise WeightsError(f"{path} has sha256 {digest[:12]}... but the released file has {pinned[:12]}...; "
                               f"delete it to fetch it again")
        return digest
    record = path.parent / RECORD
    with _locked(record):
        try:
            known = json.loads(record.read_text()) if record.is_file() else {}
        except (OSError, ValueError):
            known = None
        if not isinstance(known, dict):
            raise WeightsError(f"{record} is not a JSON object of file name -> sha256; delete it to start afresh")
        if path.name not in known:
            known[path.name] = digest
            data = json.dumps(known, indent=1, sort_keys=True).encode()
            checkpoint.atomic_write(record, lambda f: f.write(data))
        elif known[path.name] != digest:
            raise WeightsError(f"{path} has sha256 {digest[:12]}... but its first download had "
                               f"{str(known[path.name])[:12]}...; delete it (and its line in {record}) to fetch it "
                               f"again")
    return digest


def download(url: str, path, *, progress: bool = True, timeout: float = DEFAULT_TIMEOUT,
             total_timeout: float = DEFAULT_TOTAL_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Fetch ``url`` to ``path`` through a temp file; progress on stderr.

    ``timeout`` bounds each wait for bytes, ``total_timeout`` the whole
    download and ``max_bytes`` its size; the temp file is removed when any
    is exceeded.  The result must be an HDF5 file.
    """
    path = Path(path)
    deadline = time.monotonic() + total_timeout

    def give_up(reason: str) -> WeightsError:
        return WeightsError(f"cannot download {url} ({reason}); download that file yourself and put it at "
                            f"{path} (or set MOBILENETS_CACHE to the folder that has it)")

    def fetch(f) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=min(timeout, total_timeout))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise give_up(str(getattr(e, "reason", None) or e)) from None
        with response:
            try:
                total = int(response.headers.get("Content-Length") or 0)
            except ValueError:
                total = 0
            if total > max_bytes:
                raise give_up(f"it is {total:,} bytes, over the {max_bytes:,}-byte limit")
            done = 0
            while True:
                if time.monotonic() > deadline:
                    raise give_up(f"not finished after {total_timeout:g} s, {done:,} bytes received")
                try:
                    # read1 returns what has arrived (at least a byte): the deadline is checked between reads
                    chunk = response.read1(1 << 16)
                except (OSError, ValueError) as e:  # socket timeout, connection reset, bad chunking
                    raise give_up(f"stopped after {done:,} bytes: {e or type(e).__name__}") from None
                if not chunk:
                    break
                done += len(chunk)
                if done > max_bytes:
                    raise give_up(f"more than the {max_bytes:,}-byte limit")
                f.write(chunk)
                if progress:
                    _progress(path.name, done, total)
        if total and done != total:
            raise WeightsError(f"download of {url} stopped at {done} of {total} bytes; try again")
        if progress:
            print(file=sys.stderr)

    checkpoint.atomic_write(path, fetch, check=keras.check_hdf5)
    return path


def _progress(name: str, done: int, total: int) -> None:
    if total:
        sys.stderr.write(f"\rdownloading {name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({100 * done // total}%)")
    else:
        sys.stderr.write(f"\rdownloading {name}: {done / 1e6:.1f} MB")
    sys.stderr.flush()
