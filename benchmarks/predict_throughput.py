"""End to end, image files to labels: `mobilenets predict` against the timm and Keras pipelines, same files, one run.

    .venv/bin/python benchmarks/predict_throughput.py [--files 1000] [--phone-files 100] [--rounds 3]

Writes benchmarks/results/predict_throughput.{json,md}.  Two folders are made
from the real photos that packages ship (tests/real_data.py: scikit-image's
and matplotlib's): "imagenet-like", 500x375 JPEGs (quality 90), and "phone",
4000x3000 JPEGs.  The weights are Google's MobileNet v1 1.0-224 (the frozen
graph of tests/real_data.py); the peers run the same architecture with their
own initialisation (speed does not depend on the values).

Every candidate runs in a fresh process, in interleaved rounds (each round runs
every candidate once on each folder), so a neighbour's load falls on all alike.
Reported per candidate: setup (import, model build, compile), the steady images/s
(from the answer to the first quarter of the files to the last), end-to-end images/s, and peak memory.  Candidates:

- timm: create_model + resolve_data_config/create_transform + torchvision
  ImageFolder + DataLoader (2 workers), channels_last, inference_mode.
- keras: keras.utils.image_dataset_from_directory + keras.applications.MobileNet
  .predict (TensorFlow backend).
- mobilenets fp32 / int8: mobilenets.predict.predict on the folder (its
  defaults: decoding workers, reduced-scale JPEG decoding (results/predict_throughput.md
  predates it: exact decoding), deploy.compile's fastest
  runtime; int8 calibrated on 64 crops of the same photos, never the
  benchmark files).

What reduced-scale JPEG decoding (predict's default; --exact decodes every pixel) does to the
answers is measured by benchmarks/decode_agreement.py and benchmarks/jpeg_draft.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def make_folder(folder: Path, count: int, size: tuple[int, int], seed: int) -> Path:
    """``count`` JPEGs of ``size`` (w, h; a quarter of them portrait) cut from the packaged photos."""
    import real_data

    target = folder / "photos"
    if target.is_dir() and len(list(target.glob("*.jpg"))) == count:
        return folder
    target.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(a) for _, a in real_data.photos()]
    rng = np.random.default_rng(seed)
    for k in range(count):
        im = photos[int(rng.integers(len(photos)))]
        w, h = size if k % 4 else size[::-1]
        # the largest box of aspect w:h inside the photo, scaled by 50-100%, anywhere
        s = min(im.width / w, im.height / h) * rng.uniform(0.5, 1.0)
        bw, bh = w * s, h * s
        left, top = rng.uniform(0, im.width - bw), rng.uniform(0, im.height - bh)
        crop = im.resize((w, h), Image.BICUBIC, box=(left, top, left + bw, top + bh))
        if rng.integers(2):
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(target / f"{k:05d}.jpg", quality=90)
    return folder


def real_weights_and_calibration(work: Path) -> tuple[Path, Path]:
    """The real 1.0-224 weights as our file, and a folder of 64 calibration crops (never benchmark files)."""
    import real_data
    from mobilenets import weights as weights_module

    weights = work / "real-1.0-224.safetensors"
    if not weights.is_file():
        work.mkdir(parents=True, exist_ok=True)
        weights_module.save(real_data.real_converted(), weights)
    calib = work / "calibration"
    if not calib.is_dir():
        calib.mkdir(parents=True)
        for k, crop in enumerate(real_data.calibration_crops(64, size=256)):
            Image.fromarray(crop).save(calib / f"{k:03d}.png")
    return weights, calib


RUNNERS = {
    "timm": """
import time, json, resource, torch, timm
from timm.data import resolve_data_config, create_transform
from torchvision.datasets import ImageFolder
t0 = time.perf_counter()
model = timm.create_model("mobilenetv1_100", pretrained=False).eval().to(memory_format=torch.channels_last)
transform = create_transform(**resolve_data_config({}, model=model))
loader = torch.utils.data.DataLoader(ImageFolder(FOLDER, transform), batch_size=32, num_workers=2)
setup = time.perf_counter() - t0
n, first, mark, marked = 0, None, None, 0
with torch.inference_mode():
    for x, _ in loader:
        labels = model(x.contiguous(memory_format=torch.channels_last)).argmax(1)
        first = first or time.perf_counter()
        n += len(labels)
        if n >= K and mark is None:
            mark, marked = time.perf_counter(), n
""",
    "keras": """
import os, time, json, resource
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras
t0 = time.perf_counter()
model = keras.applications.MobileNet(weights=None)
ds = keras.utils.image_dataset_from_directory(FOLDER, labels=None, image_size=(224, 224), batch_size=32,
                                              shuffle=False, verbose=False)
ds = ds.map(keras.applications.mobilenet.preprocess_input)
setup = time.perf_counter() - t0
n, first, mark, marked = 0, None, None, 0
for x in ds:
    labels = model.predict_on_batch(x).argmax(1)
    first = first or time.perf_counter()
    n += len(labels)
    if n >= K and mark is None:
        mark, marked = time.perf_counter(), n
""",
    "mobilenets fp32": """
import time, json, resource, mobilenets
from mobilenets.predict import predict
t0 = time.perf_counter()
model = mobilenets.load(WEIGHTS)
results = predict(model, FOLDER, topk=1)
n, first, mark, marked = 0, None, None, 0
for r in results:
    if first is None:
        first = time.perf_counter()
        setup = first - t0  # the first answer includes compiling: count it as setup
    n += 1
    if n >= K and mark is None:
        mark, marked = time.perf_counter(), n
""",
    "mobilenets int8": """
import time, json, resource, mobilenets
from mobilenets.predict import predict
t0 = time.perf_counter()
model = mobilenets.load(WEIGHTS)
results = predict(model, FOLDER, topk=1, precision="int8", calibration=CALIB)
n, first, mark, marked = 0, None, None, 0
for r in results:
    if first is None:
        first = time.perf_counter()
        setup = first - t0
    n += 1
    if n >= K and mark is None:
        mark, marked = time.perf_counter(), n
""",
}
FOOTER = """
end = time.perf_counter()
print("RESULT " + json.dumps({"setup_s": setup, "images": n, "run_s": end - first, "total_s": end - t0,
                               "steady_images": n - marked, "steady_s": end - mark,
                               "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_candidate(name: str, folder: Path, weights: Path, calib: Path) -> dict:
    count = len(list((folder / "photos").glob("*.jpg")))
    # steady rate: from the answer to the first quarter of the images to the last, past every prefetch window
    script = (f"FOLDER = {str(folder)!r}\nWEIGHTS = {str(weights)!r}\nCALIB = {str(calib)!r}\n"
              f"K = {count // 4}\n")
    script += textwrap.dedent(RUNNERS[name]) + FOOTER
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    r = json.loads(lines[-1][7:])
    r["images_per_s"] = r["steady_images"] / r["steady_s"] if r["steady_s"] > 0 else float("nan")
    r["end_to_end_images_per_s"] = r["images"] / r["total_s"]
    return r


def plot(result: dict, path: Path) -> Path:
    """Steady and end-to-end images/s per candidate, one panel per folder, each on its own linear scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = list(result["summary"])
    fig, axes = plt.subplots(1, len(folders), figsize=(6 * len(folders), 4.0), squeeze=False)
    for ax, fname in zip(axes[0], folders):
        rows = {c: r for c, r in result["summary"][fname].items() if "error" not in r}
        names = list(rows)
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], [rows[c]["images_per_s"] or 0 for c in names], height=0.4, label="steady")
        ax.barh([i - 0.2 for i in y], [rows[c]["end_to_end_images_per_s"] for c in names], height=0.4,
                label="end to end (setup included)")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set_xlabel("images / s")
        ax.set_title(fname if all(rows[c]["images_per_s"] is not None for c in names)
                     else f"{fname}\n(end to end only: too few files for a steady rate)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Image files to labels, MobileNet v1 1.0-224, {result['cpu']} ({result['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# What predict and timm's loader keep decoded ahead on 2 cores: 2 batches of 32 per worker, a worker per core.
# A steady window of no more than twice this is mostly answers decoded before it began: not a rate.
PREFETCH_IMAGES = 2 * 2 * 32


def summarise(runs: dict) -> dict:
    """Per folder and candidate, the medians over rounds; the steady rate only where its window is long enough
    (PREFETCH_IMAGES), and the ratio to the faster peer on the steady rate, else end to end."""
    summary = {}
    for fname, by_candidate in runs.items():
        rows = {}
        for c, rs in by_candidate.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                rows[c] = {"error": rs[-1]["error"]}
                continue
            rows[c] = {k: statistics.median(r[k] for r in ok)
                       for k in ("images_per_s", "end_to_end_images_per_s", "setup_s", "maxrss_mb",
                                 "children_maxrss_mb", "steady_images")}
            if rows[c]["steady_images"] <= 2 * PREFETCH_IMAGES:
                rows[c]["images_per_s"] = None
        good = {c: r for c, r in rows.items() if "error" not in r}
        key = "images_per_s" if all(r["images_per_s"] is not None for r in good.values()) else "end_to_end_images_per_s"
        peers = [good[p][key] for p in ("timm", "keras") if p in good]
        for c, r in good.items():
            if peers:
                r["vs_faster_peer"] = r[key] / max(peers)
        summary[fname] = rows
    return summary


def report(result: dict) -> list[str]:
    lines = [f"# Image files to labels, end to end ({result['date']})", "",
             f"    {result['command']}", "",
             f"CPU: {result['cpu']} ({result['cores']} cores); load average before {result['loadavg_before'][0]:.2f}, "
             f"after {result['loadavg_after'][0]:.2f}. Medians of {result['rounds']} interleaved rounds; "
             f"each candidate in a fresh process.", "",
             "images/s: steady rate, from the answer to the first quarter of the files to the last (n/a where those "
             f"are no more than {2 * PREFETCH_IMAGES} files: the workers decode up to {PREFETCH_IMAGES} ahead, so most "
             "would be ready before the window opens); end to end: all files over the whole run, setup (imports, "
             "model build, compiling) included. vs faster peer: on the steady rate, or end to end where it is n/a.",
             "",
             "| folder | candidate | images/s | vs faster peer | end to end images/s | setup s | peak RSS MB (main / workers) |",
             "|---|---|---|---|---|---|---|"]
    for fname, rows in result["summary"].items():
        for c, r in rows.items():
            if "error" in r:
                lines.append(f"| {fname} | {c} | failed: {r['error']} | | | | |")
                continue
            ratio = f"{r['vs_faster_peer']:.2f}x" if "vs_faster_peer" in r else ""
            steady = "n/a" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
            lines.append(f"| {fname} | {c} | {steady} | {ratio} | {r['end_to_end_images_per_s']:.1f} | "
                         f"{r['setup_s']:.1f} | "
                         f"{r['maxrss_mb']:.0f} / {r['children_maxrss_mb']:.0f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--phone-files", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--candidates", default=",".join(RUNNERS))
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    ap.add_argument("--name", default="predict_throughput")
    ap.add_argument("--plot-only", action="store_true", help="redo the table and the PNG from the JSON of --name")
    args = ap.parse_args()
    if args.plot_only:  # the table and the PNG again from the JSON's runs (after a change to how they are summarised)
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        result["summary"] = summarise(result["runs"])
        (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (RESULTS / f"{args.name}.md").write_text("\n".join(report(result)) + "\n")
        print(plot(result, RESULTS / f"{args.name}.png"))
        return 0
    work = Path(args.work)
    folders = {"imagenet-like 500x375": make_folder(work / "imagenet-like", args.files, (500, 375), 1),
               "phone 4000x3000": make_folder(work / "phone", args.phone_files, (4000, 3000), 2)}
    weights, calib = real_weights_and_calibration(work)
    candidates = args.candidates.split(",")
    command = "nice -n 0 .venv/bin/python " + " ".join(["benchmarks/predict_throughput.py", *sys.argv[1:]])
    before = os.getloadavg()
    runs: dict = {f: {c: [] for c in candidates} for f in folders}
    for round_ in range(args.rounds):
        for fname, folder in folders.items():
            for c in candidates:
                r = run_candidate(c, folder, weights, calib)
                print(f"round {round_ + 1} {fname:24s} {c:18s} {r}", file=sys.stderr, flush=True)
                runs[fname][c].append(r)
    summary = summarise(runs)
    result = {"command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg_before": before, "loadavg_after": os.getloadavg(), "files": args.files,
              "phone_files": args.phone_files, "rounds": args.rounds, "summary": summary, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = report(result)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
