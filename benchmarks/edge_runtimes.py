"""Our LiteRT and ExecuTorch files against the same runtimes' reference exports of the same weights, at batch 1.

    nice env OMP_NUM_THREADS=1 PYTHONPATH=src:tests .venv/bin/python benchmarks/edge_runtimes.py

Weights: Google's MobileNet v1 1.0-224 ImageNet weights (tests/real_data.py: the frozen graph in
nudity==0.2.3, read by our converter); images: seeded crops of the photos scikit-image and
matplotlib ship (calibration and held-out sets disjoint), preprocessed x / 127.5 - 1.

LiteRT (ai_edge_litert's interpreter, default delegates: XNNPACK; ``--threads`` threads for all):

- ours fp32 / int8: ``deploy.export(model, "m.tflite", precision=...)``, the function behind
  ``mobilenets export --format tflite`` (int8: full-integer, int8 input and output, calibrated on
  the calibration crops);
- reference fp32 / int8: TensorFlow's ``TFLiteConverter.from_keras_model`` on Keras's own MobileNet
  (``tf_keras.applications.MobileNet(alpha=1.0, weights=None)``) given the same weights layer by
  layer, in a TensorFlow subprocess (int8: ``Optimize.DEFAULT``, the same calibration crops as the
  representative dataset, ``TFLITE_BUILTINS_INT8``, int8 input and output).  Keras's logits are
  checked against ours first, so both sides carry the same function.

ExecuTorch (its Python runtime, XNNPACK delegate, thread pool set to ``--threads``), all files
loaded and timed in one fresh subprocess that runs nothing else:

- ours fp32: ``deploy.export(model, "m.pte")`` (``mobilenets export --format executorch``: the
  folded model at batch 1);
- reference fp32: ExecuTorch's XNNPACK example flow on the plain model (BatchNorm not folded):
  ``torch.export.export(model, (x,))`` at batch 1, ``to_edge_transform_and_lower(...,
  partitioner=[XnnpackPartitioner()])``, ``to_executorch()``.
- diagnostic, not a product: our folded graph through that same example flow, which separates the
  graph from our lowering (an earlier dynamic batch dimension in our files cost 2-4%);
- int8: ours ``deploy.export(model, "m.pte", precision="int8")`` (the int8-ready ranges); reference: the
  example flow's XNNPACKQuantizer (symmetric, per channel) calibrated on the same crops.

Timing: the runtime's own call on one preprocessed held-out crop already in the file's input type
(``set_tensor`` + ``invoke`` + ``get_tensor``; ``Method.execute``), all candidates of a runtime in
the same interleaved rounds (``deploy.interleaved``); medians and ratios (reference median / ours:
above 1, ours is faster).  Parity: every file's logits on the held-out crops against the PyTorch
float model (top-1 agreement, cosine, max abs diff).  Writes benchmarks/results/edge_runtimes.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "nice env OMP_NUM_THREADS=1 PYTHONPATH=src:tests .venv/bin/python benchmarks/edge_runtimes.py"


# ---------------------------------------------------------------- TensorFlow side (subprocess; no torch)


def keras_weights(state: dict) -> dict:
    """Our state dict (numpy) as tf_keras MobileNet's per-layer weight lists (HWIO kernels, BN as 4 vectors)."""
    out = {}

    def bn(prefix, name):
        out[name] = [state[f"{prefix}.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]

    out["conv1"] = [state["features.0.conv.weight"].transpose(2, 3, 1, 0)]
    bn("features.0", "conv1_bn")
    for i in range(1, 14):
        out[f"conv_dw_{i}"] = [state[f"features.{i}.depthwise.conv.weight"].transpose(2, 3, 0, 1)]
        bn(f"features.{i}.depthwise", f"conv_dw_{i}_bn")
        out[f"conv_pw_{i}"] = [state[f"features.{i}.pointwise.conv.weight"].transpose(2, 3, 1, 0)]
        bn(f"features.{i}.pointwise", f"conv_pw_{i}_bn")
    out["conv_preds"] = [state["classifier.weight"].T[None, None], state["classifier.bias"]]
    return out


def tf_child(folder: Path) -> None:
    """Keras's MobileNet with our weights: its logits on the held-out crops, and TFLiteConverter's fp32 and int8."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf
    import tf_keras

    data = np.load(folder / "keras_inputs.npz")
    layers = dict(np.load(folder / "keras_weights.npz", allow_pickle=True)["layers"].item())
    model = tf_keras.applications.MobileNet(input_shape=(224, 224, 3), alpha=1.0, weights=None, classes=1000,
                                            classifier_activation=None)
    for name, values in layers.items():
        model.get_layer(name).set_weights([np.asarray(v, np.float32) for v in values])
    np.save(folder / "keras_logits.npy", model.predict(data["held"], batch_size=16, verbose=0))
    calib = data["calib"]

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    seconds = {}
    t0 = time.perf_counter()
    (folder / "reference_fp32.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    seconds["fp32"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    (folder / "reference_int8.tflite").write_bytes(converter.convert())
    seconds["int8"] = time.perf_counter() - t0
    (folder / "tf.json").write_text(json.dumps({"tensorflow": tf.__version__, "convert_s": seconds}))


# ---------------------------------------------------------------- ExecuTorch side (fresh subprocess)


def et_child(spec_path: Path) -> None:
    """Both programs loaded in a process that runs nothing else: logits on the held-out crops, then timing."""
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    from mobilenets import deploy

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    _unsafe_reset_threadpool(spec["threads"])  # before any method runs; ExecuTorch has no public setter
    held = torch.from_numpy(np.load(spec["held"]))
    programs, methods, logits = [], {}, {}
    for name, path in spec["files"].items():
        programs.append(Runtime.get().load_program(Path(path).read_bytes()))  # kept: the method reads it
        methods[name] = programs[-1].load_method("forward")
        logits[name] = np.concatenate([methods[name].execute([held[i:i + 1].contiguous()])[0].numpy()
                                       for i in range(len(held))])
        np.save(Path(spec["out"]) / f"{name}.npy", logits[name])
    x = held[:1].contiguous()
    times = deploy.interleaved({n: (lambda _, m=m: m.execute([x])) for n, m in methods.items()}, None,
                               rounds=spec["rounds"], min_time=spec["min_time"])
    (Path(spec["out"]) / "times.json").write_text(json.dumps(times))


# ---------------------------------------------------------------- main process


def litert_call(data: bytes, image_nhwc: np.ndarray, threads: int):
    """The interpreter's call on one preprocessed image already in the file's input type, and its coverage."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data, num_threads=threads)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    a = image_nhwc
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        a = np.clip(np.round(a / scale) + zero, info.min, info.max).astype(inp["dtype"])
    coverage = litert_coverage(interp._get_ops_details(), out["index"])  # noqa: SLF001 -- its only node view

    def call(_=None):
        interp.set_tensor(inp["index"], a)
        interp.invoke()
        return interp.get_tensor(out["index"])

    return call, coverage


def litert_coverage(ops: list[dict], output: int) -> str:
    """XNNPACK's nodes and the ops left outside them (TFLite lists the original nodes, then the delegate nodes)."""
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    d_in = {int(t) for o in delegates for t in o["inputs"]}
    d_out = {int(t) for o in delegates for t in o["outputs"]}
    inside_out = lambda o: any(int(t) in d_out for t in o["outputs"])  # noqa: E731 -- a replaced node's output
    outside, produced = [], set()
    for o in ops:  # in graph order: a node outside reads a delegate's output or an outside node's
        ins, outs = {int(t) for t in o["inputs"]}, {int(t) for t in o["outputs"]}
        if o["op_name"] == "DELEGATE" or inside_out(o) or ins & d_in:  # a delegate's first node reads its inputs
            continue
        if ins & (d_out | produced) or outs & d_in or (output in outs and output not in d_out):
            outside.append(o["op_name"])
            produced |= outs
    return f"{len(delegates)} XNNPACK node(s)" + (f"; outside: {', '.join(outside)}" if outside else ", whole graph")


def pte_coverage(path: Path) -> str:
    """What the program's instructions are: XNNPACK delegate calls, and the portable kernels between them."""
    from executorch.exir._serialize._program import deserialize_pte_binary  # the only reader of a .pte's plan

    plans = deserialize_pte_binary(path.read_bytes()).program.execution_plan
    plan = next(p for p in plans if p.name == "forward")  # the others return constants (labels, resolution ...)
    calls = [i.instr_args for i in plan.chains[0].instructions]
    delegated = sum(1 for c in calls if type(c).__name__ == "DelegateCall")
    kernels = [plan.operators[c.op_index].name for c in calls if type(c).__name__ == "KernelCall"]
    return f"{delegated} XNNPACK call(s)" + (f" + kernels {', '.join(kernels)}" if kernels else "")


def scores(reference, logits) -> dict:
    import torch

    logits = torch.as_tensor(np.asarray(logits, np.float32))
    return {"top1_agreement": float((reference.argmax(1) == logits.argmax(1)).float().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(reference, logits, dim=1).mean()),
            "max_abs_diff": float((reference - logits).abs().max())}


def summary(times: dict, pairs: list[tuple[str, str]]) -> dict:
    out = {name: {"median_ms": statistics.median(t), "p25_ms": float(np.percentile(t, 25)),
                  "p90_ms": float(np.percentile(t, 90)), "calls": len(t)} for name, t in times.items()}
    for ours, reference in pairs:
        out[ours]["reference_over_ours"] = out[reference]["median_ms"] / out[ours]["median_ms"]
        out[ours]["reference_over_ours_p25"] = out[reference]["p25_ms"] / out[ours]["p25_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="threads for every runtime (default 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per candidate per round")
    p.add_argument("--calib", type=int, default=64, help="calibration crops for both int8 files")
    p.add_argument("--held", type=int, default=64, help="held-out crops for parity")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edge_runtimes"))
    p.add_argument("--tf-child", help=argparse.SUPPRESS)
    p.add_argument("--et-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tf_child:
        return tf_child(Path(args.tf_child))
    if args.et_child:
        return et_child(Path(args.et_child))

    import importlib.metadata as md

    import torch

    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import real_data
    from mobilenets import deploy

    torch.set_num_threads(args.threads)
    started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    model = real_data.real_model().eval()
    calib_nhwc = real_data.inception_input(real_data.calibration_crops(args.calib), "nhwc")
    held_nhwc = real_data.inception_input(real_data.heldout_crops(args.held), "nhwc")
    calib, held = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (calib_nhwc, held_nhwc))
    with torch.no_grad():
        reference = model(held)
    result = {"command": COMMAND + " " + " ".join(sys.argv[1:]), "started": started, "cpu": deploy.cpu_name(),
              "threads": args.threads, "loadavg_before": load_before, "calibration_crops": args.calib,
              "heldout_crops": args.held, "versions": {d: md.version(d) for d in
                                                       ("torch", "ai-edge-litert", "executorch", "tensorflow")},
              "files": {}, "parity": {}, "build_s": {}}
    with tempfile.TemporaryDirectory(prefix="edge-runtimes-") as tmp:
        folder = Path(tmp)
        # ---- reference .tflite files from TensorFlow, in its own process
        state = {k: v.numpy() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        np.savez(folder / "keras_weights.npz", layers=np.array(keras_weights(state), dtype=object))
        np.savez(folder / "keras_inputs.npz", calib=calib_nhwc, held=held_nhwc)
        log("TensorFlow: Keras MobileNet with these weights, TFLiteConverter fp32 and int8 ...")
        subprocess.run([sys.executable, __file__, "--tf-child", str(folder)], check=True)
        tf_info = json.loads((folder / "tf.json").read_text())
        result["versions"]["tensorflow"] = tf_info["tensorflow"]
        result["build_s"].update({f"litert reference {k}": v for k, v in tf_info["convert_s"].items()})
        keras = scores(reference, np.load(folder / "keras_logits.npy"))
        result["keras_vs_ours"] = keras
        if keras["max_abs_diff"] > 1e-3 * float((reference - reference.mean(0)).abs().max()):
            raise SystemExit(f"Keras with our weights does not compute our logits: {keras}")
        # ---- our files
        files = {}
        for precision in ("fp32", "int8"):
            t0 = time.perf_counter()
            files[f"litert ours {precision}"] = deploy.export(
                model, folder / f"ours_{precision}.tflite", "tflite", precision=precision,
                calibration=[calib] if precision == "int8" else None, resolution=224)
            result["build_s"][f"litert ours {precision}"] = time.perf_counter() - t0
            files[f"litert reference {precision}"] = folder / f"reference_{precision}.tflite"
        t0 = time.perf_counter()
        files["executorch ours fp32"] = deploy.export(model, folder / "ours_fp32.pte", "executorch", resolution=224)
        result["build_s"]["executorch ours fp32"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        files["executorch reference fp32"] = example_flow_pte(model, folder / "reference_fp32.pte")
        result["build_s"]["executorch reference fp32"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        files["executorch ours int8"] = deploy.export(model, folder / "ours_int8.pte", "executorch", precision="int8",
                                                      calibration=[calib], resolution=224)
        result["build_s"]["executorch ours int8"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        files["executorch reference int8"] = example_flow_pte(model, folder / "reference_int8.pte", calib)
        result["build_s"]["executorch reference int8"] = time.perf_counter() - t0
        # diagnostic: our folded graph through the example flow itself, to separate the graph from our lowering
        files["executorch ours-batch1 fp32"] = example_flow_pte(deploy.fold_batchnorm(model),
                                                                folder / "ours_batch1_fp32.pte")
        result["files"] = {name: {"bytes": path.stat().st_size} for name, path in files.items()}
        for name in [n for n in files if n.startswith("executorch")]:
            result["files"][name]["xnnpack"] = pte_coverage(files[name])
        # ---- LiteRT: parity over the held-out crops, then timing, all four in the same rounds
        calls = {}
        for name in [n for n in files if n.startswith("litert")]:
            call, coverage = litert_call(files[name].read_bytes(), held_nhwc[:1], args.threads)
            result["files"][name]["xnnpack"] = coverage
            calls[name] = call
            run = deploy.load_exported(files[name], "tflite")
            result["parity"][name] = scores(reference, torch.cat([run(held[i:i + 1]) for i in range(len(held))]))
        log(f"LiteRT: timing {len(calls)} files, {args.rounds} interleaved rounds ...")
        times = deploy.interleaved(calls, None, rounds=args.rounds, min_time=args.min_time)
        # ---- ExecuTorch: a fresh process that only loads and runs the programs
        np.save(folder / "held.npy", held.numpy())
        spec = {"files": {n: str(files[n]) for n in files if n.startswith("executorch")},
                "held": str(folder / "held.npy"), "threads": args.threads, "rounds": args.rounds, "min_time": args.min_time, "out": str(folder)}
        (folder / "et.json").write_text(json.dumps(spec))
        log("ExecuTorch: parity and timing in a fresh process ...")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, "--et-child", str(folder / "et.json")], check=True, env=env)
        times.update(json.loads((folder / "times.json").read_text()))
        for name in spec["files"]:
            result["parity"][name] = scores(reference, np.load(folder / f"{name}.npy"))
    result["timing"] = summary(times, [(f"{r} {who} {p}", f"{r} reference {p}") for r, who, p in
                                       (("litert", "ours", "fp32"), ("litert", "ours", "int8"),
                                        ("executorch", "ours", "fp32"), ("executorch", "ours", "int8"),
                                        ("executorch", "ours-batch1", "fp32"))])
    result["loadavg_after"] = os.getloadavg()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def example_flow_pte(model, path: Path, calib=None) -> Path:
    """ExecuTorch's XNNPACK example flow, static batch 1 (the reference: on the plain, BatchNorm unfolded model);
    with ``calib``, int8 as its example quantizes: XNNPACKQuantizer (symmetric, per channel), PT2E calibrated
    on ``calib``."""
    import warnings

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = (torch.randn(1, 3, 224, 224),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = model.eval()
        if calib is not None:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
            with torch.no_grad():
                for x in calib.split(1):
                    prepared(x)
            module = convert_pt2e(prepared)
        program = torch.export.export(module, example)
        path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
                         .to_executorch().buffer)
    return path


def markdown(r: dict) -> str:
    t, par, files = r["timing"], r["parity"], r["files"]
    lines = [
        "# Edge runtimes at batch 1: our files against each runtime's reference export of the same weights",
        "",
        f"Command: `{r['command']}`",
        "",
        f"CPU: {r['cpu']}; {r['threads']} thread(s) in every runtime; load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.2f}' for v in r['loadavg_before'])} before, "
        f"{', '.join(f'{v:.2f}' for v in r['loadavg_after'])} after (a 2-core machine shared with other jobs). "
        f"{r['started']} to {r['finished']}. "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        "",
        f"Weights: Google's MobileNet v1 1.0-224 (tests/real_data.py). int8 calibrated on {r['calibration_crops']} "
        f"crops; parity on {r['heldout_crops']} held-out crops against the PyTorch float model. Keras's MobileNet "
        f"given these weights matched our logits (max abs diff {r['keras_vs_ours']['max_abs_diff']:.2g}) before "
        f"TFLiteConverter ran.",
        "",
        "| runtime | precision | file | median ms | p25 ms | p90 ms | reference / ours (median, p25) | "
        "top-1 agreement | cosine | max abs diff | bytes | XNNPACK |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in t:
        runtime, who, precision = name.split()
        label = {"ours": "ours (`mobilenets export`)",
                 "ours-batch1": "ours with the batch fixed at 1 (diagnostic: not what export writes)",
                 "reference": "TFLiteConverter from Keras" if runtime == "litert" else "ExecuTorch example flow"}[who]
        ratio = (f"{t[name]['reference_over_ours']:.2f}x, {t[name]['reference_over_ours_p25']:.2f}x"
                 if "reference_over_ours" in t[name] else "")
        lines.append(f"| {runtime} | {precision} | {label} | {t[name]['median_ms']:.2f} | {t[name]['p25_ms']:.2f} | "
                     f"{t[name]['p90_ms']:.2f} | "
                     f"{ratio} | {100 * par[name]['top1_agreement']:.1f}% | {par[name]['cosine']:.5f} | "
                     f"{par[name]['max_abs_diff']:.3g} | {files[name]['bytes']:,} | "
                     f"{files[name]['xnnpack']} |")
    lines += ["", "reference / ours: the reference's median (and lower quartile) over ours; above 1, ours is "
              "faster. On a shared CPU a 1-thread call is either run through or preempted, so the lower quartile "
              "is what each file takes when it has the core. XNNPACK: the delegate nodes of each file and the "
              "ops left to the runtime's own kernels.",

              "", "Seconds to write each file: " + ", ".join(f"{k} {v:.0f}" for k, v in r["build_s"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
