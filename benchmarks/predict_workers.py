"""How many decoding processes `predict` should start: its steady images/s with 1 and with 2 workers.

    nice .venv/bin/python benchmarks/predict_workers.py [--rounds 2] [--files 400] [--phone-files 120]

fp32 (deploy.compile's fastest runtime), real MobileNet v1 1.0-224 weights, exact decoding, on
the folders of benchmarks/predict_throughput.py (the first FILES / PHONE_FILES of its
"imagenet-like" 500x375 and "phone" 4000x3000 JPEGs); each run in a fresh process, settings
interleaved round by round; the rate counts from the 32nd answer to the last.  On 2 cores
this chose pipeline.default_workers's one worker per core.  Writes
benchmarks/results/predict_workers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
RESULTS = ROOT / "benchmarks" / "results"

RUN = """
import json, sys, time, mobilenets
from mobilenets.predict import predict
model = mobilenets.load(sys.argv[1])
n, start = 0, None
for r in predict(model, sys.argv[2:-1], topk=1, workers=int(sys.argv[-1])):
    n += 1
    if n == 32:
        start = time.perf_counter()
print("RESULT " + json.dumps((n - 32) / (time.perf_counter() - start)))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--phone-files", type=int, default=120)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    folders = {"imagenet-like 500x375": make_folder(work / "imagenet-like", 1000, (500, 375), 1),
               "phone 4000x3000": make_folder(work / "phone", 120, (4000, 3000), 2)}
    counts = {"imagenet-like 500x375": args.files, "phone 4000x3000": args.phone_files}
    weights, _ = real_weights_and_calibration(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    before = os.getloadavg()
    rates: dict = {f: {1: [], 2: []} for f in folders}
    for round_ in range(args.rounds):
        for name, folder in folders.items():
            files = [str(p) for p in sorted((folder / "photos").glob("*.jpg"))[:counts[name]]]
            for workers in (1, 2):
                done = subprocess.run([sys.executable, "-c", RUN, str(weights), *files, str(workers)],
                                      capture_output=True, text=True, env=env, timeout=3600)
                lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"{name}, {workers} workers failed: {done.stderr.strip()[-500:]}")
                rates[name][workers].append(json.loads(lines[-1][7:]))
                print(f"round {round_ + 1} {name} {workers} workers: {rates[name][workers][-1]:.1f} images/s",
                      file=sys.stderr, flush=True)
    command = "nice .venv/bin/python " + " ".join(["benchmarks/predict_workers.py", *sys.argv[1:]])
    result = {"command": command, "cpu": cpu_name(), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": [before, os.getloadavg()],
              "images": counts, "rates": rates}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict_workers.json").write_text(json.dumps(result, indent=1))
    lines = [f"# predict's decoding processes: 1 or 2 workers ({result['date']})", "", f"    {command}", "",
             f"CPU: {result['cpu']} ({result['cores']} cores); load average before {before[0]:.2f}, after "
             f"{result['loadavg'][1][0]:.2f}. fp32, exact decoding; steady images/s, median of {args.rounds} "
             f"interleaved rounds (every round's figure in brackets).", "",
             "| folder | images | 1 worker | 2 workers | 2 / 1 |", "|---|---:|---:|---:|---:|"]
    for name, by in rates.items():
        one, two = statistics.median(by[1]), statistics.median(by[2])
        lines.append(f"| {name} | {counts[name]} | {one:.1f} [{', '.join(f'{r:.1f}' for r in by[1])}] | "
                     f"{two:.1f} [{', '.join(f'{r:.1f}' for r in by[2])}] | {two / one:.2f} |")
    (RESULTS / "predict_workers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
