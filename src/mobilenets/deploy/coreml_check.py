"""A saved Core ML package checked against the PyTorch model on a machine that cannot run Core ML.

Core ML runs only on Apple platforms.  :func:`check` reads the ``.mlpackage``
back from disk with coremltools (its spec and its ML program with the stored
constants) and compares it with the folded graph that export wrote:

- the image input (square, RGB) and its scaling (the model's normalization),
  the classifier outputs and every class label (or the ``features`` output);
- one convolution per folded layer with its stride and groups, one activation
  after each with its clip (ReLU6's 6, or per channel for equalized int8-ready
  weights), and the fully connected classifier;
- every stored weight, bias and clip at the package's precision: fp32 equal,
  fp16 equal to the fp32 value rounded to half precision (below fp16's normal
  range, within its smallest step, 2^-24), int8 with one scale
  per output channel of max|w| / 127 (stored as fp16) and every code equal to
  round(w / scale), mobilenets.quantize's rule;
- given images, the program evaluated op by op in PyTorch (:mod:`.mlprogram`)
  against the model's logits: a check of what the file computes, not of Core
  ML, and reported as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..quantize.sim import clamp_of
from .calibration import as_input
from .coreml_package import (FEATURES, INPUT, LABEL, NOT_RUN, PROBABILITIES, WEIGHT_QMAX, class_labels,
                             import_coremltools, input_scaling, int8_codes, normalization_of, num_classes_of, quiet,
                             weight_layers)
from .fidelity import parity
from .machine import DeployError
from .mlprogram import dequantize, evaluate

SPECIFICATION_VERSION = 7  # Core ML 6: iOS 16, macOS 13, the first with int8 (constexpr) weights
FP16_TINY = 2.0 ** -24  # the smallest fp16 magnitude; below half of it a value rounds to 0
FP16_NORMAL = 2.0 ** -14  # the smallest normal fp16: below it, fp16 keeps fewer significant bits
EVALUATION_BATCH = 16  # images evaluated at once: the program's activations at 224 are ~20 MB per image
ACTIVATIONS = ("clip", "relu", "minimum")


def read(path):
    """(spec, main function) of a saved package, as coremltools reads them from disk (no Core ML needed)."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise DeployError(f"{path} is not an .mlpackage folder (it has no Manifest.json)")
    try:
        with quiet():
            model = ct.models.MLModel(str(path), skip_model_load=True)
            spec = model.get_spec()
            kind = spec.WhichOneof("Type")
            if kind != "mlProgram":
                raise DeployError(f"{path.name} holds a Core ML {kind}, not an ML program")
            program = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise DeployError(f"coremltools cannot read {path.name}: {str(e).strip().splitlines()[0]}") from None
    return spec, program.functions["main"]


def stored(var) -> tuple[np.ndarray, str, np.ndarray | None, np.ndarray | None]:
    """(float value, precision, int8 codes, per-output-channel scale) of a constant as the package stores it."""
    from coremltools.converters.mil.mil import types

    if var.op.op_type == "constexpr_affine_dequantize":
        op = var.op
        if int(op.axis.val) != 0 or np.any(op.zero_point.val != 0) or op.quantized_data.val.dtype != np.int8:
            raise DeployError(f"{var.name}: int8 weights must be symmetric with one scale per output channel")
        return (dequantize(op).numpy(), "int8", np.asarray(op.quantized_data.val),
                np.asarray(op.scale.val, np.float64).reshape(-1))
    kind = types.builtin_to_string(var.dtype)
    if var.op.op_type != "const" or kind not in ("fp16", "fp32"):
        raise DeployError(f"{var.name}: expected a constant fp16, fp32 or int8 tensor, got {var.op.op_type} {kind}")
    return np.asarray(var.val), kind, None, None


def compare(name: str, value: np.ndarray, expected: torch.Tensor, precision: str) -> float:
    """Raise unless fp32/fp16 ``value`` is ``expected`` stored at ``precision``; returns the largest difference."""
    want = expected.detach().float().numpy()
    if value.shape != want.shape:
        raise DeployError(f"{name}: the package holds shape {value.shape}, the model {want.shape}")
    error = np.abs(value.astype(np.float64) - want)
    rounded = want.astype(np.float16) if precision == "fp16" else want
    differ = value != rounded
    if precision == "fp16":  # below fp16's normal range coremltools may round to the other neighbour
        differ &= ~((np.abs(want) < FP16_NORMAL) & (error <= FP16_TINY))
    if value.dtype != rounded.dtype or np.any(differ):
        raise DeployError(f"{name}: the stored {value.dtype} values are not the model's rounded to {precision} "
                          f"(max difference {float(error.max()):.3g})")
    return float(error.max())


def compare_int8(name: str, value: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                 expected: torch.Tensor) -> tuple[float, int]:
    """Raise unless the int8 ``codes`` and ``scale`` are mobilenets.quantize's for ``expected``.

    Returns (largest |dequantized - expected| in steps, number of codes that differ).  The codes must be
    equal wherever the scale is in fp16's normal range; below it (channels whose weights are all under
    about 0.008, nearly dead ones of the released weights) coremltools' fp16 division may move a code, and
    those weights must be within one step.
    """
    want_codes, want_scale = (t.numpy().astype(np.float64) for t in int8_codes(expected.detach().float()))
    want = expected.detach().float().numpy().astype(np.float64)
    if codes.shape != want.shape:
        raise DeployError(f"{name}: the package holds shape {codes.shape}, the model {want.shape}")
    # the scale is stored as fp16: within 2^-10 relative (its rounding and coremltools' fp16 division), or
    # fp16's smallest step below its normal range
    if np.any(np.abs(scale - want_scale) > want_scale * 2.0 ** -10 + FP16_TINY):
        raise DeployError(f"{name}: its int8 scales are not max|w| / 127 per output channel")
    per_channel = (-1,) + (1,) * (want.ndim - 1)
    normal = np.broadcast_to((scale >= FP16_NORMAL).reshape(per_channel), want.shape)
    differ = codes != want_codes
    if np.any(differ & normal):
        raise DeployError(f"{name}: {int((differ & normal).sum())} int8 codes differ from round(w / scale)")
    step = np.broadcast_to(np.maximum(want_scale, FP16_TINY).reshape(per_channel), want.shape)
    steps = np.abs(value.astype(np.float64) - want) / step
    if np.any(steps[~normal] > 1.0 + WEIGHT_QMAX * FP16_TINY / step[~normal]):
        raise DeployError(f"{name}: int8 weights of its smallest channels are more than one step from the model's")
    return float(steps.max()), int(differ.sum())


def _check_io(name: str, spec, ops, metadata: dict, labels) -> tuple[int, list[str]]:
    """The image input, its scaling and the outputs; returns (resolution, output names)."""
    inputs = spec.description.input
    if [i.name for i in inputs] != [INPUT] or inputs[0].type.WhichOneof("Type") != "imageType":
        raise DeployError(f"{name}: expected one image input named {INPUT!r}")
    image = inputs[0].type.imageType
    color = type(image).ColorSpace.Name(image.colorSpace)
    if image.height != image.width or color != "RGB":
        raise DeployError(f"{name}: expected a square RGB image input, got {image.height}x{image.width} {color}")

    scale, bias, _ = input_scaling(*normalization_of(metadata))
    mul = next((op for op in ops if op.op_type == "mul" and op.x.name == INPUT), None)
    add = next((op for op in ops if op.op_type == "add" and mul is not None and op.x.name == mul.outputs[0].name),
               None)
    stored_scale = float(np.asarray(mul.y.val).reshape(-1)[0]) if mul is not None else float("nan")
    stored_bias = np.asarray(add.y.val, np.float64).reshape(-1) if add is not None else np.zeros(3)
    # coremltools stores the scale and bias as fp32
    if not abs(stored_scale - scale) <= 2.0 ** -23 * scale or not np.allclose(stored_bias, bias, rtol=2.0 ** -23,
                                                                             atol=2.0 ** -23):
        raise DeployError(f"{name}: its image scaling (scale {stored_scale}, bias {list(stored_bias)}) is not the "
                          f"model's normalization (scale {scale}, bias {bias})")

    outputs = [o.name for o in spec.description.output]
    if labels is None:
        if outputs != [FEATURES]:
            raise DeployError(f"{name}: expected one output {FEATURES!r}, got {outputs}")
        return int(image.width), outputs
    classify = [op for op in ops if op.op_type == "classify"]
    stored_labels = [v.item() if hasattr(v, "item") else v for v in classify[0].classes.val] if classify else []
    if outputs != [LABEL, PROBABILITIES] or spec.description.predictedProbabilitiesName != PROBABILITIES:
        raise DeployError(f"{name}: expected classifier outputs {[LABEL, PROBABILITIES]}, got {outputs}")
    if [str(v) for v in stored_labels] != [str(v) for v in labels]:
        raise DeployError(f"{name}: its {len(stored_labels)} class labels are not the model's {len(labels)}")
    return int(image.width), outputs


def _layers(ops) -> list[tuple]:
    """(conv or linear op, [activation ops after it]) in program order."""
    layers = []
    for op in ops:
        if op.op_type in ("conv", "linear"):
            layers.append((op, []))
        elif op.op_type in ACTIVATIONS and layers:
            layers[-1][1].append(op)
    return layers


def _clip_of(name: str, activations) -> tuple[np.ndarray, str]:
    """The upper clip of a layer's activation ops (inf for ReLU alone) and the precision it is stored at."""
    kinds = [op.op_type for op in activations]
    if kinds == ["clip"] and float(activations[0].alpha.val) == 0.0:
        beta = activations[0].beta
        return np.asarray([beta.val]), ("fp16" if np.asarray(beta.val).dtype == np.float16 else "fp32")
    if kinds == ["relu"]:
        return np.asarray([np.inf]), "fp32"
    if kinds == ["relu", "minimum"]:
        value, kind, _, _ = stored(activations[1].y)
        return value.reshape(-1), kind
    raise DeployError(f"{name}: expected ReLU6, ReLU or ReLU with a clip per channel, got {kinds}")


def check(path, reference, metadata: dict, *, precision: str | None = None, images=None, logits=None,
          labels=None) -> dict:
    """The package at ``path`` checked as the module docstring says; a report dict, or DeployError.

    ``reference(precision, resolution)`` is the folded graph export wrote at
    the package's precision; ``precision``, if given, is the one expected.
    With ``images`` and the model's ``logits`` on them, ``reference_evaluation``
    holds :func:`~.fidelity.parity` of the program evaluated in PyTorch.
    """
    spec, main = read(path)
    name = Path(path).name
    if spec.specificationVersion < SPECIFICATION_VERSION:
        raise DeployError(f"{name}: specification version {spec.specificationVersion}, expected "
                          f"{SPECIFICATION_VERSION} (iOS 16) or later")
    ops = list(main.operations)
    layers = _layers(ops)
    if not layers or layers[0][0].op_type != "conv":
        raise DeployError(f"{name}: its program holds no convolution")
    kind = stored(layers[0][0].weight)[1]
    if precision is not None and kind != precision:
        raise DeployError(f"{name}: holds {kind} weights, not {precision}")
    image = spec.description.input[0].type
    resolution = int(image.imageType.width) if image.WhichOneof("Type") == "imageType" else 0
    folded = reference(kind, resolution)
    labels_wanted = class_labels(metadata, num_classes_of(folded))
    resolution, outputs = _check_io(name, spec, ops, metadata, labels_wanted)

    _, _, gain = input_scaling(*normalization_of(metadata))
    modules = weight_layers(folded)
    convs = sum(op.op_type == "conv" for op, _ in layers)
    if convs != len(folded.features) or len(layers) != len(modules):
        raise DeployError(f"{name}: {convs} convolutions and {len(layers) - convs} fully connected layers; the "
                          f"model has {len(folded.features)} and {len(modules) - len(folded.features)}")
    worst_weight = worst_other = 0.0
    codes_differ = 0
    for i, ((op, activations), module) in enumerate(zip(layers, modules)):
        label = f"{name}: layer {i} ({op.op_type})"
        if op.op_type == "conv":
            if [int(s) for s in op.strides.val] != list(module.stride) or int(op.groups.val) != module.groups:
                raise DeployError(f"{label} has strides {list(op.strides.val)} and groups {op.groups.val}, the "
                                  f"model {list(module.stride)} and {module.groups}")
            clip, clip_kind = _clip_of(label, activations)
            want = clamp_of(folded.features[i], module.out_channels)
            if len(clip) == 1 and bool((want == want[0]).all()):  # one clip for the layer, as the model has
                want = want[:1]
            if not (np.isinf(clip).all() and bool(torch.isinf(want).all())):  # ReLU alone: nothing to compare
                worst_other = max(worst_other, compare(f"{label} clip", clip, want, clip_kind))
        elif activations:
            raise DeployError(f"{label}: the classifier has an activation")
        weight = module.weight * gain.view(1, -1, 1, 1) if i == 0 else module.weight
        value, stored_kind, codes, scale = stored(op.weight)
        if stored_kind != kind:
            raise DeployError(f"{label}: {stored_kind} weights among {kind} ones")
        if kind == "int8":
            steps, differ = compare_int8(f"{label} weight", value, codes, scale, weight)
            worst_weight, codes_differ = max(worst_weight, steps), codes_differ + differ
        else:
            worst_weight = max(worst_weight, compare(f"{label} weight", value, weight, kind))
        bias, bias_kind, _, _ = stored(op.bias)
        worst_other = max(worst_other, compare(f"{label} bias", bias, module.bias, bias_kind))

    report = {"path": str(path), "format": "coreml", "precision": kind, "executed": False, "why": NOT_RUN,
              "specification_version": int(spec.specificationVersion), "input": INPUT, "resolution": resolution,
              "outputs": outputs, "classes": len(labels_wanted or []), "convolutions": convs,
              "weights": "int8-ready" if folded.int8_ready is not None else "folded",
              "weight_tensors": len(layers),
              ("weights_max_steps" if kind == "int8" else "weights_max_abs_diff"): worst_weight,
              **({"int8_codes_differing": codes_differ} if kind == "int8" else {}),
              "biases_and_clips_max_abs_diff": worst_other}
    if images is not None:
        report["reference_evaluation"] = parity(logits, reference_run(main, metadata)(images), labels)
    return report


def reference_run(main, metadata: dict):
    """``run(x) -> logits``: the package's program evaluated op by op in PyTorch (:mod:`.mlprogram`), not Core ML.

    ``x`` is the model's preprocessed input; it goes in as the pixels it came
    from, (x * std + mean) * 255, which the program scales back itself.  The
    logits are the input of the program's softmax, or its features output.
    """
    mean, std = normalization_of(metadata)
    softmax = next((op for op in main.operations if op.op_type == "softmax"), None)
    out = softmax.x.name if softmax is not None else main.outputs[0].name
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def run(x) -> torch.Tensor:
        pixels = (as_input(x) * s + m) * 255.0
        with torch.no_grad():
            return torch.cat([evaluate(main, {INPUT: chunk})[out] for chunk in pixels.split(EVALUATION_BATCH)])

    return run
