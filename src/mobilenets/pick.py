"""Which model for my latency budget: the 16 published α x ρ models timed here, and the pick.

``grid`` times the 16 published models at one precision and batch size, all
in the same interleaved rounds; ``pick`` recommends the most accurate one
(TF-slim ImageNet top-1, ``weights.registry``) that fits a latency budget,
reusing a grid cached in the cache folder (``cache.cache_dir()``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Callable

from . import deploy, paper
from .benchmark import check_arguments, example_inputs, machine, make_model, model_name, p90, save_figure
from .cache import cache_dir
from .checkpoint import atomic_write
from .cost import cost
from .errors import ParameterError
from .weights import registry


def grid(*, precision: str = "fp32", batch_size: int = 1, backend: str = "auto", alphas=paper.ALPHAS,
         resolutions=paper.RESOLUTIONS, rounds: int = 3, min_time: float = 0.3,
         log: Callable[[str], None] | None = None) -> dict:
    """Median latency of each α x ρ model at one precision and batch size, with its mult-adds and published top-1.

    Every model is built first, then all are timed in the same interleaved
    rounds, so the curve compares models under the same load.
    """
    log = log or (lambda s: None)
    check_arguments(batch_sizes=(batch_size,), rounds=rounds, min_time=min_time)
    deploy.backend.check_precision(precision)
    built = {}
    for alpha in alphas:
        model = make_model(alpha, steps=0)  # latency only: no need to fit
        for resolution in resolutions:
            calibration = deploy.builtin_batches(resolution, limit=32)[0] if precision == "int8" else None
            t0 = time.perf_counter()
            predictor = deploy.compile(model, precision, calibration=calibration, batch_size=batch_size,
                                       resolution=resolution, backend=backend)
            name = model_name(alpha, resolution)
            built[name] = (alpha, resolution, predictor, example_inputs(resolution, batch_size), time.perf_counter() - t0)
            log(f"  built {name} in {built[name][4]:.1f}s ({predictor.backend})")
    times = deploy.interleaved({n: (lambda _, p=b[2], x=b[3]: p(x)) for n, b in built.items()}, None,
                               rounds=rounds, min_time=min_time)
    rows = []
    for name, (alpha, resolution, predictor, _, build_s) in built.items():
        published = registry.published_top1().get((float(alpha), int(resolution)))
        row = {"model": name, "alpha": float(alpha), "resolution": int(resolution),
               "mult_adds": cost(alpha, resolution).mult_adds, "median_ms": statistics.median(times[name]),
               "p90_ms": p90(times[name]), "backend": predictor.backend, "build_s": build_s,
               "top1": published[0] if published else None, "top1_int8": published[1] if published else None}
        log(f"  {row['model']:9} {row['mult_adds']:>12,} mult-adds  {row['median_ms']:8.2f} ms  ({row['backend']})")
        rows.append(row)
    return {"machine": machine(), "precision": precision, "batch_size": batch_size, "backend": backend, "rows": rows}


def grid_cache_path(precision: str, batch_size: int, backend: str) -> Path:
    m = machine()
    key = {"cpu": m["cpu"], "threads": m["threads"], "versions": m["versions"], "precision": precision,
           "batch_size": batch_size, "backend": backend}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"grid-{precision}-b{batch_size}-{backend}-{digest}.json"


def cached_grid(*, precision: str = "fp32", batch_size: int = 1, backend: str = "auto", remeasure: bool = False,
                log=None, **timing) -> tuple[dict, Path, bool]:
    """The 16-model grid for this machine: read from the cache when present, else measured and cached.

    Returns (grid, cache path, whether it came from the cache).
    """
    path = grid_cache_path(precision, batch_size, backend)
    if not remeasure and path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data.get("rows", [])) == len(paper.ALPHAS) * len(paper.RESOLUTIONS):
                return data, path, True
        except (OSError, ValueError):
            pass
    data = grid(precision=precision, batch_size=batch_size, backend=backend, log=log, **timing)

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
    return data, path, False


def pareto(rows: list[dict], accuracy_key: str) -> list[dict]:
    """Rows sorted by latency, each marked ``pareto`` when no other model is both faster and more accurate."""
    out = []
    for r in sorted(rows, key=lambda r: (r["median_ms"], -r[accuracy_key])):
        dominated = any(o is not r and o["median_ms"] <= r["median_ms"] and o[accuracy_key] >= r[accuracy_key]
                        and (o["median_ms"] < r["median_ms"] or o[accuracy_key] > r[accuracy_key]) for o in rows)
        out.append({**r, "accuracy": r[accuracy_key], "pareto": not dominated})
    return out


def pick(latency_ms: float, grid_data: dict) -> dict:
    """The most accurate published model whose measured median latency fits ``latency_ms``.

    Accuracy is the TF-slim ImageNet top-1: the int8 column when the grid was
    measured at int8, the float column otherwise.  Returns {"choice": row or
    None, "table": pareto rows, "accuracy_column": ...}.
    """
    if not latency_ms > 0:
        raise ParameterError(f"latency_ms must be a number > 0, got {latency_ms!r}")
    key = "top1_int8" if grid_data["precision"] == "int8" else "top1"
    rows = [r for r in grid_data["rows"] if r.get(key) is not None]
    table = pareto(rows, key)
    fits = [r for r in table if r["median_ms"] <= latency_ms]
    choice = max(fits, key=lambda r: (r["accuracy"], -r["median_ms"])) if fits else None
    return {"choice": choice, "table": table, "accuracy_column": key, "latency_ms": latency_ms,
            "fastest": table[0] if table else None}


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
        ax.scatter([r["median_ms"] for r in rs], [r["accuracy"] for r in rs], label=f"α = {alpha:g}")
        for r in rs:
            ax.annotate(r["model"], (r["median_ms"], r["accuracy"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    front = [r for r in table if r["pareto"]]
    ax.plot([r["median_ms"] for r in front], [r["accuracy"] for r in front], "k--", lw=1, label="Pareto front")
    ax.axvline(result["latency_ms"], color="tab:red", lw=1, label=f"budget {result['latency_ms']:g} ms")
    if result["choice"]:
        c = result["choice"]
        ax.scatter([c["median_ms"]], [c["accuracy"]], s=200, facecolors="none", edgecolors="tab:red",
                   label=f"pick: {c['model']}")
    ax.set_xscale("log")
    ax.set_xlabel("measured median latency (ms, log)")
    column = "int8" if result["accuracy_column"] == "top1_int8" else "float"
    ax.set_ylabel(f"published ImageNet top-1, {column} (%)")
    ax.set_title(f"{grid_data['precision']}, batch {grid_data['batch_size']}, backend {grid_data['backend']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def format_pick(result: dict) -> str:
    lines = [f"{'model':9} {'mult-adds':>12} {'median ms':>10} {'top-1 %':>8} {'backend':12} pareto  fits"]
    for r in result["table"]:
        mark = "<- pick" if result["choice"] and r["model"] == result["choice"]["model"] else ""
        lines.append(f"{r['model']:9} {r['mult_adds']:>12,} {r['median_ms']:10.2f} {r['accuracy']:8.1f} "
                     f"{r['backend']:12} {'yes' if r['pareto'] else '':6}  "
                     f"{'yes' if r['median_ms'] <= result['latency_ms'] else 'no':4} {mark}")
    return "\n".join(lines)
