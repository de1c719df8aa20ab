"""What reduced-scale JPEG decoding (PIL's ``draft``) does to predict's answers, and what it saves.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jpeg_draft.py [--phone-files 400] [--files 400]

On folders made from the photos packages ship (benchmarks/predict_throughput.make_folder:
"phone", 4000x3000, and "imagenet-like", 500x375, JPEG quality 90), each image is
preprocessed as predict does (images.load_pixels + images.eval_transform, resolution 224)
three ways: exact (full decoding, ``predict --exact``), draft down to the resize size (256,
images.draft_side: predict's default), and draft down to twice it (predict's earlier default).  Reported per way: milliseconds
per image for decoding and preprocessing (one thread), the mean difference from exact in grey
levels, and, through Google's MobileNet v1 1.0-224 weights (eager fp32), top-1 agreement with
exact and mean KL(exact || draft).  Whether predict may decode at reduced scale by default is
decided on real camera photos against the pipelines accepted for these weights
(benchmarks/decode_agreement.py).  Writes benchmarks/results/jpeg_draft.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"


EXACT = "exact (--exact)"


def measure(folder: Path, model) -> dict:
    from mobilenets import images

    files = sorted((folder / "photos").glob("*.jpg"))
    ways = {EXACT: None, "draft to the resize size (the default)": images.draft_side(224),
            "draft to twice the resize size": 2 * images.resize_size(224)}
    x = {w: [] for w in ways}
    seconds = dict.fromkeys(ways, 0.0)
    for side in ways.values():  # untimed: the decoders' import and first-call setup
        images.eval_transform(images.load_pixels(files[-1], min_side=side), 224)
    for f in files:
        for w, side in ways.items():
            start = time.perf_counter()
            x[w].append(images.eval_transform(images.load_pixels(f, min_side=side), 224))
            seconds[w] += time.perf_counter() - start
    with torch.inference_mode():
        logits = {w: torch.cat([model(torch.stack(v[i:i + 32])) for i in range(0, len(v), 32)]) for w, v in x.items()}
    exact = logits[EXACT]
    rows = {}
    for w in ways:
        rows[w] = {"ms_per_image": seconds[w] / len(files) * 1000,
                   "mean_grey_levels": float((torch.stack(x[w]) - torch.stack(x[EXACT])).abs().mean()) * 127.5,
                   "top1_agreement": float((logits[w].argmax(1) == exact.argmax(1)).float().mean()),
                   "mean_kl": float(torch.nn.functional.kl_div(logits[w].log_softmax(1), exact.log_softmax(1),
                                                               log_target=True, reduction="batchmean"))}
    return {"images": len(files), "ways": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phone-files", type=int, default=400)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    import mobilenets
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    folders = {"phone 4000x3000": make_folder(work / f"phone-draft-{args.phone_files}", args.phone_files,
                                              (4000, 3000), 11),
               "imagenet-like 500x375": make_folder(work / f"imagenet-like-draft-{args.files}", args.files,
                                                    (500, 375), 12)}
    weights, _ = real_weights_and_calibration(work)
    model = mobilenets.load(weights).eval()
    before = os.getloadavg()
    result = {"command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(["benchmarks/jpeg_draft.py", *sys.argv[1:]]),
              "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "folders": {name: measure(folder, model) for name, folder in folders.items()}}
    result["loadavg"] = [before, os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "jpeg_draft.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Reduced-scale JPEG decoding against exact decoding ({result['date']})", "",
             f"    {result['command']}", "",
             f"CPU: {result['cpu']}; load average before {before[0]:.2f}, after {result['loadavg'][1][0]:.2f} "
             f"(times are per image, one thread, on a shared machine). Real MobileNet v1 1.0-224 weights, "
             f"resolution 224; agreement and KL against the exact preprocessing.", "",
             "| folder | decoding | ms / image | mean difference (grey levels) | top-1 agreement | mean KL (nats) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in result["folders"].items():
        for w, v in r["ways"].items():
            lines.append(f"| {name} ({r['images']}) | {w} | {v['ms_per_image']:.1f} | {v['mean_grey_levels']:.3f} | "
                         f"{v['top1_agreement']:.2%} | {v['mean_kl']:.5f} |")
    lines += ["", "On 500x375 files both draft rules decode exactly: no DCT scale leaves a shorter side of 256."]
    (RESULTS / "jpeg_draft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
