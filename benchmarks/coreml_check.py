"""Core ML packages of the real MobileNet v1 1.0-224 ImageNet weights: written, read back and checked here.

    OMP_NUM_THREADS=2 python benchmarks/coreml_check.py --calib 64 --held 64

Core ML runs only on Apple platforms, so nothing here runs Core ML.  Each package (fp16, fp32, int8
weights from the int8-ready model prepared on the calibration crops, and int8 of the plain folded
weights for comparison) is written by ``deploy.export``, read back by coremltools and checked by
``deploy.check_exported``: its input, labels, 27 convolutions and every stored weight against the
PyTorch model; then its program is evaluated op by op in PyTorch (fp16 intermediates where the
program declares fp16) on the held-out crops and compared with the float PyTorch model.  Weights and
photos come from tests/real_data.py.  Writes benchmarks/results/coreml_check.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from mobilenets import deploy, quantize  # noqa: E402

CANDIDATES = (("fp16", "fp16", "prepared"), ("fp32", "fp32", "prepared"), ("int8 (int8-ready weights)", "int8",
              "prepared"), ("int8 (plain folded weights)", "int8", "plain"))


def main(argv=None) -> int:
    import real_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration crops (int8-ready preparation)")
    parser.add_argument("--held", type=int, default=64, help="held-out crops for the reference evaluation")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coreml_check"))
    args = parser.parse_args(argv)

    model = real_data.real_model()
    calibration = list(real_data.inception_input(real_data.calibration_crops(args.calib)).split(16))
    held = real_data.inception_input(real_data.heldout_crops(args.held))
    with torch.no_grad():
        reference = model(held)
    started = time.time()
    ready = quantize.to_model(quantize.prepare_int8(model, calibration), model)
    prepare_s = time.time() - started
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, precision, int8 in CANDIDATES:
            source = ready if int8 == "prepared" and precision == "int8" else model
            started = time.time()
            path = deploy.export(source, Path(folder) / f"{precision}-{int8}.mlpackage", precision=precision,
                                 resolution=224, int8=int8)
            written = time.time() - started
            report = deploy.check_exported(source, path, int8=int8, images=held, logits=reference)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            rows.append({"package": name, "bytes": size, "export_s": round(written, 1), **report})
            print(f"{name}: {json.dumps(report['reference_evaluation'])}", flush=True)
    result = {"command": "OMP_NUM_THREADS=2 python benchmarks/coreml_check.py " + " ".join(argv or sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "calibration_crops": args.calib, "held_out_crops": args.held, "prepare_int8_s": round(prepare_s, 1),
              "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows]}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Core ML packages of the real 1.0-224 weights, checked (not run: {rows[0]['why']})", "",
             f"`{result['command']}`: {args.calib} calibration crops, {args.held} held-out crops "
             f"(tests/real_data.py). Each package's program evaluated op by op in PyTorch, fp16 intermediates "
             f"where it declares fp16, against the float PyTorch model:", "",
             "| package | size | weights checked | top-1 agreement | cosine | mean KL, nats | max abs diff |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        p = r["reference_evaluation"]
        checked = (f"{r['int8_codes_differing']} codes off round(w / scale); max {r['weights_max_steps']:.2f} step"
                   if r["precision"] == "int8" else f"max abs diff {r['weights_max_abs_diff']:.2g}")
        lines.append(f"| {r['package']} | {r['bytes'] / 2**20:.1f} MiB | {checked} | {100 * p['top1_agreement']:.1f}% "
                     f"| {p['cosine']:.6f} | {p['mean_kl']:.4f} | {p['max_abs_diff']:.3g} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
