"""The command-line front: parses arguments and calls the library, nothing more.

Each subcommand is an ``add_<name>`` function that registers its parser and
sets ``func``; modules are imported inside the handlers so that
``mobilenets summary`` does not pay for what ``mobilenets train`` needs.
Errors a user can fix are printed as one line and exit with status 2; set
MOBILENETS_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .architecture import ALPHA_RANGE, RESOLUTION_RANGE, alpha_ok, resolution_ok
from .cores import MAX_WORKERS
from .errors import MobilenetsError
from .terminal import printable


class UsageError(Exception):
    """A mistake in the command line or its inputs that the user can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _number(convert, ok, allowed: str):
    """An argparse type: ``convert(text)`` must succeed and satisfy ``ok``, else the message says what is allowed."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}")
        return value

    return parse


alpha = _number(float, alpha_ok, ALPHA_RANGE)
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
resolution = _number(int, resolution_ok, RESOLUTION_RANGE)
_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")


def _write_json(target: str, data) -> None:
    """``--json FILE`` writes the file whole or not at all; ``--json -`` prints it."""
    if target == "-":
        print(json.dumps(data))
        return
    from .atomic import atomic_write

    text = json.dumps(data, indent=1)
    atomic_write(target, lambda f: f.write(text.encode()))


def _progress(args):
    """Where a command's notes and progress go (mobilenets.progress): stderr, or nowhere with --quiet."""
    from .progress import to_stderr

    return to_stderr(args.quiet)



_workers = _number(int, lambda v: 0 <= v <= MAX_WORKERS, f"an integer in [0, {MAX_WORKERS}]")


class _Registry:
    """A library registry's names (``module:NAME``) as argparse choices, read on first use: the registries live
    in modules that import PyTorch, and parsing a command line that does not name them should not wait for it
    (the first progress line of ``predict`` comes after parsing). Give the option a metavar (argparse reads the
    choices to make one when the option is added) and list them in its help with ``%(choices)s``."""

    def __init__(self, where: str):
        self.module, self.name = where.split(":")

    def _names(self):
        import importlib

        return getattr(importlib.import_module(f"mobilenets.{self.module}"), self.name)

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=alpha, default=1.0, help="width multiplier (default 1.0)")
    p.add_argument("--resolution", type=resolution, default=224, help="input size in pixels (default 224)")
    p.add_argument("--full-conv", action="store_true", help="Table 4 ablation: standard 3x3 convs instead of separable")
    p.add_argument("--shallow", action="store_true", help="Table 5 ablation: remove the five 14x14x512 pairs")


# ---------------------------------------------------------------- summary


def format_cost_table(c) -> str:
    head = ("layer", "type / stride", "filter shape", "input size", "output size", "mult-adds", "params")
    rows = [head]
    for l in c.layers:
        rows.append((l.name, l.type_stride, l.filter_shape, "x".join(map(str, l.input_size)),
                     "x".join(map(str, l.output_size)), f"{l.mult_adds:,}", f"{l.params:,}"))
    rows.append(("total", "", "", "", "", f"{c.mult_adds:,}", f"{c.params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {5, 6}
    lines = []
    for n, r in enumerate(rows):
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(head))]
        lines.append("  ".join(cells).rstrip())
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_grid(grid) -> str:
    """The 16 alpha x resolution models as a Markdown table (the README's table is this output)."""
    lines = ["| model | mult-adds | params (no BN) | trainable params | top-1 float | top-1 int8 |",
             "|---|---:|---:|---:|---:|---:|"]
    for g in grid:
        lines.append(f"| {g['model']} | {g['mult_adds']:,} | {g['params']:,} | {g['trainable_params']:,} "
                     f"| {g['top1']} | {g['top1_int8']} |")
    return "\n".join(lines)


def run_summary(args) -> int:
    from .cost import cost

    if args.grid:
        from . import paper

        grid = paper.grid()
        print(json.dumps(grid) if args.json else format_grid(grid))
        return 0
    c = cost(args.alpha, args.resolution, full_conv=args.full_conv, shallow=args.shallow)
    if args.json:
        print(json.dumps(c.to_dict()))
        return 0
    variant = " (full conv)" if args.full_conv else " (shallow)" if args.shallow else ""
    print(f"MobileNet v1 {args.alpha:g}-{args.resolution}{variant}")
    print(format_cost_table(c))
    print(f"mult-adds {c.mult_adds:,}   params {c.params:,} (no BN)   "
          f"BN gamma/beta {c.bn_params:,}   trainable {c.trainable_params:,}")
    return 0


def add_summary(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", action="store_true",
                   help="instead: the 16 official alpha x resolution models with published ImageNet accuracy")
    p.set_defaults(func=run_summary)


# ---------------------------------------------------------------- paper


def run_paper(args) -> int:
    from . import paper

    rows = paper.all_tables()
    grid = paper.grid()
    plots = [str(p) for p in paper.plot_figures(args.plot)] if args.plot else []
    if args.json:
        print(json.dumps({"tables": [r.to_dict() for r in rows], "grid": grid, "plots": plots}))
        return 0
    table = None
    for r in rows:
        if r.table != table:
            table = r.table
            print(f"\n{table}")
            print(f"  {'row':28} {'column':20} {'paper':>8} {'ours':>8}")
        mark = "" if r.matches else "  <- differs: " + r.note
        print(f"  {r.row:28} {r.column:20} {r.paper:>8} {r.ours:>8}{mark}")
    print("\nThe 16 alpha x resolution models (exact cost; ImageNet top-1 from the TF-slim 2018 release)")
    print(f"  {'model':10} {'mult-adds':>13} {'params':>11} {'top-1':>6} {'int8':>6}")
    for g in grid:
        print(f"  {g['model']:10} {g['mult_adds']:>13,} {g['params']:>11,} {g['top1']:>6} {g['top1_int8']:>6}")
    for p in plots:
        print(f"wrote {p}")
    return 0


def add_paper(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="DIR", help="write Figures 4 and 5 as PNG files into DIR")
    p.set_defaults(func=run_paper)


# ---------------------------------------------------------------- train, evaluate, plot


def run_train(args) -> int:
    from . import train

    try:
        config, row = train.start({name: getattr(args, name) for name in train.fields() if hasattr(args, name)},
                                  resume=args.resume)
    except train.Interrupted as e:
        print(f"mobilenets: {e}; continue with: mobilenets train --resume {e.path.parent}", file=sys.stderr)
        return 128 + e.signum
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    keys = ("epoch", "train_loss", "val_top1", "val_top5", "ema_val_top1", "int8_float_val_top1", "int8_val_top1")
    print(train.json_line({"run": config.out, **{k: row[k] for k in keys if k in row}}))
    return 0


def add_config_arguments(p: argparse.ArgumentParser, config_fields: dict, recipes: dict) -> None:
    """One flag per field of TrainConfig, from its metadata; every default is None so "not given" is visible."""
    from .train.config import field_type

    for name, f in config_fields.items():
        m = f.metadata
        flags = m["flags"] or ("--" + name.replace("_", "-"),)
        if m["cli"] == "negate":
            p.add_argument(*flags, dest=name, action="store_const", const=False, default=None, help=m["help"])
            continue
        overrides = [f"{recipe}: {values[name]}" for recipe, values in recipes.items() if name in values]
        default = "" if f.default is None else f"default {f.default}"
        text = m["help"] + (f" ({'; '.join(filter(None, [default, *overrides]))})" if default or overrides else "")
        if m["cli"] == "switch":
            p.add_argument(*flags, dest=name, action="store_const", const=True, default=None, help=m["help"])
        elif m["cli"] == "toggle":
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif m["choices"]:
            p.add_argument(*flags, dest=name, choices=m["choices"], help=text)
        else:
            kind, bound = field_type(name), m["bound"]
            parse = kind
            if bound is not None:
                allowed = ("an integer " if kind is int else "a number ") + bound.describe()
                allowed += f" such as {m['example']}" if m["example"] else ""
                parse = _number(kind, bound.contains, allowed)
            p.add_argument(*flags, dest=name, type=parse, metavar=m["metavar"], help=text)


def add_train(p: argparse.ArgumentParser) -> None:
    from .train import RECIPES, fields

    p.description = ("Train MobileNet v1. A --recipe sets every default; flags override it. "
                     "Run under torchrun --nproc_per_node=N for data-parallel training.")
    add_config_arguments(p, fields(), RECIPES)
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR|FILE",
                   help="continue a stopped run (default: --out) from its last.pt")
    p.set_defaults(func=run_train)


def run_evaluate(args) -> int:
    from .evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data, resolution=args.resolution, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device)
    if args.json:
        print(json.dumps(r))
    else:
        top5 = f"top-5 {r['top5']:.2f}%  " if r["classes"] > 5 else ""  # with 5 classes or fewer it is 100%
        print(f"{r['checkpoint']} on {r['data']} at {r['resolution']} px: top-1 {r['top1']:.2f}%  "
              f"{top5}({r['images']} images"
              + (f", {r['skipped']} undecodable skipped" if r["skipped"] else "") + ")")
    return 0


def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE",
                   help="a run folder (its best.pt), a .pt or a converted .safetensors")
    p.add_argument("--data", metavar="DIR", help="DIR/<class>/*; default: the built-in held-out digits")
    p.add_argument("--resolution", type=resolution, help="input size (default: the checkpoint's)")
    p.add_argument("-b", "--batch-size", type=_positive_int, default=64)
    p.add_argument("-j", "--num-workers", dest="num_workers", type=_workers, default=2)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_evaluate)


def run_plot(args) -> int:
    from .train import plot

    for path in plot(args.run_dir):
        print(f"wrote {path}")
    return 0


def add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=run_plot)


# ---------------------------------------------------------------- export, benchmark, pick


def _alpha_of(args) -> float:
    """--alpha for a seeded model; refused beside weights, whose file says its width (it was silently ignored)."""
    if (args.weights or args.checkpoint) and args.alpha is not None:
        raise UsageError(f"mobilenets {args.command}: --alpha comes from the weights' file; drop --alpha "
                         f"(it sets the width of a seeded model only without --weights or --checkpoint)")
    return 1.0 if args.alpha is None else args.alpha


def _add_weights_arguments(p) -> None:
    p.add_argument("--weights", metavar="FILE", help="converted weights (.safetensors) or a checkpoint file")
    p.add_argument("--checkpoint", metavar="RUN_DIR|FILE", help="a training run folder (its best.pt) or a .pt")
    p.add_argument("--alpha", type=alpha, default=None,
                   help="without weights: width of a seeded model briefly fitted to the built-in digits (default 1.0)")
    p.add_argument("--resolution", type=resolution, help="input size (default: the weights', else 224)")


def run_export(args) -> int:
    from .export_check import export_and_check

    report = export_and_check(args.out, format=args.format, precision=args.precision, weights=args.weights,
                              checkpoint=args.checkpoint, alpha=_alpha_of(args), resolution=args.resolution, io=args.io,
                              calib_data=args.calib_data, calib_images=args.calib_images,
                              warn=lambda text: print(f"mobilenets: warning: {text}", file=sys.stderr),
                              log=_progress(args))
    if report.get("executed") is False:  # a format no runtime here runs (Core ML): checked, not run
        return _report_checked(report, args.json)
    if args.json:
        print(json.dumps(report))
        return 0
    res = report["resolution"]
    print(f"wrote {report['path']} ({report['format']}, {report['precision']}, {res}x{res})")
    print(_parity_line("parity vs PyTorch fp32", report))
    return 0


def _parity_line(what: str, p: dict) -> str:
    line = (f"{what} on {p['images']} calibration images: max abs diff {p['max_abs_diff']:.3g}, cosine "
            f"{p['cosine']:.6f}, mean KL {p['mean_kl']:.2g} nats, top-1 agreement {100 * p['top1_agreement']:.1f}%")
    if "accuracy" in p:
        line += f", accuracy {100 * p['accuracy']:.1f}% (PyTorch {100 * p['reference_accuracy']:.1f}%)"
    return line


def _report_checked(report: dict, as_json: bool) -> int:
    """A file this machine cannot run (Core ML): what was checked, and that it was not run."""
    if as_json:
        print(json.dumps(report))
        return 0
    res, kind = report["resolution"], report["precision"]
    print(f"wrote {report['path']} ({report['format']}, {kind}, {res}x{res})")
    if kind == "int8":
        source = "int8-ready (equalized, bias-corrected)" if report["weights"] == "int8-ready" else "folded"
        weights = f"are PyTorch's {source} weights within {report['weights_max_steps']:.2f} of an int8 step"
    elif kind == "fp16":
        weights = f"are PyTorch's folded weights rounded to fp16 (max abs diff {report['weights_max_abs_diff']:.2g})"
    else:
        weights = "equal PyTorch's folded weights"
    head = f"{report['classes']} class labels" if report["classes"] else "features output"
    print(f"checked, not run: {report['why']}. The package: image input {res}x{res} RGB, {head}, "
          f"{report['convolutions']} convolutions; its {report['weight_tensors']} weight tensors {weights}")
    if "reference_evaluation" in report:
        print(_parity_line("its program evaluated op by op in PyTorch, not Core ML, vs PyTorch fp32",
                           report["reference_evaluation"]))
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    from .deploy import EXPORT_FORMATS, EXPORT_PRECISIONS
    from .deploy.tflite_graph import IO_TYPES

    p.description = ("Fold BatchNorm, write the model in --format at --precision (int8 calibrated on "
                     "--calib-data), reload it in its runtime and print its parity with PyTorch.")
    _add_weights_arguments(p)
    p.add_argument("--format", choices=EXPORT_FORMATS,
                   help="default: the one --out's suffix names (.onnx, .xml, .tflite, .pte, .mlpackage, .pt, .pt2); "
                        "onnx without a suffix")
    p.add_argument("--precision", choices=EXPORT_PRECISIONS,
                   help="default fp32; fp16 for coreml (whose int8 is weights only, with no calibration)")
    p.add_argument("--io", choices=IO_TYPES,
                   help="tflite int8 only: type of the file's input and output (default int8; float adds "
                        "QUANTIZE/DEQUANTIZE at the ends)")
    p.add_argument("--calib-data", metavar="DIR",
                   help="images for int8 calibration and the parity check (DIR/<class>/* gives accuracy too); "
                        "default: the built-in digits, for fp32 or a model made for them")
    p.add_argument("--calib-images", type=_positive_int, default=64, help="images to use (default 64)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output file (.onnx, .xml, .tflite, .pte, .mlpackage, .pt, .pt2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (int8 preparation, the write)")
    p.set_defaults(func=run_export)


def _csv(kind, choices=None, ok=None, allowed=""):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {allowed or kind.__name__}; got {text!r}")
        if choices:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        if ok and not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"must be comma-separated {allowed}; got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def run_benchmark(args) -> int:
    from pathlib import Path

    from . import benchmark, pick

    benchmark.check_arguments(batch_sizes=args.batch_size, floor_size=args.floor_size, rounds=args.rounds,
                              min_time=args.min_time)  # before a model is fitted or loaded
    benchmark.quiet()
    log = _progress(args)
    if args.grid:
        # measured afresh, and cached where `mobilenets pick` looks for it
        data, cache, _ = pick.cached_grid(precision=args.precision[0], batch_size=args.batch_size[0],
                                               backend=args.backend[0], remeasure=True, rounds=args.rounds,
                                               min_time=args.min_time, log=log)
        print(f"cached for 'mobilenets pick' in {cache}", file=sys.stderr)
        if args.plot:
            print(f"wrote {pick.plot_grid(data, Path(args.plot))}", file=sys.stderr)
        if args.json:
            _write_json(args.json, data)
        for r in data["rows"]:
            print(f"{r['model']:9} {r['mult_adds']:>12,} mult-adds  {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f}"
                  f"  {r['backend']}")
        return 0
    result = benchmark.benchmark_weights(weights=args.weights, checkpoint=args.checkpoint, alpha=_alpha_of(args),
                                         resolution=args.resolution, batch_sizes=args.batch_size,
                                         precisions=args.precision, backends=args.backend, peers=not args.no_peers,
                                         rounds=args.rounds, min_time=args.min_time, floor_size=args.floor_size,
                                         log=log)
    if args.json:
        _write_json(args.json, result)
    if args.plot:
        print(f"wrote {benchmark.plot(result, Path(args.plot))}", file=sys.stderr)
    if args.json != "-":
        print(benchmark.format_table(result))
    return 0


def add_benchmark(p: argparse.ArgumentParser) -> None:
    from .benchmark import MAX_BATCH, MAX_FLOOR_SIZE
    from .deploy import COMPILE_BACKENDS, PRECISIONS

    p.description = ("Median and p90 latency after warm-up, throughput, achieved mult-adds/s against "
                     "a 2048^3 matmul floor, parity with fp32 eager; peers timed in the same run.")
    _add_weights_arguments(p)
    p.add_argument("-b", "--batch-size", type=_csv(int, ok=lambda v: 1 <= v <= MAX_BATCH,
                                                   allowed=f"integers in [1, {MAX_BATCH}] such as 1,8,32"),
                   default=[1], help="comma-separated (default 1)")
    p.add_argument("--precision", type=_csv(str, PRECISIONS), default=["fp32"], help="comma-separated fp32,bf16,int8")
    p.add_argument("--backend", type=_csv(str, COMPILE_BACKENDS), default=["auto"],
                   help="our backends to time, comma-separated (default auto)")
    p.add_argument("--no-peers", action="store_true", help="time only ours")
    p.add_argument("--rounds", type=_positive_int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--min-time", type=positive_float, default=0.4, help="seconds per candidate per round")
    p.add_argument("--floor-size", type=_number(int, lambda v: 1 <= v <= MAX_FLOOR_SIZE,
                                                f"an integer in [1, {MAX_FLOOR_SIZE}]"),
                   default=2048, help="n of the n^3 matmul floor (default 2048)")
    p.add_argument("--grid", action="store_true", help="the 16 alpha x resolution models at the first "
                                                       "--precision/--batch-size/--backend: latency vs mult-adds")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': print JSON only)")
    p.add_argument("--plot", metavar="PNG", help="write a latency chart (with --grid: latency vs mult-adds)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run_benchmark)


def run_pick(args) -> int:
    from . import benchmark, pick

    benchmark.quiet()
    answer, data = pick.pick_model(args.latency_ms, precision=args.precision, batch_size=args.batch,
                                   backend=args.backend, runtime=args.runtime, remeasure=args.remeasure,
                                   device=args.device, accelerator=args.accelerator, plot=args.plot,
                                   log=_progress(args))
    if answer["measured_here"] and answer["out_of_order"]:
        pairs = ", ".join(f"{big} faster than {small}" for big, small in answer["out_of_order"][:3])
        print(f"mobilenets: warning: larger models measured faster than smaller ones ({pairs}): the machine was "
              f"busy while timing; run again with --remeasure when it is quiet", file=sys.stderr)
    if args.json:
        print(json.dumps(answer))
        return 0
    c, f = answer["choice"], answer["fastest"]
    if answer["measured_here"]:
        source = f"cached grid {answer['grid']}" if answer["cached"] else f"measured now, cached in {answer['grid']}"
        where = f"runtime {args.runtime} (its exported files)" if args.runtime else f"backend {args.backend or 'auto'}"
        print(f"{args.precision}, batch {args.batch}, {where}, measured on this machine ({source})")
        print(pick.format_pick(answer))
        if c:
            print(f"pick: {c['model']} (alpha {c['alpha']:g}, resolution {c['resolution']}): {c['median_ms']:.2f} ms "
                  f"<= {args.latency_ms:g} ms, published top-1 {c['accuracy']:.1f}%")
        else:
            print(f"no model fits {args.latency_ms:g} ms here; the fastest is {f['model']} at "
                  f"{f['median_ms']:.2f} ms (try --precision int8 or a larger --latency-ms)")
    else:
        device = f"{data['device']} {data['accelerator']}"
        print(f"published, not measured here: {data['description']}, {data['how']}, {args.precision}, batch 1 "
              f"(source: {data['source']}; docs/device-latency.md)")
        print(pick.format_pick(answer))
        if c:
            print(f"pick: {c['model']} (alpha {c['alpha']:g}, resolution {c['resolution']}): {c['latency_ms']:.1f} "
                  f"ms published for {device} <= {args.latency_ms:g} ms, published top-1 {c['accuracy']:.1f}% "
                  f"(published, not measured here)")
        else:
            print(f"no model fits {args.latency_ms:g} ms on {device}: the fastest published is {f['model']} at "
                  f"{f['latency_ms']:.1f} ms (try another --accelerator or --precision, or a larger --latency-ms)")
    if answer["plot"]:
        print(f"wrote {answer['plot']}")
    return 0 if c else 1


def add_pick(p: argparse.ArgumentParser) -> None:
    from .benchmark import MAX_BATCH
    from .deploy import COMPILE_BACKENDS, PRECISIONS
    from .device_latency import ACCELERATORS, DEVICES
    from .pick import DEVICE_RUNTIMES

    p.description = ("Measures (or reuses a cached measurement of) the 16 published models on this "
                     "machine and recommends the most accurate within --latency-ms, by the published "
                     "ImageNet top-1 (int8 column for --precision int8). --runtime times the files "
                     "an on-device runtime runs (LiteRT .tflite, ExecuTorch .pte) here; --device "
                     "picks from a phone's published latencies instead (not measured here).")
    p.add_argument("--latency-ms", type=positive_float, required=True, help="budget per batch, milliseconds")
    p.add_argument("--batch", type=_number(int, lambda v: 1 <= v <= MAX_BATCH, f"an integer in [1, {MAX_BATCH}]"),
                   default=1, help="batch size (default 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--backend", choices=COMPILE_BACKENDS, default=None,
                       help="compile with this backend in this process (default auto: the fastest here)")
    where.add_argument("--runtime", choices=DEVICE_RUNTIMES,
                       help="export each model as this runtime's file and time it in that runtime on this CPU "
                            "(executorch: in a fresh process)")
    where.add_argument("--device", metavar="NAME",
                       help=f"pick from this device's published latencies ({', '.join(DEVICES)}; "
                            f"docs/device-latency.md), not measured here")
    p.add_argument("--accelerator", choices=ACCELERATORS,
                   help="with --device: which published column (default cpu; int8 has cpu and nnapi)")
    p.add_argument("--remeasure", action="store_true", help="ignore the cached grid and measure again")
    p.add_argument("--plot", metavar="PNG", help="write an accuracy vs latency chart")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run_pick)


# ---------------------------------------------------------------- convert, predict


def run_convert(args) -> int:
    from . import weights

    print(json.dumps(weights.convert_file(args.src, args.out, source=args.source, keep_background=args.keep_background,
                                          resolution=args.resolution)))
    return 0


def add_convert(p: argparse.ArgumentParser) -> None:
    from .weights import SOURCES, SUFFIX_SOURCES

    p.description = ("Convert official weights to a .safetensors file that 'mobilenets.load' and "
                     "'--weights FILE' read; alpha, classes and the preprocessing go with it.")
    p.add_argument("src", help="Keras .h5 file; TF-slim checkpoint prefix, .index file, folder or .tgz; "
                              "frozen TensorFlow graph .pb (or the release .tgz with one); timm .pth/.bin/.safetensors; "
                              ".tflite (float or quantized)")
    p.add_argument("--from", dest="source", default=None, choices=SOURCES,
                   help="where the weights come from (default: "
                        + ", ".join(f"{source} for a {suffix}" for suffix, source in SUFFIX_SOURCES.items())
                        + ", else required)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the converted file")
    p.add_argument("--keep-background", action="store_true",
                   help="tf-slim, tf-frozen, tflite: keep class 0 ('background'), giving 1001 classes")
    p.add_argument("--resolution", type=resolution, default=None,
                   help="the resolution the weights were trained at (default: from the file name, else 224)")
    p.set_defaults(func=run_convert)


def run_predict(args) -> int:
    log = _progress(args)
    if log is not None and log.shows_bars:
        # before the weights load: on a busy machine the first line came 28-71 s after start, on a quiet one 4-6 s
        # (benchmarks/results/first_predict-*.md); what is left before it is Python, torch and the parser (~2.5 s)
        log.bar(f"predict: loading the model ({args.weights})")
    from . import predict

    model, resolution_override = predict.model_for(args.weights, alpha=args.alpha, resolution=args.resolution,
                                                   progress=not args.quiet)
    if args.ray is not None:
        return _predict_on_ray(args, model)
    calibration = args.calib_data if args.precision == "int8" else None
    skipped, answered = [], 0

    def skip(image, why):  # one line per unreadable file, and the run goes on
        skipped.append(image)
        print(f"mobilenets: error: {why if image in why else f'{image}: {why}'}", file=sys.stderr, flush=True)

    ctrl_c = _CtrlC()
    results = predict.predict(model, args.inputs, topk=args.topk, batch_size=args.batch_size,
                              resolution=resolution_override, precision=args.precision, backend=args.backend,
                              workers=args.workers, exact=args.exact, calibration=calibration,
                              log=log, on_skip=skip,
                              warn=lambda text: print(f"mobilenets: warning: {text}", file=sys.stderr, flush=True))
    with ctrl_c:
        if args.json:
            for r in results:
                ctrl_c.check()
                answered += 1
                print(json.dumps(r.to_dict()), flush=True)
        else:
            for line in predict.format_table(results):
                ctrl_c.check()
                answered += not line.startswith(" ")  # a block per image, its name first
                print(line, flush=True)
    # some images unreadable: 1 (the others were answered); all of them: 2, as any error that stops a command
    return (2 if not answered else 1) if skipped else 0


class _CtrlC:
    """Ctrl-C stops a run even when its KeyboardInterrupt is lost.  Python raises it wherever the main thread
    is, and raised inside a finalizer (a DataLoader iterator's ``__del__``, say) it is printed as "Exception
    ignored" and dropped: the run goes on.  (One CI run saw an interrupted ``predict`` finish with exit 0; this is
    the one way found for that.)  The handler remembers the signal, and :meth:`check` raises it again."""

    seen = False

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():  # only there can a handler be set
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGINT, self.previous)


def _predict_on_ray(args, model) -> int:
    from . import ray_predict

    # --ray takes an optional address, so `--ray SOURCE --out DIR` reads the source as the address: take it back
    address, inputs = (args.ray or None, args.inputs) if args.inputs else (None, [args.ray])
    if len(inputs) != 1 or not inputs[0] or args.out is None:
        raise UsageError("mobilenets predict --ray [ADDRESS] SOURCE --out DIR: one folder or URL, and --out")
    summary = ray_predict.predict_files(inputs[0], args.out, model, address=address, topk=args.topk,
                                        batch_size=args.batch_size, precision=args.precision, backend=args.backend,
                                        embedding=args.embedding, exact=args.exact, actors=args.actors,
                                        threads=args.threads,
                                        shard_size=args.shard_size or ray_predict.SHARD_SIZE,
                                        log=_progress(args))
    print(json.dumps(summary))
    return 0


def add_predict(p: argparse.ArgumentParser) -> None:
    p.description = ("Classify images with official or converted weights, preprocessed as the "
                     "weights expect (resize by resolution/0.875, centre crop, their mean/std).")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--weights", required=True, metavar="FILE|imagenet",
                   help="a converted .safetensors or training checkpoint, or 'imagenet' for the released weights")
    p.add_argument("--alpha", type=alpha, default=None,
                   help="with --weights imagenet: width multiplier 1.0, 0.75, 0.5 or 0.25 (default 1.0)")
    p.add_argument("--resolution", type=resolution, default=None,
                   help="with imagenet: 224, 192, 160 or 128 (default 224); with a FILE: override its resolution")
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--precision", choices=_Registry("deploy:PRECISIONS"), metavar="PRECISION", default="fp32",
                   help="how the model computes: %(choices)s (default fp32; int8 needs --calib-data unless the "
                        "weights are from 'mobilenets quantize')")
    p.add_argument("--backend", choices=_Registry("deploy:SERVE_BACKENDS"), metavar="BACKEND", default=None,
                   help="runtime: %(choices)s (default: eager PyTorch for a few images, else the fastest "
                        "measured, 'auto')")
    p.add_argument("--calib-data", metavar="DIR", default=None, help="images for int8 calibration")
    p.add_argument("--workers", type=_workers, default=None,
                   help="image decoding processes (default: one per core; 0 decodes in this process)")
    p.add_argument("--exact", action="store_true",
                   help="decode every pixel of large JPEGs (default: the coarsest DCT scale still >= twice the "
                        "resize size: about 2x faster on phone photos, answers as close to exact as TF-slim's)")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per image: {"image", "top": [{"class_index", "label", "probability"}]}')
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (downloads, int8 preparation)")
    ray = p.add_argument_group("on a Ray cluster (pip install 'mobilenets[ray]'; docs/distributed.md)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="classify SOURCE (a folder or fsspec URL: s3://, gs://, ...) on a Ray cluster "
                          "(ADDRESS: auto, HOST:PORT, ray://...; default RAY_ADDRESS or a local one)")
    ray.add_argument("--out", metavar="DIR", help="with --ray: Parquet shards go here; a second run skips "
                                                  "the shards already written")
    ray.add_argument("--embedding", action="store_true", help="with --ray: add the pooled features of each image")
    ray.add_argument("--actors", type=_positive_int, default=None, help="with --ray: models (default: the cluster's cores / threads)")
    ray.add_argument("--threads", type=_positive_int, default=None, help="with --ray: cores per model (default: from the nodes' cores)")
    ray.add_argument("--shard-size", type=_positive_int, default=None, help="with --ray: images per shard (default 1000)")
    p.set_defaults(func=run_predict)


def run_quantize(args) -> int:
    from .deploy import quantize_file

    print(json.dumps(quantize_file(args.weights, args.calib_data, args.out, calib_images=args.calib_images,
                                   steps=args.steps, method=args.method, log=_progress(args))))
    return 0


def add_quantize(p: argparse.ArgumentParser) -> None:
    from .quantize import METHODS

    p.description = ("Adjust the weights so their int8 version keeps the float answers, from "
                     "unlabeled images: equalization, bias correction, activation ranges by error, "
                     "and with --steps N fine-tuning against the float model's own outputs.")
    p.add_argument("--weights", required=True, metavar="FILE", help="converted weights (.safetensors) or a checkpoint")
    p.add_argument("--calib-data", required=True, metavar="DIR", help="a folder of unlabeled images (subfolders too)")
    p.add_argument("--calib-images", type=_positive_int, default=128, help="images to use (default 128)")
    p.add_argument("--steps", type=_number(int, lambda v: 0 <= v <= 100_000, "an integer in [0, 100000]"), default=0,
                   help="fine-tuning steps with fake quantization against the float model (default 0: post-training "
                        "only; kept only if it lowers the int8 model's divergence on the calibration images)")
    p.add_argument("--method", choices=METHODS, default="mse",
                   help="how activation ranges are chosen (default mse)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the int8-ready weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run_quantize)


# ---------------------------------------------------------------- main

# command -> (its one line in `mobilenets --help`, the function that adds its arguments)
COMMANDS = {
    "summary": ("per-layer cost table (Table 1 with mult-adds and params)", add_summary),
    "paper": ("recompute the paper's Tables 2-7 beside the printed values", add_paper),
    "train": ("train or fine-tune on an image folder (or the built-in digits)", add_train),
    "evaluate": ("top-1/top-5 of a checkpoint on an image folder", add_evaluate),
    "plot": ("loss and accuracy curves of a training run as PNG", add_plot),
    "export": ("write the model for ONNX Runtime, OpenVINO, LiteRT, ExecuTorch, Core ML, TorchScript or torch.export", add_export),
    "benchmark": ("latency and throughput beside timm, ONNX Runtime and OpenVINO", add_benchmark),
    "pick": ("the most accurate alpha x resolution model that fits a latency budget", add_pick),
    "convert": ("convert released weights (Keras .h5, TF-slim checkpoint, frozen .pb, timm, .tflite) to .safetensors", add_convert),
    "predict": ("classify images or folders of images", add_predict),
    "quantize": ("make weights int8-ready (equalization, bias correction, ranges, QAT)", add_quantize),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the command it names gets its arguments (the others only their line in
    the help): a command's options read registries from modules that import PyTorch (~2.5 s here, far more on a
    busy machine), and the command's first progress line should not wait for those of every other command."""
    from . import __version__

    parser = _Parser(prog="mobilenets", description="MobileNet v1: build, cost, train, load, deploy.")
    parser.add_argument("--version", action="version", version=f"mobilenets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # the command is the first word that is not an option: the top-level parser has no option taking a value
    named = next((word for word in (argv or []) if not word.startswith("-")), None) if argv is not None else None
    for name, (line, add) in COMMANDS.items():
        p = sub.add_parser(name, help=line)
        if argv is None or name == named:
            add(p)
    return parser


def _without_prog(message: str) -> str:
    """A message that starts with the program's name ("mobilenets: ...", "mobilenets train: ...") after
    "mobilenets: error: " names it once: "train: ..."."""
    if message.startswith("mobilenets: "):
        return message[len("mobilenets: "):]
    if message.startswith("mobilenets "):
        return message[len("mobilenets "):]
    return message


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting take the cores that image decoding, data loaders and other
    # processes need: on a busy machine that cost 10-100x. Passive waiting costs little when the machine is
    # quiet. It must be set before PyTorch's OpenMP runtime starts, hence here, before any import of torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(argv).parse_args(argv)
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe must fail here, inside the handler, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (`mobilenets predict ... | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    # Only what a user can fix is one line; any other exception is a bug in mobilenets and keeps its traceback.
    except (UsageError, MobilenetsError, OSError) as e:
        if os.environ.get("MOBILENETS_DEBUG"):
            raise
        print(f"mobilenets: error: {printable(_without_prog(str(e)))}", file=sys.stderr)  # one line, whatever a file name holds
        return 2
    except KeyboardInterrupt:
        print("mobilenets: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
