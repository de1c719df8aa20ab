"""Fake-quantized forward of a folded MobileNet: the arithmetic of the QDQ int8 graph, in float.

Weights: per-output-channel symmetric int8 (scale = max|w| / qmax, zero point 0; qmax 127, or 64 for x86
CPUs without VNNI: :data:`REDUCED_WEIGHT_QMAX`).  Biases: int32 on
the accumulator's grid (input scale x weight scale), as every int8 runtime we write adds them.
Activations: per-tensor affine uint8 over a range (lo, hi) that always contains 0, so TF-SAME zero
padding stays exact.  Rounding is round-half-to-even, as QuantizeLinear does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizeError
from ..folding import FoldedConv, FoldedMobileNet

WEIGHT_QMAX = 127
# x86 CPUs without VNNI (AVX2 only) multiply uint8 activations by int8 weights with vpmaddubsw, which adds
# each pair of products into a saturating int16: 2 x 255 x 127 = 64770 overflows 32767 and the sum is cut.
# Weights on [-64, 64] keep every pair within int16 (2 x 255 x 64 = 32640), as ONNX Runtime's own
# quantizer does with reduce_range (onnxruntime.quantization.quant_utils, INT8: (-64, 64))
REDUCED_WEIGHT_QMAX = 64
ACT_QMAX = 255


class ChannelClampConv(FoldedConv):
    """A FoldedConv whose ReLU6 clip is per output channel: equalization scales channel i by s_i, so its clip is 6 s_i."""

    def __init__(self, layer: FoldedConv, clamp: torch.Tensor):
        super().__init__(layer.conv, layer.tf_pad, None)  # parent applies ReLU; the clip follows
        self.register_buffer("channel_clamp", clamp.reshape(-1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(super().forward(x), self.channel_clamp)


def clamp_of(layer: FoldedConv, channels: int) -> torch.Tensor:
    """Per-channel clip of a layer's activation (inf for plain ReLU)."""
    if isinstance(layer, ChannelClampConv):
        return layer.channel_clamp.reshape(-1)
    value = float("inf") if layer.clamp_max is None else float(layer.clamp_max)
    return torch.full((channels,), value)


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and uint8 zero point of the range (lo, hi), widened to hold 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / ACT_QMAX
    zero_point = int(min(max(round(-lo / scale), 0), ACT_QMAX))
    return scale, zero_point


def fake_quant_act(x: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    scale, zp = act_qparams(*rng)
    # straight-through inside the range, zero gradient outside (as QAT expects)
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, ACT_QMAX)


def fake_quant_values(x: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    """:func:`fake_quant_act`'s values, bit for bit, without its gradient mask: five times faster on a CPU,
    for the range search, which fake-quantizes the same sample some fifty times per tensor.

    The arithmetic is the kernel's: the float32 scale's float32 reciprocal, round half to even, the zero
    point added in float, clamped, then the integer times the float32 scale (exact before its one rounding).
    """
    scale, zero_point = act_qparams(*rng)
    scale = torch.tensor(scale, dtype=torch.float32)
    q = torch.round(x * scale.reciprocal())
    if zero_point:
        q += zero_point
    q.clamp_(0, ACT_QMAX)
    if zero_point:
        q -= zero_point
    return q.mul_(scale)


def weight_scales(w: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    return (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / qmax).clamp_min(1e-12)


def fake_quant_weight(w: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    scale = weight_scales(w, qmax)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                  -qmax, qmax)


def fake_quant_bias(bias: torch.Tensor, weight: torch.Tensor, in_rng: tuple[float, float],
                    qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """The bias on its int32 grid, straight-through: what XNNPACK, ONNX Runtime's QLinearConv and LiteRT add.

    The shift is at most half an accumulator step (input scale x weight scale), a few thousandths of an
    output step, yet a float bias moved a value across a rounding tie in 0.03-0.2% of each layer's outputs,
    and on a small model those flips grew over 27 layers to 10 logit steps (tests/test_executorch.py).
    """
    scale = weight_scales(weight, qmax) * act_qparams(*in_rng)[0]
    return bias + (torch.round(bias / scale) * scale - bias).detach()


def pad_same(layer: FoldedConv, x: torch.Tensor) -> torch.Tensor:
    """TF-SAME padding (the folded model's own rule) so the sim can run the conv itself."""
    if not layer.tf_pad:
        return x
    k, s, d = layer.conv.kernel_size[0], layer.conv.stride[0], layer.conv.dilation[0]
    ih, iw = x.shape[-2], x.shape[-1]
    ph = max((-(-ih // s) - 1) * s + (k - 1) * d + 1 - ih, 0)
    pw = max((-(-iw // s) - 1) * s + (k - 1) * d + 1 - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def conv_pre(layer: FoldedConv, x: torch.Tensor, weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's convolution before its activation, with ``weight`` and ``bias`` in place of its own."""
    c = layer.conv
    return F.conv2d(pad_same(layer, x), c.weight if weight is None else weight, c.bias if bias is None else bias,
                    c.stride, c.padding, c.dilation, c.groups)


def activate(layer: FoldedConv, z: torch.Tensor) -> torch.Tensor:
    z = F.relu(z)
    clamp = clamp_of(layer, z.shape[1])
    return torch.minimum(z, clamp.reshape(-1, 1, 1).to(z)) if torch.isfinite(clamp).any() else z


def scalar_clips(folded: FoldedMobileNet, ranges: dict) -> list[float]:
    """Each layer's smallest ReLU6 clip (inf for ReLU), checked to lie at or above the top of its int8 range.

    After equalization the clip differs per channel.  Runtimes that fuse one clip per layer, or let int8
    saturation do the clipping, run the same int8 graph only because calibration caps every layer's range
    at its smallest clip; ranges from elsewhere that reach past it are refused.
    """
    clips = []
    for i, layer in enumerate(folded.features):
        clip = float(clamp_of(layer, layer.conv.out_channels).min())
        top = float(ranges[f"features.{i}"][1])
        if clip < top - 1e-6:
            raise QuantizeError(f"features.{i}: the int8 activation range (top {top:.4g}) exceeds the layer's "
                                f"smallest ReLU6 clip ({clip:.4g}); prepare the int8 weights again "
                                f"(mobilenets quantize)")
        clips.append(clip)
    return clips


def simulate(folded: FoldedMobileNet, ranges: dict, x: torch.Tensor, *, quantize_weights: bool = True,
             weight_qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Logits of the int8 graph as float arithmetic (differentiable: straight-through estimators).

    ``ranges``: activation ranges by point: "input", "features.<i>" (output of folded layer i), "pool", "logits".
    ``weight_qmax``: the weights' grid, [-weight_qmax, weight_qmax] steps per output channel.
    """
    def int8(weight, bias, in_rng):  # float weights keep a float bias: its grid is the int8 weights'
        if not quantize_weights:
            return weight, bias
        return fake_quant_weight(weight, weight_qmax), fake_quant_bias(bias, weight, in_rng, weight_qmax)

    x = fake_quant_act(x, ranges["input"])
    before = "input"
    for i, layer in enumerate(folded.features):
        z = conv_pre(layer, x, *int8(layer.conv.weight, layer.conv.bias, ranges[before]))
        before = f"features.{i}"
        x = fake_quant_act(activate(layer, z), ranges[before])
    x = fake_quant_act(x.mean((2, 3)), ranges["pool"])
    head: nn.Linear = folded.classifier
    return fake_quant_act(F.linear(x, *int8(head.weight, head.bias, ranges["pool"])), ranges["logits"])
