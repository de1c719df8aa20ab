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


class UsageError(Exception):
    """A mistake in the command line or its inputs that the user can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0 such as 1.0, 0.75, 0.5, 0.25; got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 such as 1.0, 0.75, 0.5, 0.25; got {text!r}")
    return value


def resolution(text: str) -> int:
    from .architecture import MIN_RESOLUTION

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= {MIN_RESOLUTION} such as 224, 192, 160, 128; got {text!r}") from None
    if value < MIN_RESOLUTION:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= {MIN_RESOLUTION} such as 224, 192, 160, 128; got {text!r}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=positive_float, default=1.0, help="width multiplier (default 1.0)")
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


def add_summary(sub) -> None:
    p = sub.add_parser("summary", help="per-layer cost table (Table 1 with mult-adds and params)")
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


def add_paper(sub) -> None:
    p = sub.add_parser("paper", help="recompute the paper's Tables 2-7 beside the printed values")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="DIR", help="write Figures 4 and 5 as PNG files into DIR")
    p.set_defaults(func=run_paper)


# ---------------------------------------------------------------- main

COMMANDS = [add_summary, add_paper]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mobilenets", description="MobileNet v1: build, cost, train, load, deploy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, TypeError, OSError) as e:
        if os.environ.get("MOBILENETS_DEBUG"):
            raise
        print(f"mobilenets: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobilenets: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
