"""BatchNorm folded into the convolution before it: the float inference graph every backend starts from."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .model import ConvBNAct, MobileNetV1
from .errors import MobilenetsError, ParameterTypeError


class FoldingError(MobilenetsError):
    """A model that cannot be folded for inference (e.g. an activation no runtime fuses)."""


class FoldedConv(nn.Module):
    """A convolution with BatchNorm folded into its weight and bias, then the activation (ReLU6 as a clamp)."""

    def __init__(self, conv: nn.Conv2d, tf_pad: bool, clamp_max: float | None):
        super().__init__()
        self.conv = conv
        self.tf_pad = tf_pad
        self.clamp_max = clamp_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_pad:
            k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
            ih, iw = x.shape[-2], x.shape[-1]
            ph = max((-(-ih // s) - 1) * s + (k - 1) * d + 1 - ih, 0)
            pw = max((-(-iw // s) - 1) * s + (k - 1) * d + 1 - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        x = self.conv(x)
        # hardtanh(0, 6) is what oneDNN, ONNX (Clip) and OpenVINO all fuse into the conv as a post-op
        return F.hardtanh(x, 0.0, self.clamp_max) if self.clamp_max is not None else F.relu(x)


class FoldedMobileNet(nn.Module):
    """Inference-only MobileNet v1: BatchNorm folded into each convolution, no dropout. Same logits as eval()."""

    def __init__(self, layers: list[FoldedConv], classifier: nn.Module):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.classifier = classifier
        # for int8: the int8-ready form these weights came from (a mobilenets.quantize.Int8Ready: ranges,
        # equalization scales), which every int8 backend builds from; None for plain folding
        self.int8_ready = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps) (+ conv bias through the same scale)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach() * scale.view(-1, 1, 1, 1))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def fold_batchnorm(model: MobileNetV1) -> FoldedMobileNet:
    """A float32 inference copy of ``model`` with every BatchNorm folded into the convolution before it."""
    if not isinstance(model, MobileNetV1):
        raise ParameterTypeError(f"expected a mobilenets MobileNetV1 (mobilenets.mobilenet_v1 or mobilenets.load), "
                        f"got {type(model).__name__}")
    if model.config.activation not in ("relu6", "relu"):
        raise FoldingError(f"cannot fuse activation {model.config.activation!r}; fold models with "
                          f"activation 'relu6' or 'relu'")
    clamp = 6.0 if model.config.activation == "relu6" else None
    layers = []
    for m in model.features.modules():
        if isinstance(m, ConvBNAct):
            layers.append(FoldedConv(fold_conv_bn(m.conv, m.bn), m.tf_pad, clamp))
    classifier = copy.deepcopy(model.classifier)
    folded = FoldedMobileNet(layers, classifier).float().eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded
