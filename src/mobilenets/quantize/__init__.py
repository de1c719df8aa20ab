"""int8-ready weights: the float model adjusted so that its int8 version keeps its answers.

MobileNet v1 loses a third of its top-1 answers under plain post-training int8: folded BatchNorm
leaves activation channels of very different ranges sharing one int8 scale, and weight rounding
shifts each layer's mean output.  :func:`prepare_int8` works on the folded float model, so every
int8 backend and export gets the result:

1. cross-layer equalization of the activation channels (ReLU6's clip scales with each channel),
2. layer by layer on the calibration images: int8 weights rounded to least output error
   (:mod:`.rounding`), then bias correction of the expected output shift that int8 still causes,
3. activation ranges chosen by squared error instead of min/max (the logits keep theirs: none clipped),
4. optionally (``steps > 0``) fine-tuning with fake quantization against the float model's own
   softmax (distillation: no labels).

The result saves as an ordinary mobilenets ``.safetensors`` file (float weights, with the ranges
and equalization scales in its metadata), so ``mobilenets.load(FILE)`` gives the adjusted float
model and :func:`from_model` (used by the int8 backends) gives the int8-ready form back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import metadata
from ..progress import Progress
from ..checks import is_number
from ..folding import FoldedMobileNet, fold_batchnorm
from ..errors import QuantizeError
from ..model import ConvBNAct, MobileNetV1
from . import calibrate, sim
from .sim import scalar_clips

FORMAT_VERSION = 1
# int8 data whose weights are on a grid narrower than [-127, 127] (:data:`sim.REDUCED_WEIGHT_QMAX`) is written as
# version 2: a mobilenets that reads only version 1 would quantize those weights on the full grid, so it refuses
REDUCED_RANGE_VERSION = 2
METHODS = ("mse", "minmax", "p99.99", "p99.999")
ROUNDINGS = ("error", "nearest")
WEIGHT_QMAXES = (sim.WEIGHT_QMAX, sim.REDUCED_WEIGHT_QMAX)


@dataclass
class Int8Ready:
    """A folded float model (equalized: per-channel ReLU6 clips) and the ranges of its int8 graph."""

    folded: FoldedMobileNet
    ranges: dict                     # "input", "features.<i>", "pool", "logits" -> (lo, hi)
    scales: list                     # per folded layer, the equalization scale of each output channel
    resolution: int
    report: dict = field(default_factory=dict)
    # the int8 weights lie on [-weight_qmax, weight_qmax] steps per output channel: 127, or 64 where the x86
    # kernels that run them would saturate with more (no VNNI: sim.REDUCED_WEIGHT_QMAX)
    weight_qmax: int = sim.WEIGHT_QMAX

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the int8 graph computed in float (fake quantization): what the backends run."""
        with torch.no_grad():
            return sim.simulate(self.folded, self.ranges, x, weight_qmax=self.weight_qmax)

    def metadata(self) -> dict:
        full = self.weight_qmax == sim.WEIGHT_QMAX
        return {"version": FORMAT_VERSION if full else REDUCED_RANGE_VERSION,
                "weights": "int8 symmetric per output channel",
                "weight_qmax": self.weight_qmax,
                "activations": "uint8 affine per tensor",
                "ranges": {k: [float(a), float(b)] for k, (a, b) in self.ranges.items()},
                "scales": [[float(v) for v in s] for s in self.scales],
                "report": self.report}


def _check(model) -> None:
    if not isinstance(model, MobileNetV1):
        raise QuantizeError(f"model must be a mobilenets MobileNetV1 (mobilenets.load or mobilenet_v1), "
                            f"got {type(model).__name__}")
    if model.config.num_classes == 0:
        raise QuantizeError("model has no classifier (num_classes=0); int8 preparation needs logits to keep")


def _batches(calibration) -> list[torch.Tensor]:
    out = []
    for b in calibration:
        b = b[0] if isinstance(b, (tuple, list)) else b
        b = torch.as_tensor(b).float()
        if b.dim() != 4 or b.shape[1] != 3:
            raise QuantizeError(f"calibration batches must be (N, 3, H, W) preprocessed images, got {tuple(b.shape)}")
        out.append(b)
    if not out:
        raise QuantizeError("calibration is empty: pass batches of preprocessed images "
                            "(mobilenets.deploy.image_batches(folder, resolution) reads a folder)")
    return out


def prepare_int8(model: MobileNetV1, calibration, *, steps: int = 0, equalize: bool = True,
                 bias_correction: bool = True, method: str = "mse", rounding: str = "error", beta: float = 0.5,
                 lr: float = 0.002, batch_size: int = 16, seed: int = 0, log=None,
                 weight_qmax: int = sim.WEIGHT_QMAX) -> Int8Ready:
    """The int8-ready form of ``model`` from unlabeled ``calibration`` batches ((N, 3, H, W), preprocessed).

    ``steps`` > 0 fine-tunes the quantized model for that many steps against the float model's
    softmax on the same images (flipped and re-cropped).  ``method`` chooses activation ranges:
    "mse" (least squared error), "minmax", or a percentile such as "p99.99".  ``rounding`` chooses
    the int8 weights: "error" (least error of each convolution's outputs on the calibration images,
    kept unless rounding to nearest gives the int8 model less divergence from the float one there)
    or "nearest".  ``weight_qmax``: the int8 weights' grid, [-weight_qmax, weight_qmax] steps per output
    channel: 127, or :data:`sim.REDUCED_WEIGHT_QMAX` (64) for x86 CPUs without VNNI, whose int8 kernels
    saturate on larger weights (every step, rounding and bias correction included, is then done on that grid).
    """
    _check(model)
    if method not in METHODS:
        raise QuantizeError(f"method must be one of {METHODS}, got {method!r}")
    if rounding not in ROUNDINGS:
        raise QuantizeError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not isinstance(steps, int) or steps < 0:
        raise QuantizeError(f"steps must be an integer >= 0, got {steps!r}")
    if weight_qmax not in WEIGHT_QMAXES:
        raise QuantizeError(f"weight_qmax must be one of {WEIGHT_QMAXES} (full int8, or 7-bit weights for x86 CPUs "
                            f"without VNNI), got {weight_qmax!r}")
    batches = _batches(calibration)
    folded = fold_batchnorm(model)
    # the steps: equalization, each layer's calibration, the comparison of the roundings
    with Progress(f"int8: preparing on {sum(len(b) for b in batches)} calibration images",
                  len(folded.features) + 2, log, unit="steps") as shown:
        scales = [torch.ones(layer.conv.out_channels) for layer in folded.features]
        if equalize:
            folded, scales = calibrate.equalize(folded, batches, beta=beta)
        shown.advance()
        teacher = folded
        modes = ("error", "nearest") if rounding == "error" else (rounding,)
        float_logits, results = calibrate.calibrate_roundings(folded, batches, modes, method=method,
                                                              bias_correction=bias_correction, seed=seed,
                                                              weight_qmax=weight_qmax, step=shown.advance)
        candidates = dict(zip(modes, results))
        # rounding by error minimises each layer's own output error, which on a small model fitted for a few
        # steps can leave the end result a little worse (one of 24 digits): keep what diverges less here.
        # Judged on the simulation, whose biases are on the runtimes' int32 grid; calibration's int8 path keeps
        # float biases, and on a small model those tie flips alone moved this KL by a tenth (tests/test_quantize.py)
        with torch.no_grad():
            divergences = {mode: _kl(float_logits, [sim.simulate(c.folded, c.ranges, x, weight_qmax=weight_qmax)
                                                    for x in batches])
                           for mode, c in candidates.items()}
        kept = min(divergences, key=divergences.get)
        shown.advance()
    folded, ranges = candidates[kept].folded, candidates[kept].ranges
    report = {"equalize": equalize, "bias_correction": bias_correction, "method": method, "rounding": rounding,
              "rounding_kept": kept, "rounding_kl": divergences, "beta": beta,
              "calibration_images": sum(len(b) for b in batches), "steps": steps, "weight_qmax": weight_qmax}
    if steps:
        import copy

        from . import qat

        tuned = qat.distill(copy.deepcopy(folded), teacher, ranges, batches, steps=steps, lr=lr,
                            batch_size=batch_size, seed=seed, log=log, weight_qmax=weight_qmax)
        report["lr"] = lr
        # fine-tuning has made int8 worse on the real weights in our measurements (benchmarks/int8_fidelity.py):
        # keep it only if the int8 graph's divergence from the float model on the calibration images falls
        before = divergences[kept]
        with torch.no_grad():
            after = _kl(float_logits, [sim.simulate(tuned, ranges, x, weight_qmax=weight_qmax) for x in batches])
        report["kl_before_steps"], report["kl_after_steps"] = before, after
        report["steps_kept"] = after < before
        if after < before:
            folded = tuned
        elif log is not None:
            log(f"fine-tuning raised the int8 model's mean KL on the calibration images from {before:.4f} to "
                f"{after:.4f}; keeping the post-training weights")
    resolution = int(batches[0].shape[-1])
    ready = Int8Ready(folded, ranges, scales, resolution, report, weight_qmax)
    # the weights as a file stores and reloads them (equalization undone, then redone): the same float
    # rounding in memory as after save/load, so a saved int8-ready model runs bit for bit like this one
    canonical = from_model(to_model(ready, model))
    # the file form reads the resolution off the weights' metadata (224 when there is none): keep what
    # calibration ran at, so to_qdq_onnx writes that input size
    canonical.report, canonical.resolution = report, resolution
    return canonical


def _kl(teacher_logits: list, int8_logits: list) -> float:
    """Mean KL(float || int8) in nats over batches of logits."""
    total, count = 0.0, 0
    for z_float, z_int8 in zip(teacher_logits, int8_logits):
        p = torch.log_softmax(z_float, 1)
        q = torch.log_softmax(z_int8, 1)
        total += float((p.exp() * (p - q)).sum())
        count += len(z_float)
    return total / max(count, 1)


# ---------------------------------------------------------------- to and from the weights file


def _layer_names(model: MobileNetV1) -> list[str]:
    return [name for name, m in model.features.named_modules() if isinstance(m, ConvBNAct)]


def to_model(ready: Int8Ready, like: MobileNetV1) -> MobileNetV1:
    """A MobileNetV1 whose float forward is the int8-ready model's, with the int8 data in ``meta.int8``.

    The equalization is undone (the file keeps one ReLU6 clip per layer, as the architecture has)
    and each BatchNorm is the identity, so folding gives back the adjusted weights exactly.
    """
    import copy

    plain = calibrate.unapply_scales(ready.folded, ready.scales)
    model = copy.deepcopy(like).eval()
    eps = model.config.bn_eps
    with torch.no_grad():
        for name, layer in zip(_layer_names(model), plain.features):
            block = model.features.get_submodule(name)
            block.conv.weight.copy_(layer.conv.weight)
            bn = block.bn
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            # gamma = sqrt(1 + eps) computed as folding computes sqrt(var + eps): the folded scale is exactly 1
            bn.weight.copy_(torch.sqrt(bn.running_var + eps))
            bn.bias.copy_(layer.conv.bias)
        model.classifier.weight.copy_(plain.classifier.weight)
        model.classifier.bias.copy_(plain.classifier.bias)
    model.meta = replace(metadata.of(like), int8=ready.metadata())
    return model


def save(ready: Int8Ready, like: MobileNetV1, path) -> Path:
    """Write the int8-ready weights as a mobilenets .safetensors file (``mobilenets.load`` reads it)."""
    from .. import weights

    model = to_model(ready, like)
    meta = replace(model.meta, source=f"int8-ready:{model.meta.source}")
    converted = weights.Converted({k: v for k, v in model.state_dict().items()}, model.config, meta)
    return weights.save(converted, path)


def check_int8_data(data) -> None:
    """Refuse, in one line, int8 data of the wrong shape or with values no preparation writes: a version that is
    not a whole number, scales that are not lists of finite positive numbers, ranges that are not finite
    (low, high) pairs with low <= high."""
    finite = is_number
    why = None
    if not isinstance(data, dict):
        why = f"int8 data must be an object, got {type(data).__name__}"
    elif not (isinstance(data.get("version", 0), int) and not isinstance(data.get("version", 0), bool)):
        why = f"its version must be a whole number, got {data.get('version')!r}"
    elif not isinstance(data.get("scales"), list) or not all(
            isinstance(s, list) and s and all(finite(v) and v > 0 for v in s) for s in data["scales"]):
        why = "its scales must be one list of finite positive numbers per layer"
    elif not isinstance(data.get("ranges"), dict) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(map(finite, r)) and r[0] <= r[1]
            for r in data["ranges"].values()):
        why = "its ranges must be finite (low, high) pairs with low <= high"
    elif not isinstance(data.get("report", {}), dict):
        why = "its report must be an object"
    elif data.get("weight_qmax", sim.WEIGHT_QMAX) not in WEIGHT_QMAXES:
        why = f"its weight_qmax must be one of {WEIGHT_QMAXES}, got {data.get('weight_qmax')!r}"
    if why:
        raise QuantizeError(f"the int8 data of these weights is damaged: {why}; run prepare_int8 (mobilenets "
                            f"quantize) again")


def from_model(model: MobileNetV1) -> Int8Ready | None:
    """The int8-ready form stored in ``model.meta.int8`` (a file from :func:`save`), or None."""
    data = metadata.of(model).int8
    if not data:
        return None
    check_int8_data(data)
    if int(data.get("version", 0)) > REDUCED_RANGE_VERSION:
        raise QuantizeError(f"int8 data has version {data['version']}; this mobilenets reads up to "
                            f"{REDUCED_RANGE_VERSION}")
    folded = fold_batchnorm(model)
    scales = [torch.tensor(s, dtype=torch.float32) for s in data["scales"]]
    if len(scales) != len(folded.features) or any(len(s) != l.conv.out_channels
                                                  for s, l in zip(scales, folded.features)):
        raise QuantizeError("int8 data does not fit this model's layers; run prepare_int8 (mobilenets quantize) again")
    for i, s in enumerate(scales):
        calibrate.apply_scales(folded, i, s)
    ranges = {k: (float(a), float(b)) for k, (a, b) in data["ranges"].items()}
    resolution = metadata.of(model).resolution
    return Int8Ready(folded, ranges, scales, resolution, dict(data.get("report", {})),
                     int(data.get("weight_qmax", sim.WEIGHT_QMAX)))


def on_weight_grid(ready: Int8Ready, weight_qmax: int) -> Int8Ready:
    """``ready`` with its weights rounded to nearest on the grid of [-weight_qmax, weight_qmax] steps, ranges kept.

    For int8-ready weights prepared on the full grid (a ``mobilenets quantize`` file) that must run where the
    full grid saturates: no calibration images are needed, but the weights are not rounded by output error
    nor their biases corrected on the new grid, as :func:`prepare_int8` with ``weight_qmax`` does.
    A grid at least as wide as ``ready``'s leaves it as it is.
    """
    if weight_qmax >= ready.weight_qmax:
        return ready
    return replace(ready, weight_qmax=weight_qmax, report={**ready.report, "weight_qmax": weight_qmax,
                                                           "weight_grid": "rounded to nearest from "
                                                                          f"[-{ready.weight_qmax}, {ready.weight_qmax}]"})


def to_qdq_onnx(ready: Int8Ready, path, *, resolution: int | None = None) -> Path:
    """Write ``ready`` as a QDQ int8 ONNX file (ONNX Runtime runs it as int8; OpenVINO reads it as int8)."""
    from .qdq_onnx import write_qdq_onnx

    return write_qdq_onnx(ready.folded, ready.ranges, path, resolution=resolution or ready.resolution,
                          weight_qmax=ready.weight_qmax)


__all__ = ["Int8Ready", "QuantizeError", "on_weight_grid", "prepare_int8", "scalar_clips", "save", "from_model", "to_model", "to_qdq_onnx"]
