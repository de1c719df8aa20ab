"""Blocks and the MobileNetV1 module, built from the table in ``architecture.py``.

State-dict names follow the paper and the reference implementations:
``features.{i}`` is row i of Table 1 (TF-slim's ``Conv2d_i``, Keras' block i);
a separable row holds ``depthwise`` and ``pointwise``, each a ``conv`` + ``bn``;
the last layer is ``classifier``.  These names are stable.
"""

# No `from __future__ import annotations` here: TorchScript reads annotations as written, and string
# annotations break scripting an fx-traced or create_feature_extractor model ('_torch_Tensor_').
from collections import OrderedDict
import dataclasses
from dataclasses import asdict, dataclass, fields

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import architecture
from .architecture import Block, Layer
from .checks import is_number
from .errors import ParameterError, ParameterTypeError
from .metadata import Metadata

ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU}
PADDINGS = ("symmetric", "tf_same")


@dataclass(frozen=True)
class MobileNetV1Config:
    """Everything needed to rebuild a model; stored beside its weights in checkpoints.

    Defaults follow the TF-slim reference (BN epsilon 1e-3, dropout 0.001 i.e.
    keep-prob 0.999, ReLU6, min_depth 8) except for padding: "symmetric" is the
    PyTorch convention (and timm's); "tf_same" reproduces TensorFlow's SAME
    padding, which the official TF-slim and Keras weights need.
    """

    alpha: float = 1.0
    num_classes: int = 1000
    min_depth: int = 8
    activation: str = "relu6"
    padding: str = "symmetric"
    bn_eps: float = 1e-3
    # PyTorch's default; TF-slim's decay 0.9997 (momentum 0.0003) only settles over ImageNet-length runs.
    bn_momentum: float = 0.1
    dropout: float = 0.001
    full_conv: bool = False
    shallow: bool = False
    output_stride: int | None = None

    def __post_init__(self):
        # every field is checked for its type too: a config read from a file may hold anything
        architecture.check_alpha(self.alpha)
        architecture.check_num_classes(self.num_classes)
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ParameterError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.padding, str) or self.padding not in PADDINGS:
            raise ParameterError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if not is_number(self.bn_eps) or not 0 < self.bn_eps < 1:
            raise ParameterError(f"bn_eps must be in (0, 1) (TF uses 1e-3, PyTorch 1e-5), got {self.bn_eps!r}")
        if not is_number(self.bn_momentum) or not 0 <= self.bn_momentum <= 1:
            raise ParameterError(f"bn_momentum must be in [0, 1] (PyTorch uses 0.1), got {self.bn_momentum!r}")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ParameterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("full_conv", "shallow"):
            if getattr(self, name) not in (True, False):
                raise ParameterError(f"{name} must be True or False, got {getattr(self, name)!r}")
        # the body checks min_depth and output_stride
        architecture.body(self.alpha, min_depth=self.min_depth, output_stride=self.output_stride)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MobileNetV1Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ParameterError(f"unknown model options {sorted(unknown)}; known options are {sorted(known)}")
        return cls(**d)

    def blocks(self) -> tuple[Block, ...]:
        return architecture.body(
            self.alpha,
            min_depth=self.min_depth,
            full_conv=self.full_conv,
            shallow=self.shallow,
            output_stride=self.output_stride,
        )


class ConvBNAct(nn.Module):
    """conv (no bias) -> BatchNorm -> activation, with PyTorch or TensorFlow padding."""

    def __init__(self, layer: Layer, config: MobileNetV1Config):
        super().__init__()
        k, s, d = layer.kernel, layer.stride, layer.dilation
        # TF's SAME equals symmetric padding except at stride 2, where it pads
        # bottom/right only on even inputs; that case is padded in forward.
        self.tf_pad = config.padding == "tf_same" and s > 1
        self.conv = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            k,
            stride=s,
            padding=0 if self.tf_pad else d * (k - 1) // 2,
            dilation=d,
            groups=layer.groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(layer.out_channels, eps=config.bn_eps, momentum=config.bn_momentum)
        self.act = ACTIVATIONS[config.activation](inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_pad:
            x = _pad_same(x, self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0])
        return self.act(self.bn(self.conv(x)))


def _pad_same(x: torch.Tensor, kernel: int, stride: int, dilation: int) -> torch.Tensor:
    # shape-dependent padding: a leaf for torch.fx (see the wrap below), since a traced shape cannot be compared
    ih, iw = x.shape[-2], x.shape[-1]
    ph = max((-(-ih // stride) - 1) * stride + (kernel - 1) * dilation + 1 - ih, 0)
    pw = max((-(-iw // stride) - 1) * stride + (kernel - 1) * dilation + 1 - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


torch.fx.wrap("_pad_same")


class DepthwiseSeparable(nn.Module):
    """Figure 3, right: depthwise 3x3 -> BN -> act, then pointwise 1x1 -> BN -> act."""

    def __init__(self, block: Block, config: MobileNetV1Config):
        super().__init__()
        self.depthwise = ConvBNAct(block.layers[0], config)
        self.pointwise = ConvBNAct(block.layers[1], config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _block_module(block: Block, config: MobileNetV1Config) -> nn.Module:
    if len(block.layers) == 2:
        return DepthwiseSeparable(block, config)
    return ConvBNAct(block.layers[0], config)


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al., 2017).

    Takes an ``(N, 3, H, W)`` float tensor with H, W >= 32 and returns
    ``(N, num_classes)`` logits, or ``(N, channels)`` pooled features when
    ``num_classes == 0``.  Build it with :func:`mobilenet_v1`.

    ``meta`` (a :class:`~mobilenets.metadata.Metadata`) is what its weights
    need at inference: resolution, normalisation, labels, source.
    ``pretrained_cfg`` is derived from it and the config, so it stays true
    after ``reset_classifier``.
    """

    # Python-side views, not part of the scripted forward
    __jit_unused_properties__ = ["pretrained_cfg", "default_cfg"]

    def __init__(self, config: MobileNetV1Config | None = None, **options):
        super().__init__()
        if config is None:
            config = MobileNetV1Config(**options)
        elif options:
            raise TypeError("pass either a MobileNetV1Config or keyword options, not both")
        self.config = config
        self.blocks = config.blocks()
        self.features = nn.Sequential(
            OrderedDict((str(block.index), _block_module(block, config)) for block in self.blocks)
        )
        self.num_features = self.blocks[-1].out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        fc = architecture.classifier(self.blocks, config.num_classes)
        self.classifier = nn.Linear(fc.in_channels, fc.out_channels) if fc else nn.Identity()
        # a plain conv row is both a block and a layer: list its name once
        self.endpoint_names = tuple(
            dict.fromkeys(name for block in self.blocks for name in (block.name, *(l.name for l in block.layers)))
        )
        self.meta = Metadata()
        self._cfg_extra: dict = {}
        self.reset_parameters()

    @property
    def pretrained_cfg(self) -> dict:
        """timm's keys for this model's preprocessing and head, from ``meta`` and the config.

        Keys another library sets (timm's ``tag``, ``architecture``, ...) are kept; the derived ones always
        describe the model as it is now.
        """
        derived = self.meta.pretrained_cfg(self.config.num_classes, self.config.output_stride)
        return {**self._cfg_extra, **derived}

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        self._cfg_extra = dict(cfg or {})

    default_cfg = pretrained_cfg  # timm's older name for the same dict

    def reset_parameters(self) -> None:
        """TF-slim's initialisation: truncated normal (stddev 0.09, cut at 2 sigma) for every weight."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.09, a=-0.18, b=0.18)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (N, channels, ceil(H/32), ceil(W/32)) at output_stride 32."""
        # the input check reads concrete shapes: skip it while scripting, compiling or fx-tracing
        # (torchvision's create_feature_extractor), where x is symbolic
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self._check_input(x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map to (N, channels) and classify; ``pre_logits=True`` stops before the classifier."""
        x = torch.flatten(self.pool(x), 1)
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head for ``num_classes`` classes (0: pooled features), as timm's models have.

        ``config.num_classes`` follows, so saving and reloading the model keeps the new head.
        """
        config = dataclasses.replace(self.config, num_classes=num_classes)  # validates num_classes
        fc = architecture.classifier(self.blocks, num_classes)
        classifier = nn.Linear(fc.in_channels, fc.out_channels) if fc else nn.Identity()
        if fc:
            nn.init.trunc_normal_(classifier.weight, std=0.09, a=-0.18, b=0.18)
            nn.init.zeros_(classifier.bias)
        old = next(self.features.parameters())
        self.classifier = classifier.to(device=old.device, dtype=old.dtype)
        self.config = config
        self.meta = self.meta.for_head(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_endpoints(self, x: torch.Tensor, endpoints=None) -> dict[str, torch.Tensor]:
        """Intermediate feature maps, for use as a backbone.

        ``endpoints`` names TF-slim endpoints ("Conv2d_5_pointwise",
        "Conv2d_11") or Table 1 row indices (5, 11, 13); default every block
        output.  Returns a dict keyed as asked, in network order; the forward
        pass stops at the last one asked for.
        """
        if endpoints is None:
            endpoints = [block.name for block in self.blocks]
        wanted = {}
        for e in endpoints:
            name = f"Conv2d_{e}" if isinstance(e, int) and not isinstance(e, bool) else e
            if name not in self.endpoint_names:
                raise ParameterError(f"unknown endpoint {e!r}; this model has {list(self.endpoint_names)}")
            wanted[name] = e
        self._check_input(x)
        out: dict = {}
        for block, module in zip(self.blocks, self.features):
            parts = (module.depthwise, module.pointwise) if len(block.layers) == 2 else (module,)
            for layer, part in zip(block.layers, parts):
                x = part(x)
                if layer.name in wanted:
                    out[wanted[layer.name]] = x
            if block.name in wanted:
                out[wanted[block.name]] = x
            if len(out) == len(wanted):
                break
        return out

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):
            return
        if not isinstance(x, torch.Tensor):
            raise ParameterTypeError(f"expected a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ParameterError(
                f"expected input of shape (N, 3, H, W) with H, W >= {architecture.MIN_RESOLUTION}, "
                f"got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < architecture.MIN_RESOLUTION:
            raise ParameterError(
                f"input is {x.shape[-2]}x{x.shape[-1]}; MobileNet needs at least "
                f"{architecture.MIN_RESOLUTION}x{architecture.MIN_RESOLUTION}"
            )
        if not x.is_floating_point():
            raise ParameterTypeError(f"expected a floating-point tensor, got {x.dtype}; preprocess images first")

