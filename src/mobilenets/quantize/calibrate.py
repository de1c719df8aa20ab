"""Post-training steps on a folded float model: cross-layer equalization, activation ranges by error,
sequential bias correction.  Each is measured on calibration batches and leaves a float model plus ranges."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..folding import FoldedMobileNet
from . import sim
from .rounding import input_hessian, round_weights

# the equalization scale a channel may get: beyond it the channel is noise (a dead ReLU)
MAX_SCALE = 256.0


def _layers(folded: FoldedMobileNet) -> list:
    return list(folded.features)


@torch.no_grad()
def channel_maxima(folded: FoldedMobileNet, batches) -> list[torch.Tensor]:
    """Per output channel, the largest activation of each folded layer over ``batches``."""
    maxima = None
    for x in batches:
        out = []
        for layer in folded.features:
            x = layer(x)
            out.append(x.amax(dim=(0, 2, 3)))
        maxima = out if maxima is None else [torch.maximum(a, b) for a, b in zip(maxima, out)]
    return maxima


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


@torch.no_grad()
def equalize(folded: FoldedMobileNet, batches, *, beta: float = 0.5) -> tuple[FoldedMobileNet, list[torch.Tensor]]:
    """Equalize the per-channel activation ranges that share one int8 scale.

    Channel i of a layer's output is multiplied by s_i >= 1 (its weights, bias and ReLU6 clip) and
    the next layer's input channel i divided by s_i, so the float function is unchanged.  Into a
    depthwise layer this is free: its weights are quantized per channel, and channel i only meets
    channel i, so s_i = R / r_i (r_i the channel's range, R the tensor's).  Into a pointwise layer
    or the classifier the division makes input column i smaller inside a per-output-channel weight
    scale, so s_i = (R / r_i) ** beta trades activation against weight resolution.
    Returns the equalized copy and each layer's scales.
    """
    folded = copy.deepcopy(folded)
    maxima = channel_maxima(folded, batches)
    layers = _layers(folded)
    scales = []
    for i, layer in enumerate(layers):
        r = maxima[i]
        big = float(r.max())
        consumer = layers[i + 1].conv if i + 1 < len(layers) else None
        exponent = 1.0 if consumer is not None and _is_depthwise(consumer) else beta
        live = r > big / MAX_SCALE
        s = torch.ones_like(r)
        s[live] = (big / r[live]) ** exponent
        s = s.clamp(1.0, MAX_SCALE)
        scales.append(s)
    for i, s in enumerate(scales):
        apply_scales(folded, i, s)
    return folded, scales


@torch.no_grad()
def apply_scales(folded: FoldedMobileNet, index: int, s: torch.Tensor) -> None:
    """Scale layer ``index``'s output channels by ``s`` and its consumer's inputs by 1 / s (in place)."""
    layers = _layers(folded)
    layer = layers[index]
    clamp = sim.clamp_of(layer, s.numel()) * s
    layer.conv.weight.mul_(s.view(-1, 1, 1, 1))
    layer.conv.bias.mul_(s)
    folded.features[index] = sim.ChannelClampConv(layer, clamp)
    if index + 1 < len(layers):
        consumer = layers[index + 1].conv
        if _is_depthwise(consumer):
            consumer.weight.div_(s.view(-1, 1, 1, 1))
        else:
            consumer.weight.div_(s.view(1, -1, 1, 1))
    else:
        folded.classifier.weight.div_(s.view(1, -1))


def unapply_scales(folded: FoldedMobileNet, scales: list[torch.Tensor]) -> FoldedMobileNet:
    """The inverse of :func:`apply_scales` over every layer: the model with ReLU6 clips back at one value."""
    folded = copy.deepcopy(folded)
    with torch.no_grad():
        for i, s in enumerate(scales):
            apply_scales(folded, i, 1.0 / s)
    return folded


# ---------------------------------------------------------------- ranges


def _fq_error(v: torch.Tensor, lo: float, hi: float) -> float:
    return float(sim.fake_quant_values(v, (lo, hi)).sub_(v).square_().mean())


def search_range(v: torch.Tensor, method: str = "mse", *, grid: int = 60) -> tuple[float, float]:
    """The range of a sample of one activation tensor: "minmax", "mse" (least squared error of the
    quantized values) or "p99.99"-style percentiles."""
    v = v.flatten().float()
    lo, hi = float(v.min()), float(v.max())
    lo = min(lo, 0.0)
    if method == "minmax" or hi <= lo:
        return lo, hi
    if method.startswith("p"):
        q = float(method[1:]) / 100
        k = min(v.numel() - 1, max(0, int(round(q * (v.numel() - 1)))))
        top = float(v.kthvalue(k + 1).values)
        bottom = float((-v).kthvalue(k + 1).values) * -1 if lo < 0 else 0.0
        return min(bottom, 0.0), max(top, 0.0)
    best, best_err = (lo, hi), _fq_error(v, lo, hi)
    for t in torch.linspace(0.15, 1.0, grid)[:-1].tolist():
        err = _fq_error(v, lo * t, hi * t)
        if err < best_err:
            best, best_err = (lo * t, hi * t), err
    return best


def _sample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    flat = x.detach().flatten()
    if flat.numel() <= n:
        return flat
    return flat[torch.randint(flat.numel(), (n,), generator=generator)]


@dataclass
class Calibrated:
    """One rounding's result: the adjusted float model and its int8 ranges."""

    folded: FoldedMobileNet
    ranges: dict


@torch.no_grad()
def calibrate(folded: FoldedMobileNet, batches, *, method: str = "mse", bias_correction: bool = True,
              rounding: str = "error", samples_per_batch: int = 200_000, seed: int = 0,
              weight_qmax: int = sim.WEIGHT_QMAX) -> tuple[FoldedMobileNet, dict]:
    """Ranges for every quantization point, and (optionally) each layer's bias corrected in turn.

    Layer by layer, the int8 path (quantized inputs, int8 weights) and the float path run side by
    side.  With ``rounding="error"`` each convolution's int8 weights are rounded to least error of its
    outputs on the int8 path's inputs (:func:`rounding.round_weights`), else to nearest; then the mean
    per-channel difference of the int8 path's pre-activations is subtracted from the layer's bias, so
    the expected output of every layer matches the float model's.  Each range is then chosen on the
    int8 path's own activations, by ``method``; with "mse" the logits' range is their min/max, so no
    logit is clipped.  ``weight_qmax``: the int8 weights' grid, [-weight_qmax, weight_qmax] steps.
    """
    _, (result,) = calibrate_roundings(folded, batches, (rounding,), method=method, bias_correction=bias_correction,
                                       samples_per_batch=samples_per_batch, seed=seed, weight_qmax=weight_qmax)
    return result.folded, result.ranges


@torch.no_grad()
def calibrate_roundings(folded: FoldedMobileNet, batches, roundings, *, method: str = "mse",
                        bias_correction: bool = True, samples_per_batch: int = 200_000, seed: int = 0,
                        weight_qmax: int = sim.WEIGHT_QMAX, step=None) -> tuple[list, list[Calibrated]]:
    """:func:`calibrate` once for each of ``roundings``, with one float path for all of them.

    ``step()``, if given, is called after each layer (progress: this loop is most of int8's preparation).

    Returns the float model's logits on each batch and a :class:`Calibrated` per rounding, each what
    :func:`calibrate` gives for that rounding alone, bit for bit (the float path never depends on the
    rounding, and each rounding draws its range samples from its own generator seeded with ``seed``).
    """
    g = torch.Generator().manual_seed(seed)
    xs_f = [b.float() for b in batches]
    input_range = search_range(torch.cat([_sample(x, samples_per_batch, g) for x in xs_f]), "minmax")
    xs_q = [sim.fake_quant_act(x, input_range) for x in xs_f]
    paths = []
    for mode in roundings:
        generator = torch.Generator()
        generator.set_state(g.get_state())
        paths.append(_Int8Path(mode, copy.deepcopy(folded), {"input": input_range}, xs_q, generator, weight_qmax))
    for i, layer in enumerate(folded.features):
        # the float path: ``folded`` itself is never changed; its pre-activations serve every bias correction
        pre_f = [sim.conv_pre(layer, x) for x in xs_f]
        for path in paths:
            path.layer(i, layer.conv.weight, pre_f if bias_correction else None, method, samples_per_batch)
        xs_f = [sim.activate(layer, z) for z in pre_f]
        del pre_f
        if step is not None:
            step()
    pooled = [x.mean((2, 3)) for x in xs_f]
    float_logits = [folded.classifier(p) for p in pooled]
    pooled_f = torch.cat(pooled) if bias_correction else None
    return float_logits, [path.head(pooled_f, method) for path in paths]


class _Int8Path:
    """The int8 side of :func:`calibrate` for one rounding: its own copy of the model, ranges and activations."""

    def __init__(self, rounding: str, folded: FoldedMobileNet, ranges: dict, xs_q: list, generator, weight_qmax: int):
        self.rounding, self.folded, self.ranges, self.xs_q, self.g = rounding, folded, ranges, xs_q, generator
        self.qmax = weight_qmax

    def layer(self, i: int, w_float: torch.Tensor, pre_f, method: str, samples_per_batch: int) -> None:
        layer = self.folded.features[i]
        hessian = input_hessian(layer, self.xs_q) if self.rounding == "error" else None
        if hessian is not None:  # else too few calibration windows for this layer: rounded to nearest
            layer.conv.weight.copy_(round_weights(w_float, hessian, self.qmax))
        wq = sim.fake_quant_weight(layer.conv.weight, self.qmax)
        if pre_f is not None:
            shift = torch.zeros_like(layer.conv.bias)
            count = 0
            for zf, xq in zip(pre_f, self.xs_q):
                d = sim.conv_pre(layer, xq, wq) - zf
                shift += d.sum(dim=(0, 2, 3))
                count += d.shape[0] * d.shape[2] * d.shape[3]
            layer.conv.bias.sub_(shift / count)
        acts = [sim.activate(layer, sim.conv_pre(layer, xq, wq)) for xq in self.xs_q]
        rng = search_range(torch.cat([_sample(a, samples_per_batch, self.g) for a in acts]), method)
        clamp = float(sim.clamp_of(layer, acts[0].shape[1]).min())
        self.ranges[f"features.{i}"] = (0.0, min(rng[1], clamp))
        self.xs_q = [sim.fake_quant_act(a, self.ranges[f"features.{i}"]) for a in acts]

    def head(self, pooled_f, method: str) -> Calibrated:
        ranges = self.ranges
        pooled_q = [x.mean((2, 3)) for x in self.xs_q]
        self.xs_q = None
        ranges["pool"] = search_range(torch.cat(pooled_q), method)
        head = self.folded.classifier
        wq = sim.fake_quant_weight(head.weight, self.qmax)
        if pooled_f is not None:
            pq = torch.cat([sim.fake_quant_act(p, ranges["pool"]) for p in pooled_q])
            head.bias.sub_((torch.nn.functional.linear(pq, wq) - torch.nn.functional.linear(pooled_f, head.weight))
                           .mean(0))
        logits = [torch.nn.functional.linear(sim.fake_quant_act(p, ranges["pool"]), wq, head.bias) for p in pooled_q]
        # the logits are the answer: a range chosen by squared error fits the bulk of a thousand small ones and
        # clips the few largest together (on the real ImageNet weights, 128 crops: the range ended at 20.7 with
        # logits up to 22.4, and cost 2.7 points of held-out top-1 agreement against float logits); the range
        # of least softmax divergence cuts the smallest instead, which leaves the divergence where min/max
        # does (0.0121 against 0.0124 nats there) but moves those logits by up to 5 (the digits)
        ranges["logits"] = search_range(torch.cat(logits), "minmax" if method == "mse" else method)
        return Calibrated(self.folded, ranges)
