"""What building a runtime produces (the ONNX graph, the .tflite flatbuffer, OpenVINO's IR), kept in the cache
folder, so that the next ``compile`` of the same model loads it instead of exporting it again.

Exporting is most of a build: the ONNX export of 1.0-224 took 3.8 s of ``predict``'s set-up on every run
(issue 24), where creating the session from its bytes takes a fraction of a second.  An entry is keyed by
everything its bytes depend on: the folded graph (its layers and every tensor; for int8 the int8-ready
ranges and scales), the calibration rows, the precision, batch size and resolution, the backend and the
versions of the libraries that write and read it, and this package's source (:func:`..cache.code_sha256`).
Entries live in ``CACHE/builds/`` under the cache's trust model (:mod:`mobilenets.cache`): a file starts with
the HMAC of its name and contents under the folder's secret, and one that does not match (damaged, edited,
copied from another key or machine) is built afresh with a warning, never handed to a runtime.  The folder
is bounded (:data:`MAX_BYTES`): the least recently used entries go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata as md
import json
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..atomic import atomic_write
from ..cache import cache_dir, code_sha256, signature, trusted_secret
from ..errors import MobilenetsError
from .backend import Run

# the builds kept: an ImageNet-size graph is 17 MB at 1.0 (fp32 and int8 alike: QDQ keeps float weights),
# so about a dozen; a user switches among few models, precisions and batch sizes
MAX_BYTES = 200 * 2**20
SIGNATURE_BYTES = 64  # hex HMAC-SHA256 at the start of each entry


def folder() -> Path:
    return cache_dir() / "builds"


def graph_sha256(folded) -> str:
    """Of everything in the folded graph that an export reads: each module's kind and settings (kernel,
    stride, padding, TF-style padding, the ReLU6 clip), every tensor, and an int8-ready graph's ranges and
    equalization scales and weight grid."""
    from ..weights import tensors_sha256

    h = hashlib.sha256()
    for name, m in folded.named_modules():
        h.update(f"{name}|{type(m).__name__}|{m.extra_repr()}|{getattr(m, 'tf_pad', '')}|".encode())
        clip = getattr(m, "clamp_max", None)
        if isinstance(clip, torch.Tensor):
            h.update(clip.detach().float().contiguous().cpu().numpy().tobytes())
        else:
            h.update(repr(clip).encode())
    h.update(tensors_sha256(folded.state_dict()).encode())
    ready = getattr(folded, "int8_ready", None)
    if ready is not None:
        h.update(json.dumps(ready.metadata(), sort_keys=True, default=str).encode())
        if ready.folded is not folded:
            h.update(graph_sha256(ready.folded).encode())
    return h.hexdigest()


def versions(distributions: Iterable[str]) -> dict[str, str]:
    """The installed version of each distribution (absent ones left out)."""
    found = {}
    for dist in distributions:
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return found


def entry_path(backend: str, folded, precision: str, batches: list[torch.Tensor], batch_size: int, resolution: int,
               libraries: Iterable[str], suffix: str) -> Path:
    """Where the build of ``folded`` by ``backend`` for this request is kept."""
    key = {"backend": backend, "precision": precision, "batch_size": batch_size, "resolution": resolution,
           "versions": versions(["torch", *libraries]), "code": code_sha256(), "graph": graph_sha256(folded),
           "batches": [list(b.shape) for b in batches]}
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for b in batches:  # the calibration identity: the rows themselves
        h.update(b.detach().float().contiguous().cpu().numpy().tobytes())
    return folder() / f"{backend}-{precision}-{h.hexdigest()[:32]}{suffix}"


def cached_build(backend: str, folded, precision: str, batches: list[torch.Tensor], batch_size: int,
                 resolution: int, *, libraries: Iterable[str], suffix: str, make: Callable[[], bytes],
                 load: Callable[[bytes], Run]) -> Run:
    """``load(bytes)`` of the kept build for this request, else of ``make()``, which is then kept.

    ``libraries``: the distributions whose versions the bytes depend on (besides torch).  A kept entry that
    is not signed by this cache, or that ``load`` refuses, is made afresh (with a warning) and replaced.
    """
    path = entry_path(backend, folded, precision, batches, batch_size, resolution, libraries, suffix)
    secret = _secret(path.parent)
    data = _read(secret, path) if secret is not None else None
    if data is not None:
        try:
            run = load(data)
        except Exception as e:  # signed but unreadable (a runtime that changed without its version): rebuild
            warnings.warn(f"ignoring the cached build {path}: {type(e).__name__}: {e}", stacklevel=4)
        else:
            with contextlib.suppress(OSError):  # a read-only folder still serves
                path.touch()  # recently used: evicted last
            return run
    data = make()
    if secret is not None:
        _keep(secret, path, data)
    return load(data)


_untrusted_folders: set[Path] = set()


def _secret(folder: Path) -> bytes | None:
    """The folder's secret; None where it cannot be trusted, said once per folder and process (auto builds
    several runtimes in one compile)."""
    if folder in _untrusted_folders:
        return None
    secret = trusted_secret(folder, "build", "building afresh", stacklevel=6)
    if secret is None:
        _untrusted_folders.add(folder)
    return secret


def _read(secret: bytes, path: Path) -> bytes | None:
    """The entry's contents if its signature is this cache's, else None (a warning if it exists)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"ignoring the cached build {path}: {e.strerror or e}; building afresh", stacklevel=5)
        return None
    mark, data = raw[:SIGNATURE_BYTES], raw[SIGNATURE_BYTES:]
    if not hmac.compare_digest(mark, signature(secret, path.name, data).encode()):
        warnings.warn(f"ignoring the cached build {path}: it does not carry this cache's signature (damaged, "
                      f"edited, or written elsewhere); building afresh", stacklevel=5)
        return None
    return data


def _keep(secret: bytes, path: Path, data: bytes) -> None:
    """Write the signed entry and evict the least recently used beyond :data:`MAX_BYTES`; a cache that
    cannot be written costs the next run time, not this one its result."""
    mark = signature(secret, path.name, data).encode()
    try:
        atomic_write(path, lambda f: (f.write(mark), f.write(data)))
        entries = []
        for p in path.parent.iterdir():
            if not p.name.startswith("."):  # not the key, nor another writer's temporary file
                with contextlib.suppress(OSError):  # gone meanwhile: another process evicted it
                    st = p.stat()
                    entries.append((st.st_mtime, st.st_size, p))
        total = 0
        for _, size, p in sorted(entries, key=lambda e: e[0], reverse=True):  # newest first
            total += size
            if total > MAX_BYTES and p != path:
                p.unlink(missing_ok=True)
    except (OSError, MobilenetsError) as e:
        warnings.warn(f"could not keep the build in {path.parent}: {e}", stacklevel=5)
