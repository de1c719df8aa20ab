"""Set-up and steady rate of a plain `mobilenets predict`, apart: 100, 1,000 and 10,000 ImageNet-size JPEGs, first
run (empty cache) and second run (the same cache), against Keras in the same run.

    PYTHONPATH=src .venv/bin/python benchmarks/predict_setup.py [--counts 100,1000,10000] [--rounds 1]

Issue 24: 1,000 JPEGs took 15.7 s end to end against Keras's 15.6 s; the steady rate led, set-up ate the
lead (the ONNX graph was exported again on every run).  Each run here is a fresh process, timed from the
parent: wall seconds from start to exit; the steady rate from the answer to the first quarter of the files
to the last (stdout lines, one per image, flushed: `--json`); set-up = wall - images / steady rate, the
time the steady rate does not explain (imports, weights, choosing and building the runtime, the first
batches).  mobilenets runs as a user types it (defaults), and with `--backend onnxruntime` (what auto's cached
choice was in the issue: its build is the ONNX export the cache now keeps), each first with an empty cache
folder, then again on that folder.  Keras: keras.utils.image_dataset_from_directory + keras.applications.MobileNet
.predict_on_batch (benchmarks/predict_throughput.py's runner), its steady rate from its own answers.
Last, `deploy.compile` alone for each runtime that keeps its build, first and second, in fresh processes.
The folders are 500x375 JPEGs cut from the real photos packages ship (predict_throughput.make_folder);
the weights Google's MobileNet v1 1.0-224.

Writes benchmarks/results/predict_setup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"
FLAGS = {"mobilenets (defaults)": [], "mobilenets --backend onnxruntime": ["--backend", "onnxruntime"]}


def steady(times: list[float], count: int) -> float:
    """Images/s from the answer to the first quarter of the files to the last."""
    k = count // 4
    if len(times) < 2 or times[-1] <= times[k]:
        return float("nan")
    return (len(times) - 1 - k) / (times[-1] - times[k])


def run_mobilenets(folder: Path, weights: Path, flags: list[str], cache: Path) -> dict:
    env = {**os.environ, "MOBILENETS_CACHE": str(cache), "MOBILENETS_PROGRESS": "1", "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "mobilenets", "predict", "--weights", str(weights), str(folder),
                          "--json", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(p.stderr))  # drained alongside stdout
    reader.start()
    answers = [time.perf_counter() - t0 for _ in p.stdout]
    reader.join()
    p.wait()
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not answers:
        return {"error": [line.rstrip() for line in err[-3:]]}
    chosen = next((line.strip() for line in reversed(err) if line.startswith("auto:") and "[" not in line), "")
    rate = steady(answers, len(answers))
    return {"images": len(answers), "wall_s": round(wall, 2), "first_answer_s": round(answers[0], 2),
            "steady_images_per_s": round(rate, 1), "setup_s": round(wall - len(answers) / rate, 2),
            "end_to_end_images_per_s": round(len(answers) / wall, 1), "auto": chosen}


def run_keras(folder: Path) -> dict:
    from predict_throughput import FOOTER, RUNNERS

    count = len(list((folder / "photos").glob("*.jpg")))
    script = f"FOLDER = {str(folder)!r}\nK = {count // 4}\n" + textwrap.dedent(RUNNERS["keras"]) + FOOTER
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    r = json.loads(lines[-1][7:])
    rate = r["steady_images"] / r["steady_s"]
    return {"images": r["images"], "wall_s": round(wall, 2), "first_answer_s": None,
            "steady_images_per_s": round(rate, 1), "setup_s": round(wall - r["images"] / rate, 2),
            "end_to_end_images_per_s": round(r["images"] / wall, 1)}


COMPILE = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch, mobilenets
from mobilenets import deploy
from mobilenets.deploy import backend as registry
model = mobilenets.load(WEIGHTS)
registry.get(BACKEND).available()  # its import is not the build
t0 = time.perf_counter()
predictor = deploy.compile(model, "fp32", batch_size=32, backend=BACKEND)
print("RESULT " + json.dumps({"compile_s": time.perf_counter() - t0}))
"""


def time_compile(backend: str, weights: Path, cache: Path) -> float | None:
    """Seconds of ``deploy.compile(model, "fp32", batch_size=32, backend=backend)`` in a fresh process, imports
    and weights excluded."""
    script = f"WEIGHTS = {str(weights)!r}\nBACKEND = {backend!r}\n" + COMPILE
    env = {**os.environ, "MOBILENETS_CACHE": str(cache), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return round(json.loads(lines[-1][7:])["compile_s"], 2) if lines else None


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-keras", action="store_true")
    ap.add_argument("--compile-backends", default="onnxruntime,openvino,litert",
                    help="also time deploy.compile alone, first and second, for these backends ('' for none)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mobilenets-predict-setup"))
    ap.add_argument("--name", default="predict_setup")
    args = ap.parse_args()
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    counts = [int(c) for c in args.counts.split(",") if c]
    weights, _ = real_weights_and_calibration(work)
    folders = {n: make_folder(work / f"imagenet-like-{n}", n, (500, 375), seed=1) for n in counts}
    command = "PYTHONPATH=src .venv/bin/python " + " ".join(["benchmarks/predict_setup.py", *sys.argv[1:]])
    load_before = uptime()
    print(load_before, file=sys.stderr, flush=True)
    runs = []
    for round_ in range(args.rounds):
        for n in counts:
            for label, flags in FLAGS.items():
                with tempfile.TemporaryDirectory(prefix="predict-setup-cache-") as cache:
                    for which in ("first (empty cache)", "second (warm cache)"):
                        r = {"round": round_, "images": n, "candidate": label, "run": which, "load": uptime(),
                             **run_mobilenets(folders[n] / "photos", weights, flags, Path(cache))}
                        runs.append(r)
                        print(json.dumps(r), file=sys.stderr, flush=True)
            if not args.no_keras:
                r = {"round": round_, "images": n, "candidate": "keras", "run": "-", "load": uptime(),
                     **run_keras(folders[n])}
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    compiles = []
    for backend in [b for b in args.compile_backends.split(",") if b]:
        with tempfile.TemporaryDirectory(prefix="predict-setup-compile-") as cache:
            first, load = time_compile(backend, weights, Path(cache)), uptime()
            second = time_compile(backend, weights, Path(cache))
        compiles.append({"backend": backend, "first_s": first, "second_s": second, "load": load})
        print(json.dumps(compiles[-1]), file=sys.stderr, flush=True)
    load_after = uptime()
    result = {"compiles": compiles, "command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_before,
              "load_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}
    from mobilenets.atomic import atomic_write

    atomic_write(RESULTS / f"{args.name}.json", lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    lines = [f"# `mobilenets predict`: set-up and steady rate apart ({result['date']})", "",
             f"    {command}", "", f"CPU: {result['cpu']} ({result['cores']} cores), shared with other sessions.",
             f"Load before: `{load_before}`", f"Load after: `{load_after}`", "",
             "Set-up s = wall - images / steady rate (imports, weights, choosing and building the runtime, the first "
             "batches); steady images/s from the answer to the first quarter of the files to the last. Each run a "
             "fresh process; the second mobilenets run of each pair uses the first one's cache folder.", "",
             "| images | candidate | run | wall s | set-up s | first answer s | steady images/s | end to end images/s "
             "| auto's choice | load (1 min) |", "|---:|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in runs:
        load1 = r["load"].split("load average:")[-1].split(",")[0].strip()
        if "error" in r:
            lines.append(f"| {r['images']} | {r['candidate']} | {r['run']} | failed: {r['error']} | | | | | | {load1} |")
            continue
        lines.append(f"| {r['images']} | {r['candidate']} | {r['run']} | {r['wall_s']} | {r['setup_s']} | "
                     f"{r['first_answer_s'] if r['first_answer_s'] is not None else '-'} | "
                     f"{r['steady_images_per_s']} | {r['end_to_end_images_per_s']} | {r.get('auto') or '-'} | {load1} |")
    if compiles:
        lines += ["", "`deploy.compile(model, \"fp32\", batch_size=32, backend=B)` alone (imports and weights excluded), "
                  "each in a fresh process: with an empty cache folder, then again on it.", "",
                  "| backend | first compile s | second compile s | load (1 min) |", "|---|---:|---:|---:|"]
        for c in compiles:
            load1 = c["load"].split("load average:")[-1].split(",")[0].strip()
            lines.append(f"| {c['backend']} | {c['first_s']} | {c['second_s']} | {load1} |")
    atomic_write(RESULTS / f"{args.name}.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
