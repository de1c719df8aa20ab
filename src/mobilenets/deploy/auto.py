"""Timing, and backend="auto": time every available backend once, keep the fastest, cache that choice.

The choice is keyed by CPU, thread count, library versions, model shape,
precision, batch size and resolution, and kept in
``cache.cache_dir() / "auto-backend.json"``, so later calls build only the
winner.  A choice measured while other work kept a core busy is provisional: it
serves while the machine stays busy and is measured again once it is quiet.

The measurement must pay for itself.  A caller that knows its job (``work=``
inputs: ``predict`` knows how many images it has) at fp32 gets this rule,
since eager PyTorch runs the folded model at once, with nothing to build:

- the job's eager time ``J`` is estimated from two calls on one input
  (:func:`eager_job_seconds`);
- each runtime's expected total is its build, a short timing against eager,
  and the job at its expected speed; build and speed are what this CPU showed
  the last time (``auto-builds.json``), or :data:`EXPECTED` (measured on a
  2-core AMD EPYC) before it has run here;
- when measuring every runtime would cost at most :data:`FULL_SHARE` of ``J``,
  all are measured and the choice cached, as without ``work``;
- otherwise only the runtime with the least expected total is built, and only
  if that total is below ``J``: timed against eager on a call each, the
  faster runs the job (this choice is not cached: what is cached stands for
  the careful measurement of every runtime).  A runtime this CPU already
  measured at :data:`TRUSTED_RATIO` of eager's time or less skips that timing
  and runs the job once built.

A choice cached by an earlier measurement serves such a job only when its
build is expected to pay for itself in that job too (:func:`pays`), else
the job runs eager.

So a small job runs eager at once, and a large one pays for one build that the
evidence says will save more than it costs.
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
from ..progress import Progress

# measuring every runtime for a job is worth it when it costs at most this share of the job's eager time
FULL_SHARE = 0.05
# (build seconds, ms per batch as a fraction of eager's) of each runtime at fp32 before it has run on this CPU:
# alpha 1.0, 224, batch 32, 2-core AMD EPYC 7B13 at load 3-6 (benchmarks/results/auto_budget.md)
EXPECTED = {"torch": (30.0, 0.46), "onnxruntime": (6.0, 0.25), "openvino": (35.0, 0.32), "litert": (2.0, 0.27)}
UNKNOWN = (30.0, 1.0)  # a runtime not listed: assume it costs a slow build and gains nothing until measured

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


def builds_path() -> Path:
    return cache_dir() / "auto-builds.json"


def _build_key(name: str, precision: str) -> str:
    return f"{cpu_name()}|{torch.get_num_threads()}|{name}|{precision}"


def seen(name: str, precision: str) -> tuple[float, float] | None:
    """(build seconds, ms per batch as a fraction of eager's) of ``name`` as last measured on this CPU, or None."""
    try:
        last = json.loads(builds_path().read_text()).get(_build_key(name, precision))
        build_s, ratio = float(last[0]), float(last[1])
        if np.isfinite(build_s) and np.isfinite(ratio) and build_s >= 0 and ratio > 0:
            return build_s, ratio
    except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError, RecursionError):
        pass
    return None


def expected(name: str, precision: str) -> tuple[float, float]:
    """(build seconds, ms per batch as a fraction of eager's) of ``name``: as last seen on this CPU, else
    :data:`EXPECTED`."""
    return seen(name, precision) or EXPECTED.get(name, UNKNOWN)


def _remember_build(name: str, precision: str, build_s: float, ratio: float) -> None:
    try:
        seen = json.loads(builds_path().read_text())
        seen = seen if isinstance(seen, dict) else {}
    except (OSError, ValueError, RecursionError):
        seen = {}
    seen[_build_key(name, precision)] = [round(build_s, 2), round(ratio, 4)]
    try:
        atomic_write(builds_path(), lambda f: f.write(json.dumps(seen, indent=1).encode()))
    except MobilenetsError:
        pass  # the estimate stays the default: a cost in choice quality, not in results


def eager_run(folded) -> Run:
    """The folded model in eager PyTorch: runs at once, nothing to build (fp32)."""
    folded = folded.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return folded(x)

    return run


def eager_job_seconds(run: Run, resolution: int, work: int) -> float:
    """Seconds eager PyTorch is expected to take for ``work`` inputs: the second of two calls on one input,
    times ``work``.  Batches run faster per input than one alone, so this errs long, and with it the budget."""
    x = example_input(1, resolution)
    run(x)
    t0 = time.perf_counter()
    run(x)
    return (time.perf_counter() - t0) * work


def plan(candidates: list[str], precision: str, job_s: float, batches: int) -> tuple[str, list[str]]:
    """("all", candidates) when measuring every one costs at most FULL_SHARE of the job's eager time
    ``job_s``; else ("one", [the runtime with the least expected total]) when that total beats eager; else
    ("eager", []).  ``batches``: how many batches the job runs (the short timing runs a few of them)."""
    per_batch = job_s / max(batches, 1)
    timing_s = {name: per_batch * (1 + TIMING_CALLS * expected(name, precision)[1]) for name in candidates}
    total_cost = sum(expected(name, precision)[0] + FULL_TIMING_CALLS * per_batch * expected(name, precision)[1]
                     for name in candidates)
    if candidates and total_cost <= FULL_SHARE * job_s:
        return "all", list(candidates)
    totals = {name: expected(name, precision)[0] + timing_s[name] + expected(name, precision)[1] * job_s
              for name in candidates}
    best = min(totals, key=totals.get, default=None)
    if best is not None and totals[best] < job_s:
        return "one", [best]
    return "eager", []


def _aside(log, line: str) -> None:
    """A note on a choice that cost nothing (eager PyTorch runs at once): shown where progress is (the CLI's
    log shows it on a terminal or when asked, like its bars), not among the notes of slow work."""
    if log is not None:
        (log.bar(line, final=True) if hasattr(log, "bar") else log(line))


def pays(name: str, precision: str, job_s: float) -> bool:
    """Whether building ``name`` and running the job on it is expected to take less than the job's eager time
    ``job_s`` (build and speed as :func:`expected` has them)."""
    build_s, ratio = expected(name, precision)
    return build_s + ratio * job_s < job_s


# calls of the runtime the short timing against eager makes (one warm-up, one timed; eager, with nothing to
# warm, is timed on one call), and those of the full measurement (3 warm-up, then 5 rounds of at least 3)
TIMING_CALLS = 2
# A runtime measured on this CPU at this fraction of eager's time or less runs a one-runtime job without being
# timed against eager again: a 2x margin, wider than the 1.2-1.9x that load moved one call's timing of the real
# model here (first_predict-*.md: eager 2364-6066 ms a batch, LiteRT 394-941, ratios 0.15-0.19)
TRUSTED_RATIO = 0.5
FULL_TIMING_CALLS = 18


def choose(config: dict, folded, precision: str, batches: list[torch.Tensor], batch_size: int,
           resolution: int, work: int | None = None, log=None) -> tuple[str, Run, dict[str, float]]:
    """(backend name, its run, ms per batch of each candidate) of the fastest backend for this request.

    ``work``: how many inputs the caller will run, if it knows; at fp32 the measurement is then sized to
    pay for itself (the module's rule), and the choice may be "eager".  ``log`` hears the progress.
    """
    candidates = tried(folded, precision, batches)
    if not candidates and not (work is not None and precision == "fp32"):
        raise DeployError(f"no installed backend builds {precision} without calibration images: pass calibration= "
                          f"batches of preprocessed images, or pip install 'mobilenets[deploy]'")
    key = choice_key(config, precision, batch_size, resolution, candidates)
    cached = _read_choices().get(key)
    busy = None
    if cached and cached.get("busy_cores", BUSY) >= BUSY:
        busy = cores.busy_cores()
        if busy < BUSY:  # measured on a busy machine (or before that was recorded), quiet now: measure properly
            cached = None
    job_s = eager = None
    if work is not None and precision == "fp32":
        eager = eager_run(folded)
        job_s = eager_job_seconds(eager, resolution, work)
    if cached and cached["backend"] in candidates:
        name = cached["backend"]
        if job_s is not None and not pays(name, precision, job_s):
            # the measured winner, but its build would cost this job more than it saves
            _aside(log, f"auto: eager PyTorch (about {job_s:.1f} s for {work} inputs: building {name} would not "
                        f"pay for itself)")
            return "eager", eager, {}
        run = backend.build(name, folded, precision, batches, batch_size, resolution)
        return name, run, dict(cached["timings"])

    if job_s is not None:
        n_batches = -(-work // batch_size)
        how, measured = plan(candidates, precision, job_s, n_batches)
        if how == "eager":
            _aside(log, f"auto: eager PyTorch (about {job_s:.1f} s for {work} inputs: no runtime's build would "
                        f"pay for itself)")
            return "eager", eager, {}
        if how == "one":
            return _one(measured[0], eager, folded, precision, batch_size, resolution, job_s, n_batches, log)
        candidates = measured
    if busy is None:  # sampled once: the same 0.25 s serves both questions
        busy = cores.busy_cores()
    built = {}
    build_s = {}
    with Progress(f"auto: building {len(candidates)} runtimes to time them", sum(
            expected(n, precision)[0] for n in candidates), log) as p:
        for name in candidates:
            t0 = time.perf_counter()
            try:
                built[name] = backend.build(name, folded, precision, batches, batch_size, resolution)
                build_s[name] = time.perf_counter() - t0
            except Exception as e:  # a runtime that cannot serve this request is skipped; all failing is fatal
                if name == candidates[-1] and not built:
                    raise
                warnings.warn(f"auto: skipping {name}: {type(e).__name__}: {e}", stacklevel=3)
            p.advance(expected(name, precision)[0])
            if name in build_s:
                _remember_build(name, precision, build_s[name], expected(name, precision)[1])
    times = interleaved(built, example_input(batch_size, resolution), rounds=5, min_time=0.3)
    # the lower quartile, not the median: a neighbour's burst of load slows whichever candidate it
    # happens to hit, and a cached wrong choice lasts; the quartile is what each does when it gets the CPU
    timings = {name: float(np.percentile(t, 25)) for name, t in times.items()}
    chosen = record(config, precision, batch_size, resolution, candidates, timings, busy)
    return chosen, built[chosen], timings


def tried(folded, precision: str, batches) -> list[str]:
    """The runtimes auto measures for this request: installed, able to build ``precision`` from what is given."""
    # installed, not imported: only the runtime auto builds is imported (choose skips one whose import fails)
    return [b for b in backend.BACKENDS
            if backend.backend_supports(b, precision) and backend.get(b).tried_by_auto
            and (batches or not backend.get(b).needs_calibration(folded, precision))
            and backend.get(b).installed()]


def record(config: dict, precision: str, batch_size: int, resolution: int, candidates: list[str],
           timings: dict[str, float], busy: float | None = None) -> str:
    """Cache the fastest of ``timings`` (ms per batch of every one of ``candidates``) as the choice for this
    request, as measured by :func:`choose` or a benchmark that timed them all in one run; returns it."""
    chosen = min(timings, key=timings.get)
    busy = cores.busy_cores() if busy is None else busy
    key = choice_key(config, precision, batch_size, resolution, candidates)
    choices = _read_choices()  # again: another process may have added its own choice meanwhile
    choices[key] = {"backend": chosen, "timings": timings, "precision": precision, "batch_size": batch_size,
                    "resolution": resolution, "alpha": config.get("alpha"), "busy_cores": round(busy, 2),
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_choices(choices)
    return chosen


def _one(name: str, eager: Run, folded, precision: str, batch_size: int, resolution: int, job_s: float,
         n_batches: int, log) -> tuple[str, Run, dict[str, float]]:
    """Build ``name``, time it against eager on a few calls, and keep the faster for this job (not cached:
    one short timing is not the careful measurement a cached choice stands for)."""
    build_expected, _ = expected(name, precision)
    t0 = time.perf_counter()
    with Progress(f"auto: building {name} (eager PyTorch would take about {job_s:.0f} s)", build_expected,
                  log, expected=True):
        try:
            run = backend.build(name, folded, precision, [], batch_size, resolution)
        except Exception as e:
            warnings.warn(f"auto: skipping {name}: {type(e).__name__}: {e}", stacklevel=4)
            return "eager", eager, {}
    build_s = time.perf_counter() - t0
    last = seen(name, precision)
    if last is not None and last[1] <= TRUSTED_RATIO:
        # measured here before at well under eager's time: timing the two again (an eager batch whose answers
        # are thrown away, 2.6 s for 1.0-224 at batch 32 on a quiet 2-core EPYC, 4.7-5.9 s busy) cannot change
        # the choice, only delay the job
        _remember_build(name, precision, build_s, last[1])
        if log:
            log(f"auto: {name} (measured here at {last[1]:.2f} of eager PyTorch's time) runs this job")
        return name, run, {}
    x = example_input(batch_size, resolution)
    eager_ms = float(np.min(time_run(eager, x, warmup=0, min_time=0.0, min_iters=1, max_iters=1)))
    times = time_run(run, x, warmup=1, min_time=0.0, min_iters=1, max_iters=1)
    ms = float(np.min(times))
    _remember_build(name, precision, build_s, ms / eager_ms)
    timings = {"eager": eager_ms, name: ms}
    chosen = name if ms < eager_ms else "eager"
    if log:
        log(f"auto: {name} {ms:.0f} ms a batch, eager PyTorch {eager_ms:.0f} ms: {chosen} runs this job")
    return (name, run, timings) if chosen == name else ("eager", eager, timings)
