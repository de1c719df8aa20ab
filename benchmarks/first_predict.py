"""A new user's first `mobilenets predict` of a folder of photos: default flags against --backend eager.

    PYTHONPATH=src .venv/bin/python benchmarks/first_predict.py [--files 300] [--rounds 2]

Issue 22 saw the first predict of 300 photos take 125 s, silent, where --backend eager took 37 s:
backend "auto" measured every runtime first.  Now auto measures only what pays for itself in the job
(mobilenets.deploy.auto).  Each round runs both commands in a fresh process, in alternating order, each
with an empty cache folder (a first run: no cached choice, no build times seen), on the same folder of
500x375 JPEGs cut from the real photos packages ship (benchmarks/predict_throughput.py's folder), with
Google's MobileNet v1 1.0-224 weights.  Reported per run: wall seconds, seconds until the first progress
line on stderr (MOBILENETS_PROGRESS=1), and the backend auto chose; the load (uptime) before and after.

Writes benchmarks/results/first_predict.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"


def run(folder: Path, weights: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="first-predict-cache-") as cache:
        env = {**os.environ, "MOBILENETS_CACHE": cache, "MOBILENETS_PROGRESS": "1",
               "PYTHONPATH": str(ROOT / "src")}
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "mobilenets", "predict", "--weights", str(weights),
                              str(folder), "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        out = []
        reader = threading.Thread(target=lambda: out.append(p.stdout.read()))  # drained alongside stderr
        reader.start()
        first_line = None
        err = []
        for line in p.stderr:
            if first_line is None:
                first_line = time.perf_counter() - t0
            err.append(line.rstrip("\n"))
        reader.join()
        out = out[0]
        p.wait()
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"predict {extra} failed ({p.returncode}): {err[-3:]}")
    # auto's decision line (its progress lines carry a bar)
    chosen = next((line for line in reversed(err) if line.startswith("auto:") and "[" not in line), "")
    return {"args": extra, "wall_s": round(wall, 2), "first_progress_s": first_line and round(first_line, 2),
            "answers": out.count("\n"), "auto": chosen}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. busy, quiet)")
    args = ap.parse_args()
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(tempfile.gettempdir()) / "mobilenets-first-predict"
    folder = make_folder(work / f"files-{args.files}", args.files, (500, 375), seed=22) / "photos"
    weights, _ = real_weights_and_calibration(work)
    load_before = uptime()
    runs = []
    for r in range(args.rounds):
        for extra in ([], ["--backend", "eager"]) if r % 2 == 0 else (["--backend", "eager"], []):
            runs.append({"round": r, **run(folder, weights, extra)})
            print(json.dumps(runs[-1]), flush=True)
    load_after = uptime()
    default = [x["wall_s"] for x in runs if not x["args"]]
    eager = [x["wall_s"] for x in runs if x["args"]]
    ratio = sum(default) / sum(eager)
    result = {"cpu": cpu_name(), "files": args.files, "load_before": load_before, "load_after": load_after,
              "runs": runs, "default_over_eager": round(ratio, 3)}
    tag = f"-{args.tag}" if args.tag else ""
    from mobilenets.atomic import atomic_write

    atomic_write(RESULTS / f"first_predict{tag}.json", lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    lines = [f"# First predict of {args.files} photos: default flags against --backend eager", "",
             f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/first_predict.py --files {args.files} "
             f"--rounds {args.rounds}{' --tag ' + args.tag if args.tag else ''}`", "",
             f"CPU: {result['cpu']}", f"Load before: `{load_before}`", f"Load after: `{load_after}`", "",
             "| round | flags | wall s | first progress line s | auto's choice |", "|---|---|---|---|---|"]
    for x in runs:
        lines.append(f"| {x['round']} | {' '.join(x['args']) or '(defaults)'} | {x['wall_s']} | "
                     f"{x['first_progress_s']} | {x['auto'] or '-'} |")
    lines += ["", f"Default over eager, total wall time: {ratio:.3f}"]
    atomic_write(RESULTS / f"first_predict{tag}.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print(f"default / eager = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
