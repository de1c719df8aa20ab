"""int8 on a CPU without VNNI: full-range against 7-bit weights, on the real MobileNet v1 1.0-224 weights.

    OMP_NUM_THREADS=2 PYTHONPATH=src:tests python benchmarks/int8_saturation.py --calib 128 --held 256

x86 CPUs without VNNI (AVX2 only) multiply uint8 activations by int8 weights with vpmaddubsw, which adds
each pair of products into a saturating int16: with weights up to 127 a pair reaches 2 x 255 x 127 = 64770
and is cut at 32767.  Weights on [-64, 64] keep every pair within int16 (2 x 255 x 64 = 32640).  This
prepares the weights both ways (``quantize.prepare_int8(weight_qmax=127 / 64)``, same calibration crops,
tests/real_data.py) and scores each int8 graph on held-out crops against the float model (top-1 agreement,
mean KL, cosine) and against its own float simulation (top-1 agreement: 100% means the runtime computes
what the simulation says; saturation shows as a gap there).  Also the full-range preparation rounded to
nearest on the 7-bit grid (``quantize.on_weight_grid``: what compile does with a ``mobilenets quantize`` file
on such a CPU).  Runtimes: ONNX Runtime and OpenVINO on the QDQ file, PyTorch PT2E (oneDNN) and LiteRT (XNNPACK)
as deploy builds them.  Writes benchmarks/results/int8_saturation.{json,md} with the CPU, its int8 flags and
the load before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import mobilenets  # noqa: E402
from mobilenets import deploy, quantize  # noqa: E402
from mobilenets.deploy import backend as registry, machine  # noqa: E402
from int8_fidelity import openvino_run, ort_run, run_batches, scores  # noqa: E402

RUNTIMES = ("onnxruntime", "openvino", "torch", "litert")


def load() -> str:
    """The load average over 1, 5 and 15 minutes: the machine is shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "unknown"


def runtime_logits(name: str, ready, x: torch.Tensor, calib, batch: int, workdir: Path) -> torch.Tensor:
    if name in ("onnxruntime", "openvino"):
        path = quantize.to_qdq_onnx(ready, workdir / f"{id(ready)}.onnx")
        run = ort_run(path) if name == "onnxruntime" else openvino_run(path)[0]
    else:
        folded = ready.folded
        folded.int8_ready = ready
        # a static-batch build (PT2E) calibrates its observers in its own batch size
        run = registry.build(name, folded, "int8", deploy.rebatch(calib, batch), batch, ready.resolution)
    return run_batches(run, x, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration crops (default 128)")
    parser.add_argument("--held", type=int, default=256, help="held-out crops (default 256)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, of {RUNTIMES}")
    parser.add_argument("--keep", help="folder to keep the two int8-ready weights files in (read back when there)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_saturation"))
    args = parser.parse_args()
    log = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731
    import real_data

    load_before = load()
    model = real_data.real_model()
    calib = list(real_data.inception_input(real_data.calibration_crops(args.calib)).split(16))
    x = real_data.inception_input(real_data.heldout_crops(args.held))
    with torch.no_grad():
        ref = torch.cat([model(b) for b in x.split(32)])
    batch = 8
    rows = []
    readies = {}
    for qmax in (127, 64):
        kept = Path(args.keep) / f"real-1.0-224-int8-q{qmax}-c{args.calib}.safetensors" if args.keep else None
        if kept is not None and kept.is_file():
            readies[qmax] = quantize.from_model(mobilenets.load(kept, progress=False))
            continue
        t = time.perf_counter()
        readies[qmax] = quantize.prepare_int8(model, calib, weight_qmax=qmax)
        log({"prepared": qmax, "seconds": round(time.perf_counter() - t)})
        if kept is not None:
            quantize.save(readies[qmax], model, kept)
    candidates = [("full range [-127, 127], prepared", readies[127]),
                  ("7-bit [-64, 64], prepared (compile's choice here)", readies[64]),
                  ("7-bit [-64, 64], the full-range file rounded to nearest", quantize.on_weight_grid(readies[127], 64))]
    with tempfile.TemporaryDirectory() as tmp:
        for label, ready in candidates:
            simulated = run_batches(ready.simulate, x, batch)
            rows.append({"weights": label, "runtime": "simulation (PyTorch fake-quant)", **scores(ref, simulated),
                         "agreement_with_simulation": 1.0})
            log(rows[-1])
            for name in args.runtimes.split(","):
                t = time.perf_counter()
                logits = runtime_logits(name, ready, x, calib, batch, Path(tmp))
                rows.append({"weights": label, "runtime": name, **scores(ref, logits),
                             "agreement_with_simulation": float((simulated.argmax(1) == logits.argmax(1)).float().mean()),
                             "seconds": round(time.perf_counter() - t)})
                log(rows[-1])
    flags = machine.cpu_flags()
    result = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} PYTHONPATH=src:tests python "
                         + " ".join(["benchmarks/int8_saturation.py"] + sys.argv[1:]),
              "cpu": deploy.cpu_name(), "platform": platform.platform(), "threads": torch.get_num_threads(),
              "int8_flags": {f: f in flags for f in ("avx2", "avx512f", *machine.VNNI_FLAGS)},
              "int8_saturates": machine.int8_saturates(), "load_before": load_before, "load_after": load(),
              "calibration_crops": args.calib, "heldout_crops": args.held, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# int8 weights on a CPU without VNNI: full range against 7 bits (real MobileNet v1 1.0-224)", "",
             f"Command: `{result['command']}`", "",
             f"CPU: {result['cpu']}; int8 flags {result['int8_flags']}; {result['threads']} threads; "
             f"load average (1, 5, 15 min) {result['load_before']} before, {result['load_after']} after.", "",
             f"Calibration: {result['calibration_crops']} crops; scored on {result['heldout_crops']} held-out crops "
             f"(never a calibration crop) against the float PyTorch model, and against the int8 graph's own "
             f"simulation.", "",
             "| weights | runtime | top-1 agreement with float | with its simulation | mean KL(fp32‖int8) | cosine |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['weights']} | {r['runtime']} | {100 * r['top1_agreement']:.1f}% | "
                     f"{100 * r['agreement_with_simulation']:.1f}% | {r['mean_kl']:.4f} | {r['cosine']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
