"""Timing on this machine: our compiled predictors beside the runtimes users would otherwise pick, and the picker.

What is measured, and how:

- latency: wall time of one call on a fixed (batch, 3, ρ, ρ) input, after
  warm-up; median and p90 over all timed calls.  Candidates are timed in
  interleaved rounds (a few calls of each in turn, repeated), so load from
  other processes falls on every candidate alike and ratios stay meaningful
  on a shared CPU.
- throughput: images per second at the median, batch / median.
- achieved mult-adds/s: the model's exact mult-adds (``cost.py``) x batch /
  median, against the machine's floor at that precision: a 2048^3 matrix
  product's mult-adds/s (the best a dense kernel reaches here).
- parity: cosine, top-1 agreement and mean KL (nats) of each candidate's
  logits against fp32 eager PyTorch on real images (the built-in digits).

Peers, on the same weights: timm ``mobilenetv1_100`` in eager PyTorch, NCHW
and channels_last (for α = 1; our own eager module for other widths), and
ONNX Runtime and OpenVINO at the same precision (when installed).

The 16-model grid and the latency-budget picker are in :mod:`mobilenets.pick`.
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import deploy
from .architecture import check_input_size
from .atomic import atomic_write
from .checks import check_integer, is_integer, is_number
from .cost import cost
from .errors import ParameterError
from .builders import mobilenet_v1

SEED = 0
# Bounds that keep a typo from asking for all the memory: a batch of 1024 at 224 px is 0.6 GB of input and
# about 1.6 GB in the first layer; the floor's three n x n fp32 matrices take 0.8 GB at n = 8192.
MAX_BATCH = 1024
MAX_FLOOR_SIZE = 8192


def check_arguments(*, batch_sizes=(1,), floor_size: int = 2048, rounds: int = 5, min_time: float = 0.4) -> None:
    """Refuse timing arguments that cannot work or would exhaust memory, before any model is built."""
    bad = [b for b in batch_sizes if not is_integer(b) or not 1 <= b <= MAX_BATCH]
    if bad or not batch_sizes:
        raise ParameterError(f"batch sizes must be integers in [1, {MAX_BATCH}] such as 1, 8, 32, "
                             f"got {list(batch_sizes)!r}")
    check_integer(floor_size, "floor_size", 1, MAX_FLOOR_SIZE, example=" (default 2048)")
    check_integer(rounds, "rounds", 1)
    if not is_number(min_time) or min_time <= 0:
        raise ParameterError(f"min_time must be a number of seconds > 0 such as 0.4, got {min_time!r}")


@dataclass
class Row:
    """One timed candidate at one (precision, batch size)."""

    name: str
    kind: str  # "ours" or "peer"
    backend: str
    precision: str
    batch_size: int
    alpha: float
    resolution: int
    median_ms: float
    p90_ms: float
    throughput: float  # images/s at the median
    mult_adds_per_s: float
    floor_fraction: float | None  # of the matmul floor at this precision
    cosine: float | None  # vs fp32 eager on real images
    top1_agreement: float | None
    mean_kl: float | None  # mean KL(softmax(fp32 eager) || softmax(this)), nats
    build_s: float
    detail: str = ""
    ratios: dict = field(default_factory=dict)  # peer name -> peer median / this median (>1: this is faster)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- machine


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "timm", "onnxruntime", "openvino", "nncf", "torchao", "ai-edge-litert", "executorch"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    flags = deploy.cpu_flags()
    try:
        load = [round(v, 2) for v in __import__("os").getloadavg()]
    except OSError:
        load = None
    return {"cpu": deploy.cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "versions": versions, "loadavg": load, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def matmul_floor(precision: str, n: int = 2048, repeats: int = 10) -> float:
    """Mult-adds per second of an n^3 matrix product at ``precision`` (int8: torch._int_mm, int32 accumulate)."""
    g = torch.Generator().manual_seed(SEED)
    if precision == "int8":
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        op = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        op = lambda: torch.mm(a, b)  # noqa: E731
    times = deploy.time_run(lambda _: op(), None, warmup=2, min_time=0.3, min_iters=repeats, max_iters=repeats)
    return n ** 3 / (min(times) / 1e3)  # the best call: a floor is what the hardware can do


# ---------------------------------------------------------------- peers


def timm_peer(model) -> torch.nn.Module | None:
    """timm ``mobilenetv1_100`` holding ``model``'s weights (α = 1, symmetric padding, ReLU6), or None.

    timm lists the same tensors in the same order (stem, then dw/pw conv+BN
    per block, classifier), so the state dicts pair up by position; every
    shape is checked.
    """
    cfg = model.config
    if (cfg.alpha, cfg.padding, cfg.activation, cfg.full_conv, cfg.shallow, cfg.output_stride) != (
            1.0, "symmetric", "relu6", False, False, None):
        return None
    try:
        import timm
    except ImportError:
        return None
    peer = timm.create_model("mobilenetv1_100", pretrained=False, num_classes=cfg.num_classes)
    ours, theirs = model.state_dict(), peer.state_dict()
    if len(ours) != len(theirs):
        return None
    mapped = {}
    for (k, v), (tk, tv) in zip(ours.items(), theirs.items()):
        if v.shape != tv.shape:
            return None
        mapped[tk] = v
    peer.load_state_dict(mapped)
    for m in peer.modules():  # timm defaults to BN eps 1e-5; ours carries the config's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = cfg.bn_eps
    return peer.eval()


def timm_note(model) -> str:
    """Why the timm row is missing, in one line, where :func:`timm_peer` gives None."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return ("timm is not installed, so its mobilenetv1_100 is not timed; the eager rows are this model in "
                "plain PyTorch (pip install timm to add it)")
    return (f"timm has no model with this one's layers (alpha {model.config.alpha:g}, padding "
            f"{model.config.padding}, {model.config.activation}); the eager rows are this model in plain PyTorch")


def _eager(module: torch.nn.Module, channels_last: bool) -> Callable:
    module = module.eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)

    def run(x):
        with torch.no_grad():
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return module(x)

    return run


# ---------------------------------------------------------------- timing


def p90(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def example_inputs(resolution: int, batch_size: int, normalization=None) -> torch.Tensor:
    """``batch_size`` real images (built-in digits, repeated if needed) at ``resolution``."""
    batches, _ = deploy.builtin_batches(resolution, normalization=normalization, limit=min(batch_size, 64))
    return deploy.rebatch(batches, batch_size)[0]


def model_name(alpha: float, resolution: int) -> str:
    """The release's name for a model: 1.0-224, 0.75-160."""
    a = f"{alpha:g}"
    return f"{a if '.' in a else a + '.0'}-{resolution}"


def make_model(alpha: float, *, seed: int = SEED, num_classes: int = 1000, steps: int = 40,
               resolution: int = 32, batch_size: int = 64):
    """A seeded model briefly fitted to the built-in digits (labels 0-9 of its ``num_classes``).

    Speed does not depend on the weights, but every parity figure does: at
    initialisation a BatchNorm network amplifies small perturbations layer
    after layer (and BN statistics of the init saturate every ReLU6), so a
    random model makes bf16/int8 look either much worse or much better than on
    trained weights.  ``steps`` AdamW steps on the digits at ``resolution``
    give weights with real features and BN statistics measured on real images;
    they are deterministic for a seed.  Pass trained weights for real numbers.
    """
    from . import data, images

    torch.manual_seed(seed)
    model = mobilenet_v1(alpha, num_classes=num_classes, dropout=0.0)
    digits = data.Digits("train", resolution, data.EvalTransform(resolution, images.INCEPTION))
    x = torch.stack([digits[i][0] for i in range(len(digits))])
    y = torch.tensor(digits.targets)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    # final BN statistics: a plain average over the training images rather than the last steps' EMA
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        for i in range(0, min(len(x), 512), batch_size):
            model(x[i:i + batch_size])
        for m in bns:
            m.momentum = model.config.bn_momentum
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def model_for(*, weights=None, checkpoint=None, alpha: float = 1.0, resolution: int | None = None):
    """(model, resolution, normalization, labels or None) of ``weights`` or ``checkpoint``, else
    :func:`make_model`'s seeded ``alpha`` model; ``resolution`` defaults to the weights' own."""
    from . import metadata

    if weights and checkpoint:
        raise ParameterError("give weights or checkpoint, not both")
    if weights or checkpoint:
        from .weights import load

        model = load(checkpoint or weights)
    else:
        model = make_model(alpha)
    meta = metadata.of(model)
    labels = list(meta.labels) if meta.labels is not None else None
    return model, int(resolution or meta.resolution), meta.normalization, labels


def benchmark_weights(*, weights=None, checkpoint=None, alpha: float = 1.0, resolution: int | None = None,
                      **options) -> dict:
    """What ``mobilenets benchmark`` times: :func:`benchmark` of ``weights`` or ``checkpoint`` (at their
    resolution unless given), else of a seeded ``alpha`` model; the timing ``options`` are checked before a
    model is fitted or loaded."""
    check_arguments(**{k: options[k] for k in ("batch_sizes", "floor_size", "rounds", "min_time") if k in options})
    model, resolution, normalization, _ = model_for(weights=weights, checkpoint=checkpoint, alpha=alpha,
                                                    resolution=resolution)
    return benchmark(model, resolution=resolution, normalization=normalization, **options)


def benchmark(model=None, *, alpha: float = 1.0, resolution: int = 224, batch_sizes=(1,),
              precisions=("fp32",), backends=("auto",), peers: bool = True, calibration=None,
              rounds: int = 5, min_time: float = 0.4, warmup: int = 3, normalization=None, floor_size: int = 2048,
              log: Callable[[str], None] | None = None) -> dict:
    """Time ``model`` (default a seeded α model) with our ``backends`` and the peers; returns a JSON-able dict.

    ``backends`` are names for :func:`deploy.compile` ("auto", "torch",
    "onnxruntime", "openvino"); each gives an "ours" row per precision and
    batch size.  ``peers`` adds timm/eager, ONNX Runtime and OpenVINO rows.
    Each row has ``ratios``: peer median / its median (> 1 means faster).
    """
    log = log or (lambda s: None)
    check_arguments(batch_sizes=batch_sizes, floor_size=floor_size, rounds=rounds, min_time=min_time)
    check_input_size(resolution)
    model = model if model is not None else make_model(alpha)
    alpha = model.config.alpha
    mult_adds = cost(alpha, resolution, num_classes=model.config.num_classes, min_depth=model.config.min_depth,
                     full_conv=model.config.full_conv, shallow=model.config.shallow).mult_adds
    if calibration is None:
        calibration, _ = deploy.builtin_batches(resolution, normalization=normalization, limit=32)
    floors = {p: matmul_floor(p, n=floor_size) for p in precisions}
    log("matmul floors (G mult-adds/s): " + ", ".join(f"{p} {v / 1e9:.0f}" for p, v in floors.items()))
    available = deploy.available_backends()
    timm_model = timm_peer(model) if peers else None
    notes = [timm_note(model)] if peers and timm_model is None else []
    for note in notes:
        log(note)
    rows: list[Row] = []
    for batch_size in batch_sizes:
        x = example_inputs(resolution, batch_size, normalization)
        with torch.no_grad():
            reference = model(x)
        for precision in precisions:
            candidates: dict[str, tuple[str, str, Callable, float, str]] = {}

            def add(name, kind, backend, build):
                t0 = time.perf_counter()
                try:
                    run, detail = build()
                except Exception as e:  # a peer that cannot run here is reported, not fatal
                    if kind == "ours":
                        raise
                    log(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    return
                candidates[name] = (kind, backend, run, time.perf_counter() - t0, detail)
                log(f"  built {name} in {time.perf_counter() - t0:.1f}s")

            log(f"batch {batch_size}, {precision}: building")
            tried_by_auto = []
            for backend in backends:
                if backend == "auto":  # its candidates timed in this run's rounds: the row is their fastest
                    tried_by_auto = _add_auto_candidates(model, precision, calibration, batch_size, resolution, add)
                    continue

                def build_ours(backend=backend):
                    p = deploy.compile(model, precision, calibration=calibration, batch_size=batch_size,
                                       resolution=resolution, backend=backend, log=None)
                    chosen = f" -> {p.backend}" if backend == "auto" else ""
                    return p, f"{p.detail}{chosen}"
                add(f"mobilenets {backend}", "ours", backend, build_ours)
            if peers:
                if precision == "fp32":
                    eager = timm_model if timm_model is not None else model
                    label = "timm mobilenetv1_100" if timm_model is not None else "eager PyTorch"
                    add(f"{label} eager NCHW", "peer", "eager", lambda: (_eager(eager, False), "eager"))
                    add(f"{label} eager channels_last", "peer", "eager",
                        lambda: (_eager(eager, True), "eager channels_last"))
                folded = deploy.fold_batchnorm(model)
                batches = deploy.rebatch(deploy.calibration_batches(calibration, resolution), batch_size) \
                    if precision == "int8" else []
                for backend in ("onnxruntime", "openvino"):
                    if backend in available and deploy.backend_supports(backend, precision) and backend not in backends:
                        def build_peer(backend=backend):
                            run = deploy.backend.build(backend, folded, precision, batches, batch_size, resolution)
                            return run, deploy.backend.get(backend).describe(precision)
                        add(backend, "peer", backend, build_peer)
            log(f"batch {batch_size}, {precision}: timing {len(candidates)} candidates in {rounds} rounds")
            times = deploy.interleaved({n: c[2] for n, c in candidates.items()}, x, warmup=warmup, rounds=rounds,
                                min_time=min_time)
            if tried_by_auto:
                candidates, times = _auto_row(model, precision, batch_size, resolution, tried_by_auto, candidates,
                                              times, log)
            group = []
            for name, (kind, backend, run, build_s, detail) in candidates.items():
                med = statistics.median(times[name])
                with torch.no_grad():
                    fidelity = deploy.parity(reference, run(x).float())
                rate = mult_adds * batch_size / (med / 1e3)
                group.append(Row(
                    name=name, kind=kind, backend=backend, precision=precision if backend != "eager" else "fp32",
                    batch_size=batch_size, alpha=alpha, resolution=resolution, median_ms=med,
                    p90_ms=p90(times[name]), throughput=batch_size / (med / 1e3), mult_adds_per_s=rate,
                    floor_fraction=rate / floors[precision] if backend != "eager" else rate / floors.get("fp32", rate),
                    cosine=fidelity["cosine"], top1_agreement=fidelity["top1_agreement"], mean_kl=fidelity["mean_kl"],
                    build_s=build_s, detail=detail))
            for row in group:
                row.ratios = {p.name: p.median_ms / row.median_ms for p in group if p.kind == "peer"}
                log(f"  {row.name:42} median {row.median_ms:8.2f} ms  p90 {row.p90_ms:8.2f}  "
                    f"{row.throughput:8.1f} img/s  cos {row.cosine:.5f}")
            rows += group
    return {"machine": machine(), "model": {"alpha": alpha, "resolution": resolution, "mult_adds": mult_adds,
                                            "config": model.config.to_dict()},
            "floors": floors, "rows": [r.to_dict() for r in rows], "notes": notes}


def _add_auto_candidates(model, precision, calibration, batch_size, resolution, add) -> list[str]:
    """Build every runtime ``backend="auto"`` would measure, as candidates "auto: NAME" of this run."""
    from .deploy.prepare import folded_for

    given = deploy.calibration_batches(calibration, resolution) if precision == "int8" else []
    batches = deploy.rebatch(given, batch_size) if given else []
    folded = folded_for(model, precision, given)  # prepared as deploy.compile prepares
    names = deploy.auto.tried(folded, precision, batches)
    for name in names:
        add(f"auto: {name}", "auto", "auto", lambda name=name: (
            deploy.backend.build(name, folded, precision, batches, batch_size, resolution),
            deploy.backend.get(name).describe(precision)))
    return names


def _auto_row(model, precision, batch_size, resolution, names, candidates, times, log):
    """The "mobilenets auto" row: the fastest of auto's runtimes in this run's own rounds, kept as auto's
    cached choice, so auto never stands slower than another runtime timed beside it (issue 22 saw LiteRT
    chosen at 0.43x ONNX Runtime's speed from a choice cached under other load)."""
    timed = {n: statistics.median(times[f"auto: {n}"]) for n in names if f"auto: {n}" in candidates}
    if not timed:
        raise deploy.DeployError(f"auto: no runtime built {precision} here")
    if len(timed) == len(names):  # every candidate measured: as good as auto's own measurement, and the same run's
        deploy.auto.record(model.config.to_dict(), precision, batch_size, resolution, names, timed)
    chosen = min(timed, key=timed.get)
    log("  auto: " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in sorted(timed.items(), key=lambda t: t[1]))
        + f" -> {chosen}")
    auto_names = [f"auto: {n}" for n in names if f"auto: {n}" in candidates]
    run = candidates[f"auto: {chosen}"][2]
    build_s = sum(candidates[n][3] for n in auto_names)  # what auto's measurement costs: every build
    detail = f"{deploy.backend.get(chosen).describe(precision)} -> {chosen}"
    kept = {"mobilenets auto": ("ours", "auto", run, build_s, detail)}
    kept.update({n: c for n, c in candidates.items() if n not in auto_names})
    times = {"mobilenets auto": times[f"auto: {chosen}"], **{n: t for n, t in times.items() if n not in auto_names}}
    return kept, times


def format_table(result: dict) -> str:
    """A plain-text table: one line per candidate, ratios to the fastest peer of its group."""
    lines = []
    rows = result["rows"]
    head = f"{'batch':>5} {'precision':9} {'candidate':44} {'median ms':>9} {'p90 ms':>8} {'img/s':>8} " \
           f"{'G MA/s':>7} {'floor':>6} {'cosine':>7} {'top1':>5} {'KL nats':>8} {'x fastest peer':>14}"
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        group = [p for p in rows if p["kind"] == "peer" and p["batch_size"] == r["batch_size"]
                 and p["precision"] == r["precision"] and p["backend"] != "eager"]
        best = min(group, key=lambda p: p["median_ms"]) if group else None
        ratio = f"{best['median_ms'] / r['median_ms']:.2f}" if best else "-"
        floor = f"{100 * r['floor_fraction']:.1f}%" if r["floor_fraction"] is not None else "-"
        name = r["name"] + (f" ({r['detail'].split('-> ')[-1]})" if " -> " in r["detail"] else "")
        lines.append(f"{r['batch_size']:>5} {r['precision']:9} {name:44} {r['median_ms']:9.2f} {r['p90_ms']:8.2f} "
                     f"{r['throughput']:8.1f} {r['mult_adds_per_s'] / 1e9:7.1f} {floor:>6} {r['cosine']:7.4f} "
                     f"{r['top1_agreement']:5.2f} {r.get('mean_kl') or 0.0:8.2g} {ratio:>14}")
    floors = ", ".join(f"{p} {v / 1e9:.0f}" for p, v in result["floors"].items())
    lines.append(f"matmul floor (2048^3), G mult-adds/s: {floors}; model {result['model']['mult_adds']:,} mult-adds")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=120))
    finally:
        plt.close(fig)
    return path


def plot(result: dict, path) -> Path:
    """Bar chart of median latency per candidate, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 0.45 * len(rows) / len(batches) + 2),
                             squeeze=False)
    for ax, b in zip(axes[0], batches):
        group = [r for r in rows if r["batch_size"] == b]
        labels = [f"{r['name']} [{r['precision']}]" for r in group]
        colors = ["tab:blue" if r["kind"] == "ours" else "tab:gray" for r in group]
        ax.barh(range(len(group)), [r["median_ms"] for r in group], color=colors)
        ax.set_yticks(range(len(group)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("median latency per batch (ms, log scale)")
        for i, r in enumerate(group):
            ax.text(r["median_ms"], i, f" {r['median_ms']:.2f}", va="center", fontsize=7)
        m = result["model"]
        ax.set_title(f"MobileNet v1 {model_name(m['alpha'], m['resolution'])}, batch {b} (blue: mobilenets)")
    return save_figure(fig, path)


def quiet():
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
