"""The Core ML backend (extra ``coreml``): an ``.mlpackage`` (ML program, iOS 16 / macOS 13 or later) from coremltools.

The folded model goes through ``torch.export`` into ``coremltools.convert``.
Precisions are those of the stored weights: fp16 (the default: Core ML
computes in fp16 on Apple's GPU and Neural Engine), fp32, and int8 (weights
only: linear, symmetric, one scale per output channel, max|w| / 127, the rule
of :mod:`mobilenets.quantize`; activations stay fp16).  The int8 weights are
the int8-ready ones (equalized and bias-corrected, :mod:`mobilenets.quantize`):
a model from ``mobilenets quantize`` brings them, any other is prepared on the
calibration images.  On the released 1.0-224 weights this keeps the logits'
mean KL from the float model near 0.01 nats where quantizing the plain folded
weights gives about 0.3 (docs/deploy.md).

What an iOS app needs is in the package: the input is an image (``ImageType``,
RGB, ``resolution`` square), the output a classifier (``classLabel`` and
``classLabel_probs``, softmax) with the model's class names (ImageNet's for
1000 classes), or ``features`` for a model without classifier; width,
resolution and normalization are in its user-defined metadata.  Core ML turns
pixels into input as ``scale * pixel + bias[c]`` with one scale for all
channels.  A normalization whose std is the same in every channel (the
official weights' x / 127.5 - 1) is exactly that.  With per-channel std
(ImageNet's 0.229, 0.224, 0.225) the package takes the input divided by the
mean std and the first convolution's input channel c is multiplied by
mean_std / std[c]: the same function, zero padding included, since no offset
is left that padding would change.

Core ML runs only on Apple platforms, so nothing here runs the package in Core
ML: :mod:`.coreml_check` reads it back and checks it against the model, and
:mod:`.coreml` is the backend that offers both.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .calibration import example_input
from .machine import DeployError

INPUT = "image"
LABEL, PROBABILITIES, FEATURES = "classLabel", "classLabel_probs", "features"
PRECISIONS = ("fp16", "fp32", "int8")
WEIGHT_QMAX = 127
NOT_RUN = "Core ML runs only on Apple platforms (macOS, iOS)"
INSTALL = "pip install 'mobilenets[coreml]'"


@contextlib.contextmanager
def quiet():
    """coremltools' progress bars and its warnings about newer torch and scikit-learn than it was tested with,
    and torchao's deprecation notice when coremltools imports it, kept off the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("coremltools", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def import_coremltools():
    """coremltools, imported so that it cannot crash this process.

    coremltools imports TensorFlow when it is installed (for a TensorFlow
    frontend we do not use) and then, through torchvision and torch._dynamo,
    triton; with TensorFlow 2.21 loaded first, loading triton crashes the
    process (SIGSEGV).  So TensorFlow is hidden from it while it imports, or,
    when this process has already imported TensorFlow, triton is: torch then
    records that triton is absent, which CPU export does not need and which a
    process holding TensorFlow could not load anyway.
    """
    module = sys.modules.get("coremltools")
    if module is not None:
        return module
    hidden = next((name for name in ("tensorflow", "triton") if name not in sys.modules), None)
    if hidden:
        sys.modules[hidden] = None  # import raises ImportError, which coremltools and torch take as "not installed"
    try:
        with quiet():
            import coremltools
    except ImportError as e:
        raise DeployError(f"format 'coreml' needs coremltools ({e}); {INSTALL}") from None
    finally:
        if hidden and hidden in sys.modules and sys.modules[hidden] is None:
            del sys.modules[hidden]
    return coremltools


# ---------------------------------------------------------------- what the package holds


def normalization_of(metadata: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the model's input: its own, else the official weights' x / 127.5 - 1."""
    norm = metadata.get("normalization") or {"mean": [0.5] * 3, "std": [0.5] * 3}
    mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DeployError(f"normalization must have 3 means and 3 positive stds, got {norm}")
    return mean, std


def input_scaling(mean, std) -> tuple[float, list[float], torch.Tensor]:
    """(scale, bias per channel, gain per channel): Core ML computes y = scale * pixel + bias[c], and the model's
    input (pixel / 255 - mean[c]) / std[c] is gain[c] * y, gain folded into the first convolution."""
    common = sum(std) / 3
    scale = 1.0 / (255.0 * common)
    bias = [-m / common for m in mean]
    gain = torch.tensor([common / s for s in std]) if len(set(std)) > 1 else torch.ones(3)
    return scale, bias, gain


def class_labels(metadata: dict, num_classes: int) -> list | None:
    """The names Core ML reports: the model's labels, else ImageNet's for 1000 classes, else 0..n-1; None: no head."""
    if not num_classes:
        return None
    labels = metadata.get("labels")
    if labels and len(labels) == num_classes:
        return [str(v) for v in labels]
    if num_classes == 1000:
        from ..labels import imagenet_labels

        return list(imagenet_labels())
    return list(range(num_classes))


def num_classes_of(folded) -> int:
    return folded.classifier.out_features if isinstance(folded.classifier, nn.Linear) else 0


def weight_layers(folded) -> list[nn.Module]:
    """The modules whose weights the package stores, in program order: every convolution, then the classifier."""
    return [layer.conv for layer in folded.features] + ([folded.classifier] if num_classes_of(folded) else [])


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale per output channel) of ``weight`` under mobilenets.quantize's rule: symmetric, max|w| / 127."""
    from ..quantize.sim import weight_scales

    scale = weight_scales(weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return torch.round(weight / scale.view(shape)).clamp(-WEIGHT_QMAX, WEIGHT_QMAX), scale


class _Packaged(nn.Module):
    """The graph the package holds: the first convolution takes Core ML's scaled input; softmax on the logits.

    For int8 the weights are already on mobilenets.quantize's grid (the int8-ready weights' bias correction
    assumes exactly those values): coremltools' quantizer, which works in fp16, then finds the same codes
    instead of rounding some weights the other way.
    """

    def __init__(self, folded, gain: torch.Tensor, softmax: bool, int8: bool):
        super().__init__()
        import copy

        self.folded = copy.deepcopy(folded)
        with torch.no_grad():
            self.folded.features[0].conv.weight.mul_(gain.view(1, -1, 1, 1))
            for module in weight_layers(self.folded) if int8 else []:
                codes, scale = int8_codes(module.weight)
                module.weight.copy_(codes * scale.view((-1,) + (1,) * (codes.dim() - 1)))
        self.softmax = softmax

    def forward(self, x):
        y = self.folded(x)
        return torch.softmax(y, 1) if self.softmax else y


def package(folded, precision: str, resolution: int, metadata: dict):
    """The ``coremltools.models.MLModel`` of ``folded`` at ``precision`` (fp16, fp32 or int8 weights)."""
    if precision not in PRECISIONS:
        raise DeployError(f"Core ML packages hold {', '.join(PRECISIONS)} weights, not {precision!r}")
    ct = import_coremltools()
    mean, std = normalization_of(metadata)
    scale, bias, gain = input_scaling(mean, std)
    labels = class_labels(metadata, num_classes_of(folded))
    module = _Packaged(folded, gain, softmax=labels is not None, int8=precision == "int8").eval()
    image = ct.ImageType(name=INPUT, shape=(1, 3, resolution, resolution), scale=scale, bias=bias,
                         color_layout=ct.colorlayout.RGB)
    try:
        with quiet():
            program = torch.export.export(module, (example_input(1, resolution),)).run_decompositions({})
            model = ct.convert(
                program, inputs=[image], convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
                classifier_config=ct.ClassifierConfig(labels) if labels else None,
                outputs=None if labels else [ct.TensorType(name=FEATURES)])
            if precision == "int8":
                # the weights of every convolution and of the classifier, however small; nothing else (the
                # per-channel clips of int8-ready weights stay fp16)
                weights = ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                                     granularity="per_channel", weight_threshold=0)
                config = ct.optimize.coreml.OptimizationConfig(op_type_configs={"conv": weights, "linear": weights})
                converted, model = model, ct.optimize.coreml.linear_quantize_weights(model, config)
                discard(converted)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise DeployError(f"coremltools could not convert this model: {str(e).strip().splitlines()[0]}") from None
    _describe(model, metadata, precision, resolution, mean, std, labels)
    return model


def _describe(model, metadata, precision, resolution, mean, std, labels) -> None:
    alpha = metadata.get("alpha")
    model.short_description = (f"MobileNet v1 (alpha {alpha}, {resolution}x{resolution}), {precision} weights; "
                               f"written by mobilenets")
    model.input_description[INPUT] = (f"RGB image, {resolution}x{resolution}; the model computes "
                                      f"(pixel / 255 - mean) / std with mean {list(mean)}, std {list(std)}")
    if labels:
        model.output_description[LABEL] = "most likely class"
        model.output_description[PROBABILITIES] = "softmax probability of each class"
        model.user_defined_metadata["com.apple.coreml.model.preview.type"] = "imageClassifier"
    else:
        model.output_description[FEATURES] = "pooled features (the model has no classifier)"
    fields = {"alpha": alpha, "resolution": resolution, "precision": precision,
              "normalization": json.dumps({"mean": list(mean), "std": list(std)}),
              "padding": metadata.get("padding"), "source": metadata.get("source")}
    for key, value in fields.items():
        if value is not None:
            model.user_defined_metadata[f"mobilenets.{key}"] = str(value)


def discard(model) -> None:
    """Remove the temporary .mlpackage in which coremltools keeps a converted model until the process exits."""
    if getattr(model, "is_temp_package", False) and model.package_path:
        shutil.rmtree(model.package_path, ignore_errors=True)


def write(folded, path: Path, precision: str, resolution: int, metadata: dict) -> Path:
    """Write the ``.mlpackage`` folder ``path`` (``export`` hands a temporary one and puts it in place whole)."""
    model = package(folded, precision, resolution, metadata)
    try:
        with quiet():
            model.save(str(path))
    finally:
        discard(model)
    return Path(path)
