"""Image files to preprocessed batches: decoded in parallel worker processes, in input order, in bounded memory.

``predict``, ``evaluate`` and int8 calibration read folders through
:func:`batches`, so an image is decoded and preprocessed the same way
everywhere (:func:`images.load_pixels` + :func:`images.eval_transform`).
Workers decode the next batches while the caller runs the model on this one;
at most ``2 x workers`` batches wait in memory, whatever the number of files.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import images
from .checks import check_integer
from .cores import cpu_count
from .data import MAX_WORKERS
from .images import INCEPTION, ImageError, Normalization

# glibc's mallopt parameter, and the size from which blocks are mapped whole (bound_heap): a batch's tensors
# are megabytes, PIL's and Python's small objects stay on the heap
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class DecodedBatch:
    """``x`` holds the decodable images of ``indices`` (positions in the input); ``failed`` the others."""

    indices: list[int]
    x: torch.Tensor | None
    failed: list[tuple[int, str]]  # (position, why)


def default_workers(count: int, batch_size: int) -> int:
    """Decoding processes for ``count`` images: none for a batch or two (starting a process costs more than
    it saves), else one per core (at most 8).  Workers sleep once their batches wait, so the model loses
    little to them, while leaving it a core of its own starves the decoding (benchmarks/results/predict_workers.md)."""
    if count <= 2 * batch_size:
        return 0
    return max(1, min(cpu_count(), 8))


class _Decode(torch.utils.data.Dataset):
    """Item i: the uint8 (3, R, R) pixels of source i, cropped for evaluation, or why it could not be decoded."""

    def __init__(self, sources: Sequence, resolution: int, draft: bool):
        self.sources = sources
        self.resolution = resolution
        self.min_side = images.draft_side(resolution) if draft else None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        source = self.sources[i]
        try:
            image = source if isinstance(source, Image.Image) else images.load_pixels(source, min_side=self.min_side)
            return i, images.eval_pixels(image, self.resolution)
        except ImageError as e:
            return i, str(e)


def _collate(items) -> DecodedBatch:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failed = [(i, x) for i, x in items if not isinstance(x, torch.Tensor)]
    x = None
    if good:
        first = good[0][1]
        out = None
        if torch.utils.data.get_worker_info() is not None:
            # in a worker the batch crosses to the main process in shared memory: stacking into it at once
            # saves stacking into private memory and copying that there (0.12 ms of a worker's 1.47 an image:
            # benchmarks/results/worker_handover.md)
            storage = first._typed_storage()._new_shared(len(good) * first.numel())
            out = first.new(storage).view(len(good), *first.shape)
        x = torch.stack([x for _, x in good], out=out)
    return DecodedBatch([i for i, _ in good], x, failed)


def batches(sources: Sequence[str | Path | Image.Image], *, resolution: int,
            normalization: Normalization | None = INCEPTION, batch_size: int = 32, workers: int | None = None,
            draft: bool = False, warn=None) -> Iterator[DecodedBatch]:
    """Preprocessed batches of ``sources`` (image files or PIL images), in order; the workers start at once.

    A worker that dies (killed for memory, say) loses nothing: the images not yet delivered are decoded in
    this process, in order, after one line to ``warn(str)`` (default: a :class:`WorkerLost` warning).

    ``normalization``: None yields the uint8 pixels themselves, for a runtime that normalises them in its
    graph (:meth:`deploy.Predictor.pixels`).
    ``workers``: decoding processes (default :func:`default_workers`; 0
    decodes here).  ``draft``: let JPEGs decode at a reduced scale that still
    leaves the shorter side at least the resize size (:func:`images.draft_side`; exact
    preprocessing otherwise).
    """
    if workers is None:
        workers = default_workers(len(sources), batch_size)
    check_integer(workers, "workers", 0, MAX_WORKERS)
    loader = torch.utils.data.DataLoader(
        _Decode(sources, resolution, draft), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, prefetch_factor=2 if workers else None,
        persistent_workers=False)
    bound_heap()
    # the workers start here, not at the first next(): they import their decoder and decode the first
    # batches while the caller builds its model (forked before any runtime starts its thread pool)
    decoded = iter(loader)
    if workers:
        _no_asynchronous_worker_errors()
    resumed = _resumed(decoded, sources, resolution, draft, batch_size, warn)
    return resumed if normalization is None else _normalised(resumed, normalization)


class WorkerLost(UserWarning):
    """A decoding worker died (killed by the system, say, for memory); the images it had are decoded here."""


def _no_asynchronous_worker_errors() -> None:
    """Leave a worker's death to be found where the next batch is asked for.

    PyTorch's DataLoader installs a SIGCHLD handler that raises its RuntimeError wherever the main thread
    happens to be (in the model, in printing a result), which no caller can catch and resume from.
    Without it the iterator finds the dead worker itself, within its 5 s status check, and raises from
    ``next()``: :func:`_resumed` catches it there.
    """
    import signal

    handler = signal.getsignal(signal.SIGCHLD)
    if getattr(handler, "__module__", "").startswith("torch.utils.data"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _resumed(decoded: Iterator[DecodedBatch], sources, resolution: int, draft: bool, batch_size: int,
             warn) -> Iterator[DecodedBatch]:
    """The loader's batches in order; if a worker dies, one warning and the rest decoded in this process.

    Batches arrive in input order, so the images delivered so far are a prefix: nothing is decoded twice,
    none is lost, and the order is kept.
    """
    done = 0
    try:
        for batch in decoded:
            done += len(batch.indices) + len(batch.failed)
            yield batch
        return
    except (RuntimeError, EOFError, OSError) as e:
        reason = _worker_death(decoded, e)
        if reason is None:
            raise
        shutdown = getattr(decoded, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        text = (f"a decoding worker died ({reason}); the {len(sources) - done} images not yet decoded are "
                f"decoded in this process instead")
        if warn is None:
            import warnings

            warnings.warn(WorkerLost(text), stacklevel=2)
        else:
            warn(text)
    rest = torch.utils.data.DataLoader(_Decode(sources[done:], resolution, draft), batch_size=batch_size,
                                       shuffle=False, num_workers=0, collate_fn=_collate)
    for batch in rest:
        yield DecodedBatch([i + done for i in batch.indices], batch.x, [(i + done, why) for i, why in batch.failed])


def _worker_death(decoded, error: BaseException) -> str | None:
    """One line saying which worker died, if ``error`` (raised by the loader's ``next()``) came of a death;
    else None.

    PyTorch reports a death it finds as a RuntimeError.  A worker killed just after queueing a batch shows
    up otherwise: the batch's pixels are shared memory whose file descriptor the main process must fetch
    from that worker, so unpickling the batch fails (EOFError, or a refused or reset connection) and the
    loader never gets to look at its workers.  Then the dead worker is looked for here; an error of that
    kind with every worker alive is not a death, and is raised as it is.
    """
    if isinstance(error, RuntimeError):
        text = str(error)
        return text.splitlines()[0].rstrip(". ") if text.startswith("DataLoader worker (pid") else None
    import time

    workers = getattr(decoded, "_workers", [])
    deadline = time.monotonic() + 5.0  # a killed process can take a moment to be reaped
    while True:
        dead = [w for w in workers if not w.is_alive()]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not dead:
        return None
    import signal

    w = dead[0]  # worded as PyTorch words the deaths it finds itself
    if w.exitcode is not None and w.exitcode < 0:
        return f"DataLoader worker (pid {w.pid}) is killed by signal: {signal.strsignal(-w.exitcode)}"
    return f"DataLoader worker (pid {w.pid}) exited unexpectedly with exit code {w.exitcode}"


def _normalised(decoded: Iterator[DecodedBatch], normalization: Normalization) -> Iterator[DecodedBatch]:
    for batch in decoded:  # uint8 pixels cross from the workers; normalised here, a whole batch at once
        x = None if batch.x is None else images.to_tensor(batch.x, normalization)
        yield DecodedBatch(batch.indices, x, batch.failed)


@functools.lru_cache(maxsize=1)
def bound_heap() -> bool:
    """Serve blocks of ``MMAP_THRESHOLD`` bytes or more from the system directly (glibc's ``mallopt``; elsewhere
    nothing), for the rest of this process.  Returns whether it could.

    Each batch allocates and frees blocks of tens of megabytes (the float batch, a runtime's copy of it,
    PyTorch's activations).  By default glibc raises its mmap threshold after the first such free and from
    then on serves them from the heap, where in some runs (2 of 3 here) they fragmented it: predict on
    1.0-224 grew by one batch's 19 MB a batch, to 3.2 GB over 4,000 images.  With the threshold fixed they
    are mapped and unmapped whole: 0.88 GB over 6,400 images, for 4-6% of images/s.  (``malloc_trim``
    every 8 batches kept memory flat too, near 1.1 GB; it was dropped while a crash was blamed on it that
    turned out to be OpenVINO's, see deploy.openvino.own_signal_stack.)
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
