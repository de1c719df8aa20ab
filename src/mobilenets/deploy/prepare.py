"""The folded float graph a backend builds from: for int8, the int8-ready one (:mod:`mobilenets.quantize`).

int8 is prepared once here, on the folded PyTorch model, so every int8 backend and export gets it:
weights from ``mobilenets quantize`` (``model.meta["int8"]``) are used as they are; otherwise
:func:`quantize.prepare_int8` runs on the calibration batches (equalization, bias correction, ranges
chosen by error). ``int8="plain"`` keeps each runtime's own post-training quantization of the
unadjusted model, for comparison: on the real ImageNet weights it keeps only about 72-75% of the float
model's top-1 answers (benchmarks/int8_fidelity.py).
"""

from __future__ import annotations

import math

from ..folding import FoldedConv, FoldedMobileNet, fold_batchnorm
from ..model import MobileNetV1
from .machine import DeployError

INT8_MODES = ("prepared", "plain")


def folded_for(model: MobileNetV1, precision: str, batches, *, int8: str = "prepared") -> FoldedMobileNet:
    """``model`` folded for ``precision``; for prepared int8 the result carries ``int8_ready`` (an Int8Ready)."""
    if int8 not in INT8_MODES:
        raise DeployError(f"int8 must be one of {INT8_MODES}, got {int8!r}")
    if precision != "int8" or int8 == "plain":
        return fold_batchnorm(model)
    from .. import quantize

    ready = quantize.from_model(model) or quantize.prepare_int8(model, batches)
    folded = ready.folded
    folded.int8_ready = ready
    return folded


def carries_int8(model: MobileNetV1, precision: str, int8: str = "prepared") -> bool:
    """Whether ``model`` brings the int8 ranges ``precision`` needs (weights from ``mobilenets quantize``), so
    that nothing need be calibrated."""
    if precision != "int8" or int8 != "prepared":
        return False
    from .. import quantize

    return quantize.from_model(model) is not None


def single_clip(folded: FoldedMobileNet) -> FoldedMobileNet:
    """An int8-ready graph with one ReLU6 clip per layer, for runtimes that fuse only a scalar clip (PT2E, LiteRT).

    Equalization gives each channel its own clip, 6 s_i with s_i >= 1.  The scalar clip is the smallest of
    them: the int8 graph is unchanged as long as each layer's activation range ends at or below it, and
    calibration caps the int8-ready ranges there (an observer of this graph cannot see more either).
    The result keeps ``int8_ready``.
    """
    ready = getattr(folded, "int8_ready", None)
    if ready is None:
        return folded
    from ..quantize import scalar_clips

    clips = scalar_clips(ready.folded, ready.ranges)
    layers = [FoldedConv(layer.conv, layer.tf_pad, clip if math.isfinite(clip) else None)
              for layer, clip in zip(ready.folded.features, clips)]
    out = FoldedMobileNet(layers, ready.folded.classifier).eval()
    out.int8_ready = ready
    return out
