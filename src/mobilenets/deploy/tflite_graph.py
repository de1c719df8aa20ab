"""The folded model as a LiteRT graph: NHWC, float32 or full-integer int8.

The graph is the one the official MobileNet v1 ``.tflite`` releases use:
CONV_2D / DEPTHWISE_CONV_2D with BatchNorm folded in and ReLU6 fused as the
operator's activation, AVERAGE_POOL_2D over the whole feature map, the
classifier as a 1x1 CONV_2D, RESHAPE to (N, classes).  Padding: TF's SAME is
what ``padding="tf_same"`` computes, and symmetric padding equals SAME except
at stride 2, where it becomes an explicit PAD before a VALID convolution.

int8 follows LiteRT's full-integer scheme: weights int8 symmetric per output
channel, biases int32 at input scale x weight scale, activations int8
asymmetric per tensor with ranges measured on the calibration batches
(average pool and reshape keep their input's parameters, as the runtime
requires).  I/O is int8, uint8 (a QUANTIZE at each end, same scale, zero
point + 128) or float (QUANTIZE in, DEQUANTIZE out).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from ..formats import tflite_schema as fb
from ..folding import FoldedConv, FoldedMobileNet
from .machine import DeployError

IO_TYPES = ("int8", "uint8", "float")


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's SAME padding (before, after) along one axis: the extra pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def activation_ranges(folded: FoldedMobileNet, batches: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(min, max) of the input, of every convolution's output (after its activation) and of the logits."""
    points = [*folded.features, folded.classifier]
    lo = [float("inf")] * (len(points) + 1)
    hi = [float("-inf")] * (len(points) + 1)

    def record(i, t):
        lo[i], hi[i] = min(lo[i], float(t.min())), max(hi[i], float(t.max()))

    hooks = [m.register_forward_hook(lambda m, a, out, i=i: record(i + 1, out)) for i, m in enumerate(points)]
    try:
        with torch.no_grad():
            for x in batches:
                record(0, x)
                folded(x)
    finally:
        for h in hooks:
            h.remove()
    return list(zip(lo, hi))


def activation_quant(lo: float, hi: float) -> fb.Quant:
    """Per-tensor asymmetric int8 parameters covering [lo, hi] and 0 (so zero padding is exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0 / 255.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return fb.Quant([scale], [zero_point], 0, [lo], [hi])


def weight_quant(w: np.ndarray, axis: int, floor=None, qmax: int = 127) -> tuple[np.ndarray, list[float]]:
    """Symmetric int8 per channel along ``axis`` ([-qmax, qmax], zero point 0), scales at least ``floor``."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scales = np.abs(moved).max(1).astype(np.float64) / qmax
    if floor is not None:
        scales = np.maximum(scales, floor)
    scales = np.where(scales > 0, scales, 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, [float(s) for s in scales]


class _Builder:
    """Accumulates tensors and operators; ``int8`` switches constants and activations to integers."""

    def __init__(self, int8: bool, weight_qmax: int = 127):
        self.int8, self.weight_qmax = int8, weight_qmax
        self.tensors: list[fb.Tensor] = []
        self.operators: list[fb.Operator] = []

    def tensor(self, name, shape, type, data=None, quant=None, dynamic_batch=False) -> int:
        signature = [-1, *shape[1:]] if dynamic_batch else None
        self.tensors.append(fb.Tensor(name, list(shape), type, data, quant, signature))
        return len(self.tensors) - 1

    def activation(self, name, shape, quant) -> int:
        return self.tensor(name, shape, fb.INT8 if self.int8 else fb.FLOAT32, quant=quant if self.int8 else None,
                           dynamic_batch=True)

    def op(self, code, inputs, outputs, **options):
        self.operators.append(fb.Operator(code, list(inputs), list(outputs), options))

    def conv(self, name, x, w, b, in_quant, out_quant, out_shape, *, depthwise, **options) -> int:
        """A CONV_2D (w as (O, I, kh, kw)) or DEPTHWISE_CONV_2D (w as (C, 1, kh, kw)) with bias ``b``."""
        w = w.astype(np.float32)
        filt = w.transpose(1, 2, 3, 0) if depthwise else w.transpose(0, 2, 3, 1)  # (1,kh,kw,C) / OHWI
        axis = 3 if depthwise else 0
        if self.int8:
            # a channel whose weights are ~0 but whose bias is not would need a bias beyond int32 at the
            # weights' own scale: widen that channel's weight scale until the bias fits, as LiteRT's converter does
            floor = np.abs(b.astype(np.float64)) / (in_quant.scale[0] * (2**31 - 1))
            q, scales = weight_quant(filt, axis, floor, self.weight_qmax)
            wt = self.tensor(f"{name}/weights", filt.shape, fb.INT8, q, fb.Quant(scales, [0] * len(scales), axis))
            bias_scales = [in_quant.scale[0] * s for s in scales]
            bq = np.clip(np.round(b / np.asarray(bias_scales)), -(2**31 - 1), 2**31 - 1).astype(np.int32)
            bt = self.tensor(f"{name}/bias", b.shape, fb.INT32, bq, fb.Quant(bias_scales, [0] * len(b), 0))
        else:
            wt = self.tensor(f"{name}/weights", filt.shape, fb.FLOAT32, filt)
            bt = self.tensor(f"{name}/bias", b.shape, fb.FLOAT32, b.astype(np.float32))
        y = self.activation(name, out_shape, out_quant)
        code = fb.DEPTHWISE_CONV_2D if depthwise else fb.CONV_2D
        if depthwise:
            options["depth_multiplier"] = 1
        self.op(code, [x, wt, bt], [y], **options)
        return y


def build_graph(folded: FoldedMobileNet, resolution: int, precision: str, batches: list[torch.Tensor],
                io: str = "int8", metadata: dict | None = None, ranges: dict | None = None) -> fb.Graph:
    """The LiteRT graph of ``folded`` for (N, resolution, resolution, 3) input.

    int8 activation ranges are ``ranges`` when given ("input", "features.<i>",
    "pool", "logits" -> (lo, hi), as int8-ready weights and imported quantized
    files carry them), else min/max measured on ``batches``.
    """
    if precision not in ("fp32", "int8"):
        raise DeployError(f"LiteRT files hold fp32 or int8, got {precision!r}")
    if io not in IO_TYPES:
        raise DeployError(f"io must be one of {IO_TYPES}, got {io!r}")
    int8 = precision == "int8"
    pool_quant = None
    if int8 and ranges is not None:
        keys = ["input", *(f"features.{i}" for i in range(len(folded.features))), "logits"]
        missing = [k for k in keys if k not in ranges]
        if missing:
            raise DeployError(f"int8 ranges lack {missing[:3]}; give ranges for every layer or calibration batches")
        pool_quant = activation_quant(*ranges["pool"]) if "pool" in ranges else None
        ranges = [tuple(ranges[k]) for k in keys]
    elif int8:
        if not batches:
            raise DeployError("int8 needs calibration batches")
        ranges = activation_ranges(folded, batches)
    quants = [activation_quant(*r) for r in ranges] if int8 else [None] * (len(folded.features) + 2)
    ready = getattr(folded, "int8_ready", None)  # int8-ready weights lie on their own grid (7-bit for AVX2-only CPUs)
    g = _Builder(int8, ready.weight_qmax if ready is not None else 127)

    size, channels = int(resolution), 3
    x = g.activation("input", [1, size, size, channels], quants[0])
    graph_input = x
    if int8 and io != "int8":
        q = quants[0]
        outer = fb.Quant(q.scale, [q.zero_point[0] + 128]) if io == "uint8" else None
        graph_input = g.tensor("input", [1, size, size, channels], fb.UINT8 if io == "uint8" else fb.FLOAT32,
                               quant=outer, dynamic_batch=True)
        g.tensors[x].name = "input_int8"
        g.op(fb.QUANTIZE, [graph_input], [x])

    for i, layer in enumerate(folded.features):
        if not isinstance(layer, FoldedConv):
            raise DeployError(f"cannot write layer {type(layer).__name__} to LiteRT")
        conv = layer.conv
        k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        depthwise = conv.groups > 1
        if depthwise and not (conv.groups == conv.in_channels == conv.out_channels):
            raise DeployError("LiteRT export supports depthwise convolutions with channel multiplier 1 only")
        if layer.tf_pad:
            padding, out = fb.SAME, -(-size // s)
        else:
            p = conv.padding[0]
            out = (size + 2 * p - d * (k - 1) - 1) // s + 1
            if same_padding(size, k, s, d) == (p, p):
                padding = fb.SAME
            elif p == 0:
                padding = fb.VALID
            else:  # symmetric padding at stride 2: SAME would put the extra pixel only after
                pads = g.tensor(f"layer{i}/paddings", [4, 2], fb.INT32,
                                np.array([[0, 0], [p, p], [p, p], [0, 0]], np.int32))
                padded = g.activation(f"layer{i}/padded", [1, size + 2 * p, size + 2 * p, channels], quants[i])
                g.op(fb.PAD, [x, pads], [padded])
                x, padding = padded, fb.VALID
        activation = fb.RELU6 if layer.clamp_max == 6.0 else fb.RELU
        if layer.clamp_max not in (None, 6.0):
            raise DeployError(f"LiteRT fuses ReLU or ReLU6 only, got a clamp at {layer.clamp_max}")
        x = g.conv(f"layer{i}", x, conv.weight.numpy(), conv.bias.numpy(), quants[i], quants[i + 1],
                   [1, out, out, conv.out_channels], depthwise=depthwise, padding=padding, stride_w=s,
                   stride_h=s, activation=activation, dilation_w=d, dilation_h=d)
        size, channels = out, conv.out_channels

    last = quants[len(folded.features)]
    if pool_quant is not None and (pool_quant.scale, pool_quant.zero_point) != (last.scale, last.zero_point):
        # a pool with its own output scale (as TFLiteConverter writes it): MEAN rescales, AVERAGE_POOL_2D cannot
        axes = g.tensor("pool/axes", [2], fb.INT32, np.array([1, 2], np.int32))
        last = pool_quant
        pooled = g.activation("pool", [1, 1, 1, channels], last)
        g.op(fb.MEAN, [x, axes], [pooled], keep_dims=True)
    else:
        pooled = g.activation("pool", [1, 1, 1, channels], last)
        g.op(fb.AVERAGE_POOL_2D, [x], [pooled], padding=fb.VALID, stride_w=1, stride_h=1, filter_w=size,
             filter_h=size, activation=fb.NONE)
    x, quant = pooled, last
    classifier = folded.classifier
    if isinstance(classifier, nn.Linear):
        w = classifier.weight.numpy().reshape(classifier.out_features, channels, 1, 1)
        quant = quants[-1]
        x = g.conv("logits", x, w, classifier.bias.numpy(), last, quant, [1, 1, 1, classifier.out_features],
                   depthwise=False, padding=fb.VALID, stride_w=1, stride_h=1, activation=fb.NONE)
        channels = classifier.out_features
    elif not isinstance(classifier, nn.Identity):
        raise DeployError(f"cannot write classifier {type(classifier).__name__} to LiteRT")
    shape = g.tensor("logits/shape", [2], fb.INT32, np.array([-1, channels], np.int32))
    logits = g.activation("logits/flat", [1, channels], quant)
    g.op(fb.RESHAPE, [x, shape], [logits], new_shape=[-1, channels])
    graph_output = logits
    if int8 and io != "int8":
        if io == "uint8":
            graph_output = g.tensor("output", [1, channels], fb.UINT8,
                                    quant=fb.Quant(quant.scale, [quant.zero_point[0] + 128]), dynamic_batch=True)
            g.op(fb.QUANTIZE, [logits], [graph_output])
        else:
            graph_output = g.tensor("output", [1, channels], fb.FLOAT32, dynamic_batch=True)
            g.op(fb.DEQUANTIZE, [logits], [graph_output])
    g.tensors[graph_output].name = "output"

    meta = dict(metadata or {})
    meta.update({"resolution": int(resolution), "layout": "NHWC", "precision": precision,
                 "io": io if int8 else "float"})
    if int8:
        meta["activation_ranges"] = [list(r) for r in ranges]  # input, each convolution, logits
    description = (f"MobileNet v1 ({precision}, input (N, {resolution}, {resolution}, 3) NHWC RGB, "
                   f"logits (N, {channels})); written by mobilenets")
    return fb.Graph(g.tensors, g.operators, [graph_input], [graph_output], description,
                    {"mobilenets": json.dumps(meta).encode()})
