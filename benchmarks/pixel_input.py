"""What normalising the pixels inside OpenVINO's graph (Predictor.pixels) does to the real weights' answers.

    .venv/bin/python benchmarks/pixel_input.py [--files 320]

On benchmarks/predict_throughput.py's "imagenet-like" folder (500x375 photos), the real MobileNet v1 1.0-224
weights: top-1 agreement and mean KL with eager fp32 PyTorch of OpenVINO fed float input normalised by
images.to_tensor, and fed the uint8 pixels (normalised in its graph), at fp32 and int8 (calibrated on the
benchmark's calibration folder), and how often the two OpenVINO paths agree with each other.  At int8 the
input's quantization step equals one grey level for these weights' normalisation, so a pixel lands on a
step's midpoint and either float rounding of x / 127.5 - 1 may round it either way: the two paths are two
equally valid roundings, and this measures what that is worth.  Writes benchmarks/results/pixel_input.{json,md}.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=320)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    import mobilenets
    from mobilenets import deploy, images
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    folder = make_folder(work / "imagenet-like", 1000, (500, 375), 1)
    weights, calib = real_weights_and_calibration(work)
    files = sorted((folder / "photos").glob("*.jpg"))[: args.files // 32 * 32]
    model = mobilenets.load(weights).eval()
    n = images.INCEPTION
    pixels = torch.stack([images.eval_pixels(images.load_pixels(f, min_side=images.draft_side(224)), 224)
                          for f in files])
    chunks = list(pixels.split(32))
    with torch.inference_mode():
        reference = torch.cat([model(images.to_tensor(c, n)) for c in chunks])
    calibration, _ = deploy.image_batches(calib, 224)
    rows = {}
    for precision in ("fp32", "int8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor = deploy.compile(model, precision, calibration=calibration if precision == "int8" else None,
                                       batch_size=32, resolution=224, backend="openvino")
        float_in = torch.cat([predictor(images.to_tensor(c, n)) for c in chunks])
        pixel_in = torch.cat([predictor.pixels(c, n) for c in chunks])
        rows[precision] = {"float input": deploy.parity(reference, float_in),
                           "pixels": deploy.parity(reference, pixel_in),
                           "pixels vs float input": deploy.parity(float_in, pixel_in),
                           "max_abs_logit_difference": float((float_in - pixel_in).abs().max())}
    command = ".venv/bin/python " + " ".join(["benchmarks/pixel_input.py", *sys.argv[1:]])
    result = {"command": command, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "photos": len(files), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pixel_input.json").write_text(json.dumps(result, indent=1))
    lines = [f"# OpenVINO fed uint8 pixels against float input, real 1.0-224 weights ({result['date']})", "",
             f"    {command}", "", f"CPU: {result['cpu']}. {len(files)} 500x375 photos; agreement and KL with eager "
             "fp32 PyTorch on the same photos.", "",
             "| precision | input | top-1 agreement | mean KL | max logit difference |", "|---|---|---:|---:|---:|"]
    for precision, r in rows.items():
        for way in ("float input", "pixels", "pixels vs float input"):
            extra = f"{r['max_abs_logit_difference']:.2g}" if way == "pixels vs float input" else ""
            lines.append(f"| {precision} | {way} | {r[way]['top1_agreement']:.2%} | {r[way]['mean_kl']:.4f} | {extra} |")
    (RESULTS / "pixel_input.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
