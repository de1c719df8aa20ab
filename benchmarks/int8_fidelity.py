"""int8 fidelity on the real MobileNet v1 1.0-224 ImageNet weights: how many of the float model's
answers each int8 candidate keeps, all candidates in one run on the same crops.

    OMP_NUM_THREADS=2 PYTHONPATH=src:tests python benchmarks/int8_fidelity.py --steps 200

Weights and photos come from tests/real_data.py (Google's released weights in the frozen graph of
nudity==0.2.3 on PyPI; seeded crops of the photos scikit-image and matplotlib ship, calibration
and held-out sets disjoint).  Candidates:

- TensorFlow's own post-training int8: TFLiteConverter on the frozen graph with a representative
  dataset (the calibration crops), full-integer kernels, run in tf.lite.Interpreter;
- our previous plain post-training int8: deploy.compile(precision="int8") on each backend;
- mobilenets.quantize (steps 0, and steps N of label-free distillation), written as a QDQ ONNX
  graph and run by ONNX Runtime and by OpenVINO.

Scores against the float PyTorch model on the held-out crops: top-1 agreement, mean
KL(fp32 || int8) in nats, mean cosine of the logits.  Then the digits models fitted here (the main
job, trained as ``make demo`` trains it and ended with ``train --qat``, and the speed benchmarks'
briefly fitted model): accuracy of float and int8 on every held-out digit.  Writes benchmarks/results/int8_fidelity.{json,md}.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from mobilenets import deploy, quantize  # noqa: E402


def scores(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    p, q = reference.log_softmax(1), logits.float().log_softmax(1)
    return {"top1_agreement": float((reference.argmax(1) == logits.argmax(1)).float().mean()),
            "mean_kl": float((p.exp() * (p - q)).sum(1).mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(reference, logits.float(), dim=1).mean()),
            "max_abs_diff": float((reference - logits).abs().max())}


def run_batches(run, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([run(b) for b in x.split(batch_size)])


def ort_run(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def ort_ops(path) -> dict:
    """The operators ONNX Runtime actually runs (after its QDQ fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops: dict = {}
        for n in onnx.load(options.optimized_model_filepath).graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def openvino_run(path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    int8_convs = 0
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        try:
            kind, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        except (KeyError, RuntimeError, AttributeError):
            continue
        int8_convs += kind == "Convolution" and precision in ("u8", "i8")

    def run(x):
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run, int8_convs


def tflite_ptq(graph_path: Path, calib_nhwc: np.ndarray, held_nhwc: np.ndarray) -> torch.Tensor:
    """TensorFlow's post-training full-integer int8 of the frozen graph, run in its interpreter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import real_data
    import tensorflow as tf

    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(graph_path), [real_data.INPUT_NODE], [real_data.LOGITS_NODE],
        input_shapes={real_data.INPUT_NODE: [1, 224, 224, 3]})
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in calib_nhwc)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = converter.convert()
    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=torch.get_num_threads())
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    logits = []
    for x in held_nhwc:
        interpreter.set_tensor(inp["index"], x[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out["index"])[0, 1:])  # class 0 is "background"
    return torch.from_numpy(np.stack(logits)).float()


def tflite_in_child(graph_path: Path, calib_nhwc: np.ndarray, held_nhwc: np.ndarray) -> torch.Tensor:
    """:func:`tflite_ptq` in a child process: TensorFlow and torch.compile's Triton in one process crash."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "calib.npy", calib_nhwc.astype(np.float32) / 127.5 - 1)
        np.save(Path(tmp) / "held.npy", held_nhwc.astype(np.float32) / 127.5 - 1)
        subprocess.run([sys.executable, __file__, "--tflite-worker", str(graph_path), tmp], check=True)
        return torch.from_numpy(np.load(Path(tmp) / "logits.npy"))


def ours(name, ready, held, batch_size, rows, workdir, log):
    path = quantize.to_qdq_onnx(ready, Path(workdir) / f"{name}.onnx")
    ops = ort_ops(path)
    rows.append({"candidate": f"{name}, ONNX Runtime (QDQ)", "ops": ops,
                 **scores(held["ref"], run_batches(ort_run(path), held["x"], batch_size))})
    log(rows[-1])
    run, convs = openvino_run(path)
    rows.append({"candidate": f"{name}, OpenVINO (QDQ)", "int8_convolutions": convs,
                 **scores(held["ref"], run_batches(run, held["x"], batch_size))})
    log(rows[-1])
    rows.append({"candidate": f"{name}, PyTorch fake-quant simulation",
                 **scores(held["ref"], run_batches(ready.simulate, held["x"], batch_size))})
    log(rows[-1])


def main_job_flags() -> list[str]:
    """``make demo``'s training flags, read from the Makefile so the benchmark trains what the main job trains."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("DEMO_TRAIN"))
    return line.split(":=", 1)[1].split()


def digits_scores(model, resolution: int, normalization, steps: int, log, label: str,
                  trained_int8: Path | None = None) -> list[dict]:
    """Accuracy on every held-out digit of float, plain PTQ and ours, calibrated on training digits.

    Calibration comes from the training split and scoring from the whole "val" split (359 digits),
    so no scored image is a calibration image and each is 0.28 points.
    """
    from mobilenets import data

    train = data.Digits("train", resolution, data.EvalTransform(resolution, normalization))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:128].tolist()
    calib = list(torch.stack([train[i][0] for i in order]).split(16))
    val = data.Digits("val", resolution, data.EvalTransform(resolution, normalization))
    x, y = torch.stack([val[i][0] for i in range(len(val))]), torch.tensor(val.targets)
    with torch.no_grad():
        ref = model(x)
    accuracy = lambda logits: float((logits.argmax(1) == y).float().mean())  # noqa: E731
    out = [{"candidate": f"{label}: float", "accuracy": accuracy(ref), "images": len(y)}]
    plain = deploy.compile(model, "int8", calibration=calib, batch_size=1, resolution=resolution,
                           backend="onnxruntime", int8="plain")
    logits = run_batches(plain, x, 1)
    out.append({"candidate": f"{label}: plain PTQ, ONNX Runtime", "accuracy": accuracy(logits),
                **scores(ref, logits)})
    readies = [(f"mobilenets.quantize steps {n}", lambda n=n: quantize.prepare_int8(model, calib, steps=n))
               for n in sorted({0, steps})]
    if trained_int8 is not None:
        import mobilenets

        readies.append(("train --qat, its int8.safetensors",
                        lambda: quantize.from_model(mobilenets.load(trained_int8, progress=False))))
    for name, make in readies:
        with tempfile.TemporaryDirectory() as tmp:
            run = ort_run(quantize.to_qdq_onnx(make(), Path(tmp) / "d.onnx", resolution=resolution))
            logits = run_batches(run, x, 1)
        out.append({"candidate": f"{label}: {name}, ONNX Runtime", "accuracy": accuracy(logits),
                    **scores(ref, logits)})
    for r in out:
        r["drop_points"] = round(100 * (out[0]["accuracy"] - r["accuracy"]), 2)
        log(r)
    return out


def digits(steps: int, qat: int, log) -> list[dict]:
    """The digits models fitted here: the main job's (``make demo``'s training, then ``--qat``) and the
    briefly fitted 1.0-32 model the speed benchmarks use (40 AdamW steps, 77% accurate)."""
    import subprocess

    import mobilenets
    from mobilenets import benchmark, images

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "digits"
        command = [sys.executable, "-m", "mobilenets", "train", *main_job_flags(), "--qat", str(qat),
                   "--out", str(run)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        model = mobilenets.load(run, progress=False)
        rows += digits_scores(model, model.meta.resolution, model.meta.normalization,
                              steps, log, "main job (make demo's training)", trained_int8=run / "int8.safetensors")
    brief = benchmark.make_model(1.0, num_classes=10)
    rows += digits_scores(brief, 32, images.INCEPTION, steps, log, "briefly fitted 1.0-32")
    return rows


def markdown(result: dict) -> str:
    lines = [f"# int8 fidelity on the real MobileNet v1 1.0-224 weights", "",
             f"Command: `{result['command']}`", "",
             f"CPU: {result['cpu']}; torch {result['versions']['torch']}, onnxruntime "
             f"{result['versions']['onnxruntime']}, openvino {result['versions']['openvino']}, tensorflow "
             f"{result['versions']['tensorflow']}; {result['threads']} threads.", "",
             f"Calibration: {result['calibration_crops']} crops; scored on {result['heldout_crops']} held-out crops "
             f"(never a calibration crop) against the float PyTorch model.", "",
             "| candidate | top-1 agreement | mean KL(fp32‖int8) | cosine | seconds |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['candidate']} | {100 * r['top1_agreement']:.1f}% | {r['mean_kl']:.4f} | "
                     f"{r['cosine']:.4f} | {r.get('seconds', '')} |")
    lines += ["", "Digits models fitted here: accuracy on all held-out digits (calibrated on 128 training digits; "
              "QAT kept only if its simulated val top-1 does not fall):", "",
              "| candidate | accuracy | drop, points | top-1 agreement | mean KL |", "|---|---|---|---|---|"]
    for r in result["digits"]:
        agree = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else ""
        kl = f"{r['mean_kl']:.4f}" if "mean_kl" in r else ""
        lines.append(f"| {r['candidate']} | {100 * r['accuracy']:.2f}% | {r['drop_points']:+.2f} | {agree} | {kl} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration crops (default 128)")
    parser.add_argument("--held", type=int, default=256, help="held-out crops (default 256)")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps of the QAT candidate")
    parser.add_argument("--qat", type=int, default=200, help="train --qat steps of the main digits job")
    parser.add_argument("--skip", default="", help="comma-separated: tflite,torch,onnxruntime,openvino,litert,quantize,digits")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_fidelity"))
    parser.add_argument("--tflite-worker", nargs=2, metavar=("GRAPH", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tflite_worker:
        graph, folder = args.tflite_worker
        logits = tflite_ptq(Path(graph), np.load(Path(folder) / "calib.npy"), np.load(Path(folder) / "held.npy"))
        np.save(Path(folder) / "logits.npy", logits.numpy())
        return
    skip = set(args.skip.split(",")) - {""}
    log = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731
    import real_data

    model = real_data.real_model()
    calib_nhwc, held_nhwc = real_data.calibration_crops(args.calib), real_data.heldout_crops(args.held)
    calib = list(real_data.inception_input(calib_nhwc).split(16))
    x = real_data.inception_input(held_nhwc)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in x.split(32)])
    held = {"x": x, "ref": ref}
    batch = 8
    rows: list[dict] = []

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, round(time.perf_counter() - t)

    if "tflite" not in skip:
        logits, sec = timed(lambda: tflite_in_child(real_data.real_graph_path(), calib_nhwc, held_nhwc))
        rows.append({"candidate": "TensorFlow PTQ (TFLiteConverter int8, tf.lite.Interpreter)", "seconds": sec,
                     **scores(ref, logits)})
        log(rows[-1])
    for mode, label in (("plain", "previous plain PTQ"), ("prepared", "ours (default)")):
        for backend in ("torch", "onnxruntime", "openvino", "litert"):
            if backend in skip:
                continue
            predictor, sec = timed(lambda: deploy.compile(model, "int8", calibration=calib, batch_size=batch,
                                                          backend=backend, int8=mode))
            rows.append({"candidate": f"{label}, deploy.compile int8 {backend}", "seconds": sec,
                         **scores(ref, run_batches(predictor, x, batch))})
            log(rows[-1])
    with tempfile.TemporaryDirectory() as workdir:
        for steps in sorted({0, args.steps}) if "quantize" not in skip else ():
            ready, sec = timed(lambda: quantize.prepare_int8(model, calib, steps=steps))
            before = len(rows)
            ours(f"mobilenets.quantize steps {steps}", ready, held, batch, rows, workdir, log)
            for r in rows[before:]:
                r["seconds"] = sec
    result = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " PYTHONPATH=src:tests python "
                         + " ".join(["benchmarks/int8_fidelity.py"] + sys.argv[1:]),
              "cpu": deploy.cpu_name(), "platform": platform.platform(), "threads": torch.get_num_threads(),
              "calibration_crops": args.calib, "heldout_crops": args.held, "steps": args.steps, "qat": args.qat,
              "versions": versions(), "rows": rows,
              "digits": digits(args.steps, args.qat, log) if "digits" not in skip else []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "onnxruntime", "openvino", "tensorflow", "nncf", "torchao"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    main()
