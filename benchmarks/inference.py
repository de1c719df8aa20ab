"""The deployment benchmark behind README "Deploy": ours against the peers, same run, same weights.

    flock /tmp/mobilenets-bench.lock .venv/bin/python benchmarks/inference.py [--quick] [--grid]

Writes benchmarks/results/inference.{json,md,png} (and grid-*.{json,png} with
--grid).  Times are medians over interleaved rounds, so load from other
processes falls on every candidate alike; compare ratios within one run.
OMP_WAIT_POLICY=PASSIVE (set before torch loads, for every PyTorch candidate
alike, timm's included) keeps PyTorch's OpenMP threads from spinning on a
shared CPU: without it, one busy neighbour makes every PyTorch call 10-100x slower.  On a quiet
machine passive waiting costs PyTorch's many short parallel regions; --omp-default keeps OpenMP's
default (spin, then sleep) to measure that case.
"""

import os
import sys

if "--omp-default" not in sys.argv:  # must be decided before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from mobilenets import benchmark, pick  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--grid", action="store_true", help="also time the 16 alpha x resolution models (fp32, batch 1)")
    ap.add_argument("--grid-precisions", default="fp32")
    ap.add_argument("--name", default="inference")
    ap.add_argument("--omp-default", action="store_true", help="leave OMP_WAIT_POLICY unset (OpenMP's default)")
    args = ap.parse_args()
    benchmark.quiet()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    command = "flock /tmp/mobilenets-bench.lock .venv/bin/python " + " ".join(["benchmarks/inference.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    before = uptime()
    t0 = time.time()
    result = benchmark.benchmark(alpha=args.alpha, resolution=args.resolution,
                                 batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                                 precisions=args.precisions.split(","), backends=("auto", "torch"),
                                 rounds=args.rounds, min_time=args.min_time, log=log)
    result["command"] = command
    result["uptime_before"], result["uptime_after"] = before, uptime()
    result["wall_s"] = time.time() - t0
    result["env"] = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    benchmark.plot(result, RESULTS / f"{args.name}.png")
    table = benchmark.format_table(result)
    (RESULTS / f"{args.name}.txt").write_text(
        f"$ {command}\n{result['machine']['date']}\nuptime before: {before}\nuptime after:  {result['uptime_after']}\n"
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; the CPU was shared with other agents' jobs\n\n{table}\n")
    print(table)
    if args.grid:
        for precision in args.grid_precisions.split(","):
            before = uptime()
            g = pick.grid(precision=precision, batch_size=1, backend="auto", log=log)
            g["command"], g["uptime_before"], g["uptime_after"] = command, before, uptime()
            (RESULTS / f"grid-{precision}.json").write_text(json.dumps(g, indent=1))
            pick.plot_grid(g, RESULTS / f"grid-{precision}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
