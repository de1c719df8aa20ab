"""The most images/s `predict` could reach on this machine: the CPU time one image costs, decoding plus model.

    .venv/bin/python benchmarks/predict_bound.py [--files 400] [--phone-files 60] [--batches 12]

Every core busy with nothing but this work, N cores give at most N / (decode + model) images/s,
where decode and model are CPU seconds per image.  Both are measured as CPU time of this process
with one thread (time.process_time: what the work costs, not how long a busy machine made it wait):

- decode: images.load_pixels + images.eval_transform (exact preprocessing, 224) per file of the
  folders of benchmarks/predict_throughput.py ("imagenet-like" 500x375, "phone" 4000x3000);
- model: deploy.compile(real MobileNet v1 1.0-224 weights, precision, batch_size=32) for each
  backend installed, per image of a batch of 32; the fastest backend counts.

The issue's targets are multiples of the faster peer's images/s in benchmarks/results/predict_throughput.json;
the bound says whether a target is reachable at all here.  Writes benchmarks/results/predict_bound.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(ROOT / "tests")]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_seconds(fn, repeat: int) -> float:
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--phone-files", type=int, default=60)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mobilenets
    from mobilenets import deploy, images
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    folders = {"imagenet-like 500x375": (make_folder(work / "imagenet-like", 1000, (500, 375), 1), args.files),
               "phone 4000x3000": (make_folder(work / "phone", 120, (4000, 3000), 2), args.phone_files)}
    weights, calib = real_weights_and_calibration(work)
    model = mobilenets.load(weights).eval()
    decode = {}
    for name, (folder, count) in folders.items():
        files = sorted((folder / "photos").glob("*.jpg"))[:count]
        images.eval_transform(images.load_pixels(files[-1]), 224)  # the decoder's import and first-call setup
        start = time.process_time()
        for f in files:
            images.eval_transform(images.load_pixels(f), 224)
        decode[name] = (time.process_time() - start) / len(files)
        print(f"decode {name}: {decode[name] * 1000:.2f} ms CPU per image", file=sys.stderr, flush=True)
    calibration, _ = deploy.image_batches(calib, 224)
    x = torch.cat(calibration)[:32]
    x = torch.cat([x] * (32 // len(x) + 1))[:32]
    model_s: dict = {}
    for precision in ("fp32", "int8"):
        model_s[precision] = {}
        for backend in deploy.available_backends():
            if not deploy.backend_supports(backend, precision) or backend in ("litert", "executorch"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predictor = deploy.compile(model, precision, calibration=calibration if precision == "int8" else None,
                                           batch_size=32, resolution=224, backend=backend)
            predictor(x)
            model_s[precision][backend] = cpu_seconds(lambda: predictor(x), args.batches) / 32
            print(f"model {precision} {backend}: {model_s[precision][backend] * 1000:.2f} ms CPU per image",
                  file=sys.stderr, flush=True)
    cores = len(os.sched_getaffinity(0))
    peers = json.loads((RESULTS / "predict_throughput.json").read_text())["summary"]
    rows = []
    for name in folders:
        peer = max(peers[name][p]["images_per_s"] for p in ("timm", "keras") if "error" not in peers[name][p])
        for precision, target in (("fp32", 2 if name.startswith("imagenet") else 5), ("int8", 4 if name.startswith("imagenet") else 5)):
            backend = min(model_s[precision], key=model_s[precision].get)
            bound = cores / (decode[name] + model_s[precision][backend])
            rows.append({"folder": name, "precision": precision, "backend": backend,
                         "decode_ms": decode[name] * 1000, "model_ms": model_s[precision][backend] * 1000,
                         "bound_images_per_s": bound, "faster_peer_images_per_s": peer, "target_multiple": target,
                         "bound_multiple": bound / peer})
    command = ".venv/bin/python " + " ".join(["benchmarks/predict_bound.py", *sys.argv[1:]])
    result = {"command": command, "cpu": cpu_name(), "cores": cores, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "decode_s": decode, "model_s": model_s, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict_bound.json").write_text(json.dumps(result, indent=1))
    lines = [f"# The most images/s predict could reach here ({result['date']})", "", f"    {command}", "",
             f"CPU: {result['cpu']}, {cores} cores. CPU milliseconds per image, one thread; bound = cores / "
             f"(decode + model); the faster peer's images/s from benchmarks/results/predict_throughput.json.", "",
             "| folder | precision | decode ms | model ms (fastest backend) | bound images/s | faster peer | "
             "bound / peer | target |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['precision']} | {r['decode_ms']:.2f} | {r['model_ms']:.2f} "
                     f"({r['backend']}) | {r['bound_images_per_s']:.0f} | {r['faster_peer_images_per_s']:.1f} | "
                     f"{r['bound_multiple']:.2f}x | {r['target_multiple']}x |")
    lines += ["", "Model CPU ms per image, every backend: " + "; ".join(
        f"{p} " + ", ".join(f"{b} {s * 1000:.2f}" for b, s in by.items()) for p, by in model_s.items())]
    (RESULTS / "predict_bound.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
