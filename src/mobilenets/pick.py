"""Which model for my latency budget: the 16 published α x ρ models timed here, and the pick.

``grid`` times the 16 published models at one precision and batch size, all
in the same interleaved rounds: compiled by one backend of this process, or
(``runtime=``) as the files an on-device runtime runs, exported and timed in
that runtime here.  ``published_grid`` is the same table from published
latencies of a device (:mod:`mobilenets.device_latency`), not measured here.
``pick`` recommends the most accurate model (TF-slim ImageNet top-1,
``weights.registry``; a device's own published top-1 for ``published_grid``)
that fits a latency budget, reusing a grid cached in the cache folder
(``cache.cache_dir()``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import deploy, device_latency, paper
from .benchmark import check_arguments, example_inputs, machine, make_model, model_name, p90, save_figure
from .cache import cache_dir
from .atomic import atomic_write
from .cost import cost
from .errors import ParameterError
from .progress import Progress
from .weights import registry

# the runtimes whose files go onto phones: grid(runtime=) exports their files and times them here
DEVICE_RUNTIMES = ("litert", "executorch")


def runtime_format(runtime: str, precision: str):
    """The file format ``runtime`` runs (an ``ExportFormat``), checked for ``precision``; a clear error otherwise."""
    if runtime not in DEVICE_RUNTIMES:
        raise ParameterError(f"runtime must be one of {DEVICE_RUNTIMES}, got {runtime!r} (server runtimes "
                             f"are chosen with backend=)")
    b = deploy.backend.get(runtime)
    if not b.available():
        raise deploy.DeployError(f"runtime {runtime!r} is not installed; pip install 'mobilenets[deploy]' "
                                 f"(or pip install {' '.join(b.requires)})")
    spec = b.formats[0]
    deploy.check_export(spec.name, precision)
    return spec


def grid(*, precision: str = "fp32", batch_size: int = 1, backend: str = "auto", runtime: str | None = None,
         alphas=paper.ALPHAS, resolutions=paper.RESOLUTIONS, rounds: int = 3, min_time: float = 0.3,
         log: Callable[[str], None] | None = None) -> dict:
    """Median latency of each α x ρ model at one precision and batch size, with its mult-adds and published top-1.

    ``backend``: each model compiled by that backend (or the fastest,
    "auto") in this process.  ``runtime`` ("litert" or "executorch", instead
    of ``backend``): each model exported as that runtime's file, as
    ``deploy.export`` writes it, and timed in that runtime on this CPU
    (ExecuTorch in a fresh process: see :mod:`mobilenets.deploy.executorch`).
    Every model is built first, then all are timed in the same interleaved
    rounds, so the curve compares models under the same load.
    """
    shown_to, log = log, log or (lambda s: None)
    check_arguments(batch_sizes=(batch_size,), rounds=rounds, min_time=min_time)
    deploy.backend.check_precision(precision)
    if runtime is not None and backend != "auto":
        raise ParameterError(f"give backend= (compiled here) or runtime= (its files), not both; got "
                             f"backend={backend!r}, runtime={runtime!r}")
    spec = runtime_format(runtime, precision) if runtime is not None else None
    built = {}
    count = len(alphas) * len(resolutions)
    with tempfile.TemporaryDirectory(prefix="mobilenets-pick-") as folder, \
            Progress(f"pick: building {count} models", count, shown_to, unit="models") as shown:
        for alpha in alphas:
            model = make_model(alpha, steps=0)  # latency only: no need to fit
            for resolution in resolutions:
                calibration = deploy.builtin_batches(resolution, limit=32)[0] if precision == "int8" else None
                name = model_name(alpha, resolution)
                t0 = time.perf_counter()
                if spec is None:
                    target = deploy.compile(model, precision, calibration=calibration, batch_size=batch_size,
                                            resolution=resolution, backend=backend, log=None)
                    used = target.backend
                else:
                    target = deploy.export(model, Path(folder) / f"{name}{spec.suffix}", spec.name,
                                           precision=precision, calibration=calibration, resolution=resolution,
                                           log=None)
                    used = runtime
                built[name] = (alpha, resolution, target, used, time.perf_counter() - t0)
                log(f"  built {name} in {built[name][4]:.1f}s ({used})")
                shown.advance()
        shown.close()
        # the timing's length is known: rounds x models x at least min_time
        with Progress(f"pick: timing {count} models in {rounds} rounds", rounds * count * min_time * 1.2,
                      shown_to, expected=True):
            times = _time(built, spec, runtime, batch_size, rounds, min_time)
    rows = []
    for name, (alpha, resolution, _, used, build_s) in built.items():
        published = registry.published_top1().get((float(alpha), int(resolution)))
        row = {"model": name, "alpha": float(alpha), "resolution": int(resolution),
               "mult_adds": cost(alpha, resolution).mult_adds, "median_ms": statistics.median(times[name]),
               "p90_ms": p90(times[name]), "backend": used, "build_s": build_s,
               "top1": published[0] if published else None, "top1_int8": published[1] if published else None}
        log(f"  {row['model']:9} {row['mult_adds']:>12,} mult-adds  {row['median_ms']:8.2f} ms  ({row['backend']})")
        rows.append(row)
    return {"machine": machine(), "precision": precision, "batch_size": batch_size,
            "backend": runtime or backend, "runtime": runtime, "rows": rows}


def _time(built: dict, spec, runtime: str | None, batch_size: int, rounds: int, min_time: float) -> dict:
    """Per-call ms of every built model: predictors and in-process runtimes here, the others in a fresh process."""
    if spec is not None and not deploy.backend.get(runtime).shares_process:
        from .deploy.isolated import time_files

        return time_files({name: (b[2], b[1]) for name, b in built.items()}, batch_size=batch_size,
                          rounds=rounds, min_time=min_time)
    runs = {}
    for name, (_, resolution, target, _, _) in built.items():
        run = target if spec is None else deploy.load_exported(target, spec.name)
        runs[name] = lambda _, run=run, x=example_inputs(resolution, batch_size): run(x)
    return deploy.interleaved(runs, None, rounds=rounds, min_time=min_time)


def grid_cache_path(precision: str, batch_size: int, backend: str, runtime: str | None = None) -> Path:
    m = machine()
    key = {"cpu": m["cpu"], "threads": m["threads"], "versions": m["versions"], "precision": precision,
           "batch_size": batch_size, "backend": backend}
    if runtime is not None:
        key = {**key, "backend": None, "runtime": runtime}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"grid-{precision}-b{batch_size}-{runtime or backend}-{digest}.json"


def cached_grid(*, precision: str = "fp32", batch_size: int = 1, backend: str = "auto", runtime: str | None = None,
                remeasure: bool = False, log=None, **timing) -> tuple[dict, Path, bool]:
    """The 16-model grid for this machine: read from the cache when present, else measured and cached.

    Returns (grid, cache path, whether it came from the cache).
    """
    if runtime is not None:
        runtime_format(runtime, precision)  # refused before a cached grid of another precision is read
    path = grid_cache_path(precision, batch_size, backend, runtime)
    if not remeasure and path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data.get("rows", [])) == len(paper.ALPHAS) * len(paper.RESOLUTIONS):
                return data, path, True
        except (OSError, ValueError):
            pass
    data = grid(precision=precision, batch_size=batch_size, backend=backend, runtime=runtime, log=log, **timing)

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
    return data, path, False


def pick_model(latency_ms: float, *, precision: str = "fp32", batch_size: int = 1, backend: str | None = None,
               runtime: str | None = None, remeasure: bool = False, device: str | None = None,
               accelerator: str | None = None, plot=None, log=None) -> tuple[dict, dict]:
    """What ``mobilenets pick`` answers: (:func:`pick`'s result with where its grid came from, the grid).

    Without ``device``, the grid is measured on this machine (cached; ``remeasure`` times it again); with
    it, the grid is the device's published batch-1 latencies, never measured here, and the options of
    measuring are refused.  The answer says which (``measured_here``) and names the cache or the source;
    ``plot`` is a PNG path to draw the pick on (nothing is drawn unasked).
    """
    if device is None:
        if accelerator is not None:
            raise ParameterError("--accelerator chooses a column of a device's published latencies; give it with "
                                 "--device pixel-3")
        data, cache, cached = cached_grid(precision=precision, batch_size=batch_size, backend=backend or "auto",
                                          runtime=runtime, remeasure=remeasure, log=log)
        where = {"measured_here": True, "grid": str(cache), "cached": cached}
    else:
        for flag, given in (("--backend", backend), ("--runtime", runtime), ("--remeasure", remeasure),
                            ("--batch", batch_size != 1)):
            if given:
                raise ParameterError(f"{flag} applies to measuring here; --device picks from published batch-1 "
                                     f"latencies (drop {flag}, or drop --device to measure on this machine)")
        data = published_grid(device, precision, accelerator or "cpu")
        where = {"measured_here": False, "device": data["device"], "source": data["source"],
                 "accelerator": data["accelerator"]}
    result = pick(latency_ms, data)
    drawn = plot_pick(result, data, Path(plot)) if plot else None
    return {**result, **where, "plot": drawn and str(drawn)}, data


def published_grid(device: str, precision: str = "fp32", accelerator: str = "cpu") -> dict:
    """The 16 released models with their published latency on ``device``: a grid :func:`pick` takes.

    Published, not measured here (:mod:`mobilenets.device_latency`); batch 1;
    top-1 is the one that page lists beside its latencies.
    """
    d = device_latency.get(device)
    rows = [{"model": model_name(m.alpha, m.resolution), "alpha": m.alpha, "resolution": m.resolution,
             "mult_adds": cost(m.alpha, m.resolution).mult_adds, "published_ms": ms,
             "backend": f"{d.name} {accelerator}", "top1": m.top1, "top1_int8": m.top1_int8}
            for m, ms in device_latency.latencies(device, precision, accelerator)]
    return {"published": True, "device": d.name, "description": d.description, "source": d.source,
            "accelerator": accelerator, "how": d.accelerators[accelerator], "precision": precision,
            "batch_size": 1, "backend": f"{d.name} {accelerator}", "rows": rows}


def latency_key(grid_data: dict) -> str:
    """The row key holding a grid's latency: a device's published ms, else the median measured here."""
    return "published_ms" if grid_data.get("published") else "median_ms"


def pareto(rows: list[dict], accuracy_key: str, latency: str = "median_ms") -> list[dict]:
    """Rows sorted by latency, each marked ``pareto`` when no other model is both faster and more accurate."""
    out = []
    for r in sorted(rows, key=lambda r: (r[latency], -r[accuracy_key])):
        dominated = any(o is not r and o[latency] <= r[latency] and o[accuracy_key] >= r[accuracy_key]
                        and (o[latency] < r[latency] or o[accuracy_key] > r[accuracy_key]) for o in rows)
        out.append({**r, "accuracy": r[accuracy_key], "latency_ms": r[latency], "pareto": not dominated})
    return out


def pick(latency_ms: float, grid_data: dict) -> dict:
    """The most accurate model whose latency in ``grid_data`` (measured median, or published) fits ``latency_ms``.

    Accuracy is the published ImageNet top-1: the int8 column when the grid
    is at int8, the float column otherwise; between equally accurate models,
    the faster.  Returns {"choice": row or None, "table": pareto rows (each
    with "latency_ms" and "accuracy"), "accuracy_column": ..., "published":
    whether the latencies are published rather than measured here}.
    """
    if not latency_ms > 0:
        raise ParameterError(f"latency_ms must be a number > 0, got {latency_ms!r}")
    key = "top1_int8" if grid_data["precision"] == "int8" else "top1"
    rows = [r for r in grid_data["rows"] if r.get(key) is not None]
    table = pareto(rows, key, latency_key(grid_data))
    fits = [r for r in table if r["latency_ms"] <= latency_ms]
    choice = max(fits, key=lambda r: (r["accuracy"], -r["latency_ms"])) if fits else None
    return {"choice": choice, "table": table, "accuracy_column": key, "latency_ms": latency_ms,
            "fastest": table[0] if table else None, "published": bool(grid_data.get("published")),
            "out_of_order": [] if grid_data.get("published") else out_of_order(table)}


def out_of_order(table: list[dict]) -> list[tuple[str, str]]:
    """(larger, smaller) models of one width where the larger one measured faster.

    Each resolution step of the grid adds 36% or more mult-adds at the same width, so a larger model timed
    faster means the timing was disturbed (other processes, a clock change), not that it is faster.
    """
    return [(big["model"], small["model"]) for big in table for small in table
            if big["alpha"] == small["alpha"] and big["mult_adds"] > small["mult_adds"]
            and big["latency_ms"] < small["latency_ms"]]


def plot_grid(grid_data: dict, path) -> Path:
    """Measured latency against mult-adds for the α x ρ models (log-log): how cost grows with the work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 5))
    for alpha in sorted({r["alpha"] for r in grid_data["rows"]}, reverse=True):
        rs = sorted((r for r in grid_data["rows"] if r["alpha"] == alpha), key=lambda r: r["mult_adds"])
        ax.plot([r["mult_adds"] / 1e6 for r in rs], [r["median_ms"] for r in rs], "o-", label=f"α = {alpha:g}")
        for r in rs:
            ax.annotate(str(r["resolution"]), (r["mult_adds"] / 1e6, r["median_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -8))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("mult-adds (millions, log)")
    ax.set_ylabel("median latency (ms, log)")
    ax.set_title(f"MobileNet v1 on {grid_data['machine']['cpu'][:40]}\n"
                 f"{grid_data['precision']}, batch {grid_data['batch_size']}, backend {grid_data['backend']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_pick(result: dict, grid_data: dict, path) -> Path:
    """Published accuracy against measured latency, the Pareto front joined, the budget and the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    table = result["table"]
    for alpha in sorted({r["alpha"] for r in table}, reverse=True):
        rs = [r for r in table if r["alpha"] == alpha]
        ax.scatter([r["latency_ms"] for r in rs], [r["accuracy"] for r in rs], label=f"α = {alpha:g}")
        for r in rs:
            ax.annotate(r["model"], (r["latency_ms"], r["accuracy"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    front = [r for r in table if r["pareto"]]
    ax.plot([r["latency_ms"] for r in front], [r["accuracy"] for r in front], "k--", lw=1, label="Pareto front")
    ax.axvline(result["latency_ms"], color="tab:red", lw=1, label=f"budget {result['latency_ms']:g} ms")
    if result["choice"]:
        c = result["choice"]
        ax.scatter([c["latency_ms"]], [c["accuracy"]], s=200, facecolors="none", edgecolors="tab:red",
                   label=f"pick: {c['model']}")
    ax.set_xscale("log")
    column = "int8" if result["accuracy_column"] == "top1_int8" else "float"
    ax.set_ylabel(f"published ImageNet top-1, {column} (%)")
    if result["published"]:
        ax.set_xlabel(f"published latency on {grid_data['description']}, {grid_data['how']} (ms, log)")
        ax.set_title(f"{grid_data['precision']}, batch 1: published by {grid_data['source']}, not measured here",
                     fontsize=9)
    else:
        ax.set_xlabel("measured median latency (ms, log)")
        ax.set_title(f"{grid_data['precision']}, batch {grid_data['batch_size']}, backend {grid_data['backend']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def format_pick(result: dict) -> str:
    """The models in size order (mult-adds), so a latency out of step with its size stands out; the CLI warns
    about such pairs (``result["out_of_order"]``)."""
    column = "published ms" if result["published"] else "median ms"
    lines = [f"{'model':9} {'mult-adds':>12} {column:>12} {'top-1 %':>8} {'backend':14} pareto  fits"]
    for r in sorted(result["table"], key=lambda r: (r["mult_adds"], r["alpha"])):
        mark = "<- pick" if result["choice"] and r["model"] == result["choice"]["model"] else ""
        lines.append(f"{r['model']:9} {r['mult_adds']:>12,} {r['latency_ms']:12.2f} {r['accuracy']:8.1f} "
                     f"{r['backend']:14} {'yes' if r['pareto'] else '':6}  "
                     f"{'yes' if r['latency_ms'] <= result['latency_ms'] else 'no':4} {mark}")
    return "\n".join(lines)
