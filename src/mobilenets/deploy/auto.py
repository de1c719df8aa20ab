"""Timing, and backend="auto": time every available backend once, keep the fastest, cache that choice.

The choice is keyed by CPU, thread count, library versions, model shape,
precision, batch size and resolution, and kept in
``cache.cache_dir() / "auto-backend.json"``, so later calls build only the
winner.  A choice measured while other work kept a core busy is provisional: it
serves while the machine stays busy and is measured again once it is quiet.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import cores
from ..cache import cache_dir
from ..atomic import atomic_write
from ..errors import MobilenetsError
from . import backend
from .backend import Run
from .calibration import example_input
from .machine import DeployError, cpu_name

# Other work on this many cores makes a measurement provisional: timed while a neighbour was busy, the wrong
# runtime won (benchmarks/results/deploy_auto.md)
BUSY = 0.5


def time_run(run: Callable, x, *, warmup: int = 3, min_time: float = 0.5,
             min_iters: int = 5, max_iters: int = 1000) -> list[float]:
    """Per-call wall times in ms after ``warmup`` calls: at least ``min_iters`` and ``min_time`` seconds."""
    for _ in range(warmup):
        run(x)
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved(runs: dict[str, Callable], x, *, warmup: int = 3, rounds: int = 5, min_time: float = 0.4,
                min_iters: int = 3) -> dict[str, list[float]]:
    """Per-call ms of each candidate, timed in ``rounds`` alternating rounds of >= ``min_time`` s each.

    Alternating spreads load from other processes over every candidate alike,
    so their ratio holds on a shared CPU where one long block each would not.
    """
    for run in runs.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] += time_run(run, x, warmup=0, min_time=min_time, min_iters=min_iters)
    return times


def choice_key(config: dict, precision: str, batch_size: int, resolution: int, candidates) -> str:
    versions = {}
    for dist in ("torch", "onnxruntime", "openvino", "nncf", "torchao"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    key = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "versions": versions, "config": config,
           "precision": precision, "batch_size": batch_size, "resolution": resolution, "candidates": list(candidates)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def choices_path() -> Path:
    return cache_dir() / "auto-backend.json"


def _read_choices() -> dict:
    """The cached choices; a damaged file or entry is left out (measured again and rewritten), never an error."""
    try:
        choices = json.loads(choices_path().read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(choices, dict):
        return {}
    return {k: v for k, v in choices.items() if _valid_choice(v)}


def _valid_choice(entry) -> bool:
    """An entry as :func:`choose` writes it: a backend name, finite timings per backend, a busy-core count."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    return (isinstance(entry, dict) and isinstance(entry.get("backend"), str)
            and isinstance(entry.get("timings"), dict) and entry["backend"] in entry["timings"]
            and all(isinstance(k, str) and number(v) for k, v in entry["timings"].items())
            and number(entry.get("busy_cores", BUSY)))


def _write_choices(choices: dict) -> None:
    """Keep the choices for later runs; a cache that cannot be written degrades to no cache, with one warning."""
    try:
        atomic_write(choices_path(), lambda f: f.write(json.dumps(choices, indent=1).encode()))
    except MobilenetsError as e:  # WriteError: no space, no permission, a file in the folder's place
        if not _warned_unwritable:
            _warned_unwritable.append(True)
            warnings.warn(f"auto: cannot keep the backend choice ({e}); every run will measure afresh until "
                          f"the cache folder is writable (MOBILENETS_CACHE chooses it)", stacklevel=3)


_warned_unwritable: list[bool] = []


def choose(config: dict, folded, precision: str, batches: list[torch.Tensor], batch_size: int,
           resolution: int) -> tuple[str, Run, dict[str, float]]:
    """(backend name, its run, ms per batch of each candidate) of the fastest backend for this request."""
    # availability last: it imports the runtime, and ExecuTorch's import alone takes 5 s
    candidates = [b for b in backend.BACKENDS
                  if backend.backend_supports(b, precision) and backend.get(b).tried_by_auto
                  and (batches or not backend.get(b).needs_calibration(folded, precision))
                  and backend.get(b).available()]
    if not candidates:
        raise DeployError(f"no installed backend builds {precision} without calibration images: pass calibration= "
                          f"batches of preprocessed images, or pip install 'mobilenets[deploy]'")
    key = choice_key(config, precision, batch_size, resolution, candidates)
    cached = _read_choices().get(key)
    busy = None
    if cached and cached.get("busy_cores", BUSY) >= BUSY:
        busy = cores.busy_cores()
        if busy < BUSY:  # measured on a busy machine (or before that was recorded), quiet now: measure properly
            cached = None
    if cached and cached["backend"] in candidates:
        run = backend.build(cached["backend"], folded, precision, batches, batch_size, resolution)
        return cached["backend"], run, dict(cached["timings"])

    if busy is None:  # sampled once: the same 0.25 s serves both questions
        busy = cores.busy_cores()
    built = {}
    for name in candidates:
        try:
            built[name] = backend.build(name, folded, precision, batches, batch_size, resolution)
        except Exception as e:  # a runtime that cannot serve this request is skipped; all failing is fatal
            if name == candidates[-1] and not built:
                raise
            warnings.warn(f"auto: skipping {name}: {type(e).__name__}: {e}", stacklevel=3)
    times = interleaved(built, example_input(batch_size, resolution), rounds=5, min_time=0.3)
    # the lower quartile, not the median: a neighbour's burst of load slows whichever candidate it
    # happens to hit, and a cached wrong choice lasts; the quartile is what each does when it gets the CPU
    timings = {name: float(np.percentile(t, 25)) for name, t in times.items()}
    chosen = min(timings, key=timings.get)
    choices = _read_choices()  # again: another process may have added its own choice meanwhile
    choices[key] = {"backend": chosen, "timings": timings, "precision": precision, "batch_size": batch_size,
                    "resolution": resolution, "alpha": config.get("alpha"), "busy_cores": round(busy, 2),
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_choices(choices)
    return chosen, built[chosen], timings
