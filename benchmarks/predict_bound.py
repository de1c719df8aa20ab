"""The most images/s `predict` could reach on this machine: the CPU time one image costs, decoding plus model.

    .venv/bin/python benchmarks/predict_bound.py [--files 400] [--phone-files 60] [--batches 12]

Every core busy with nothing but this work, N cores give at most N / (decode + model) images/s,
where decode and model are CPU seconds per image.  Both are measured as CPU time of this process
with one thread (time.process_time: what the work costs, not how long a busy machine made it wait):

- decode: images.load_pixels + images.eval_pixels (224), what predict's decoding workers do (a JPEG decoded at
  the coarsest DCT scale keeping the resize size, images.draft_side), the least of 3 passes, per file of the
  folders of benchmarks/predict_throughput.py ("imagenet-like" 500x375, decoded whole; "phone" 4000x3000, at 1/8);
- model: deploy.compile(real MobileNet v1 1.0-224 weights, precision, batch_size=32) for each
  backend installed, run as predict runs it (Predictor.pixels: uint8 pixels, normalised in the runtime's graph
  where it can, else by images.to_tensor), per image of a batch of 32, the least of 3 measurements; the
  fastest backend counts.

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


def model_seconds(predictor, x, batches: int, passes: int = 3) -> float:
    """CPU seconds per image of ``predictor`` on the uint8 batch ``x`` as predict runs it (Predictor.pixels), the
    least of ``passes`` measurements of ``batches`` batches: a neighbour's load only adds (cache misses, a
    runtime's threads spinning while they wait); single measurements of the same runtime varied by 20% between
    runs."""
    from mobilenets import images

    predictor.pixels(x, images.INCEPTION)  # first-call set-up is not the model's cost
    return min(cpu_seconds(lambda: predictor.pixels(x, images.INCEPTION), batches) for _ in range(passes)) / len(x)


def decode_seconds(files: list[Path], side: int, passes: int = 3) -> float:
    """CPU seconds per file of what predict's decoding workers do to it, the least of ``passes`` passes."""
    from mobilenets import images

    images.eval_pixels(images.load_pixels(files[-1], min_side=side), 224)  # import and first-call setup

    def decode_all():
        for f in files:
            images.eval_pixels(images.load_pixels(f, min_side=side), 224)

    return min(cpu_seconds(decode_all, 1) for _ in range(passes)) / len(files)


def pixel_batch(calib: Path, resolution: int = 224) -> torch.Tensor:
    """32 uint8 crops of ``calib``'s photos (repeated as needed), as predict's workers hand them over: what the
    model is measured on."""
    from mobilenets import images

    x = torch.stack([images.eval_pixels(images.load_pixels(f), resolution) for f in images.list_images(calib)])
    return torch.cat([x] * (32 // len(x) + 1))[:32]


def compiled(model, precision: str, calibration, backend: str, resolution: int = 224):
    """``deploy.compile`` for batches of 32, int8 calibrated on ``calibration`` (a folder's image_batches), its
    warnings (no int8-ready weights, a cache re-used) kept out of the benchmark's output."""
    from mobilenets import deploy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return deploy.compile(model, precision, calibration=calibration if precision == "int8" else None,
                              batch_size=32, resolution=resolution, backend=backend)


def model_costs(weights: Path, calib: Path, batches: int, resolution: int = 224) -> dict[str, dict[str, float]]:
    """CPU seconds per image of a batch of 32, per precision and installed backend, one thread (ExecuTorch left
    out: a phone runtime that deploy's auto never tries; LiteRT is in, since auto picks it for fp32 on CPUs
    with AVX-512); int8 calibrated on ``calib``."""
    import mobilenets
    from mobilenets import deploy

    model = mobilenets.load(weights).eval()
    calibration, _ = deploy.image_batches(calib, resolution)
    x = pixel_batch(calib, resolution)
    costs: dict[str, dict[str, float]] = {}
    for precision in ("fp32", "int8"):
        costs[precision] = {}
        for backend in deploy.available_backends():
            if not deploy.backend_supports(backend, precision) or backend == "executorch":
                continue
            costs[precision][backend] = model_seconds(compiled(model, precision, calibration, backend, resolution),
                                                      x, batches)
            print(f"model {precision} {backend}: {costs[precision][backend] * 1000:.2f} ms CPU per image",
                  file=sys.stderr, flush=True)
    return costs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--phone-files", type=int, default=60)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mobilenets import images
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    folders = {"imagenet-like 500x375": (make_folder(work / "imagenet-like", 1000, (500, 375), 1), args.files),
               "phone 4000x3000": (make_folder(work / "phone", 120, (4000, 3000), 2), args.phone_files)}
    weights, calib = real_weights_and_calibration(work)
    decode = {}
    side = images.draft_side(224)
    for name, (folder, count) in folders.items():
        files = sorted((folder / "photos").glob("*.jpg"))[:count]
        decode[name] = decode_seconds(files, side)
        print(f"decode {name}: {decode[name] * 1000:.2f} ms CPU per image", file=sys.stderr, flush=True)
    model_s = model_costs(weights, calib, args.batches)
    cores = len(os.sched_getaffinity(0))
    peers = json.loads((RESULTS / "predict_throughput.json").read_text())["summary"]
    rows = []
    for name in folders:
        # the steady rate, or end to end where the folder was too small for one (predict_throughput.summarise)
        peer = max(peers[name][p]["images_per_s"] or peers[name][p]["end_to_end_images_per_s"]
                   for p in ("timm", "keras") if "error" not in peers[name][p])
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
