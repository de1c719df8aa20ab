"""ExecuTorch int8 on the real MobileNet v1 1.0-224 weights: which quantization keeps the float model's answers,
each written as a .pte with the XNNPACK delegate and run by ExecuTorch's runtime on the same held-out crops.

    OMP_NUM_THREADS=2 PYTHONPATH=src:tests python benchmarks/executorch_int8.py --calib 128 --held 256

Weights and photos come from tests/real_data.py (as benchmarks/int8_fidelity.py: the same calibration and
held-out crops for the same counts, so the two tables compare).  Candidates:

- fp32 .pte (the reference for the file format itself);
- ours, the default of ``mobilenets export --format executorch --precision int8``: the int8-ready model
  (mobilenets.quantize) with its own activation ranges fixed in XNNPACK's quantized graph;
- ``int8="plain"``: XNNPACK's quantizer with its own observers on the calibration crops, on the plain
  folded model (ExecuTorch's example flow);
- XNNPACK's quantizer with its own observers on the int8-ready weights with one clip per layer
  (bias-corrected, not equalized): how much of ours comes from the weights and how much from the ranges;
- the fake-quantized simulation of ours in PyTorch (what the first candidate is meant to compute).

Scores against the float PyTorch model: top-1 agreement, mean KL(fp32 || int8) in nats, cosine of the
flattened logits, max abs difference; with each file's size and the seconds to write it.  Writes
benchmarks/results/executorch_int8.{json,md}.
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
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from mobilenets import deploy, quantize  # noqa: E402
from mobilenets.deploy import executorch  # noqa: E402
from mobilenets.deploy.prepare import single_clip  # noqa: E402


def markdown(result: dict) -> str:
    lines = ["# ExecuTorch int8 on the real MobileNet v1 1.0-224 weights", "",
             f"Command: `{result['command']}`", "",
             f"CPU: {result['cpu']}; torch {result['versions']['torch']}, executorch "
             f"{result['versions']['executorch']}, torchao {result['versions']['torchao']}; "
             f"{result['threads']} threads.", "",
             f"Calibration: {result['calibration_crops']} crops; scored on {result['heldout_crops']} held-out crops "
             "(never a calibration crop) against the float PyTorch model. Every .pte row ran in ExecuTorch's "
             "runtime (XNNPACK delegate).", "",
             "| candidate | top-1 agreement | mean KL(fp32‖int8) | cosine | max abs diff | file MB | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        size = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else ""
        lines.append(f"| {r['candidate']} | {100 * r['top1_agreement']:.1f}% | {r['mean_kl']:.4f} | "
                     f"{r['cosine']:.4f} | {r['max_abs_diff']:.3g} | {size} | {r.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration crops (default 128)")
    parser.add_argument("--held", type=int, default=256, help="held-out crops (default 256)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "executorch_int8"))
    args = parser.parse_args()
    log = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731
    import real_data

    model = real_data.real_model()
    calib = list(real_data.inception_input(real_data.calibration_crops(args.calib)).split(16))
    x = real_data.inception_input(real_data.heldout_crops(args.held))
    with torch.no_grad():
        reference = torch.cat([model(b) for b in x.split(32)])
    rows: list[dict] = []

    def score(candidate: str, logits: torch.Tensor, **extra) -> None:
        rows.append({"candidate": candidate, **deploy.parity(reference, logits), **extra})
        log(rows[-1])

    ready = quantize.prepare_int8(model, calib)
    ready_model = quantize.to_model(ready, model)
    folded = deploy.fold_batchnorm(model)
    with tempfile.TemporaryDirectory(prefix="executorch-int8-") as tmp:
        def pte(name: str, write) -> None:
            start = time.perf_counter()
            data = write()
            seconds = round(time.perf_counter() - start)
            path = Path(tmp) / f"{len(rows)}.pte"
            path.write_bytes(data)
            score(name, deploy.load_exported(path)(x), bytes=len(data), seconds=seconds)

        pte("fp32 .pte", lambda: executorch.pte_bytes(folded, "fp32", [], 224))
        pte("**ours (default): int8-ready weights, our ranges fixed in XNNPACK's graph**",
            lambda: deploy.export(ready_model, Path(tmp) / "ours.pte", precision="int8",
                                  calibration=calib).read_bytes())
        pte('int8="plain": XNNPACK quantizer, its own observers, plain weights',
            lambda: deploy.export(model, Path(tmp) / "plain.pte", precision="int8", calibration=calib,
                                  int8="plain").read_bytes())
        pte("XNNPACK quantizer, its own observers, on the bias-corrected weights (one clip per layer)",
            lambda: executorch.pte_bytes(single_clip(ready.folded), "int8", calib, 224))
    score("ours, PyTorch fake-quant simulation (no file)", torch.cat([ready.simulate(b) for b in x.split(32)]))

    from importlib.metadata import version

    result = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "default")
              + " PYTHONPATH=src:tests python benchmarks/executorch_int8.py " + " ".join(sys.argv[1:]),
              "cpu": deploy.cpu_name() or platform.processor(), "threads": torch.get_num_threads(),
              "versions": {name: version(name) for name in ("torch", "executorch", "torchao")},
              "calibration_crops": args.calib, "heldout_crops": args.held, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
