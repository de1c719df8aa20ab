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
# The paper pools by averaging; every deploy path and the int8 pipeline assume it, so max pooling is not offered.
GLOBAL_POOLS = ("avg", "")


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
    in_chans: int = 3
    # "avg": the paper's global average pool; "": none (feature maps, or per-position logits with a classifier)
    global_pool: str = "avg"

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
        if not isinstance(self.global_pool, str) or self.global_pool not in GLOBAL_POOLS:
            raise ParameterError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        # the body checks min_depth, output_stride and in_chans
        architecture.body(self.alpha, min_depth=self.min_depth, output_stride=self.output_stride,
                          in_chans=self.in_chans)

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
            in_chans=self.in_chans,
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
    """MobileNet v1 (Howard et al., 2017), with timm's model interface.

    Takes an ``(N, in_chans, H, W)`` float tensor with H, W >= 32 and returns
    ``(N, num_classes)`` logits, or ``(N, channels)`` pooled features when
    ``num_classes == 0``; with ``global_pool == ""`` nothing is pooled
    (the last feature map, or per-position logit maps).  Build it with
    :func:`mobilenet_v1`.

    As timm's models do, it has ``forward_features`` / ``forward_head``,
    ``reset_classifier(num_classes, global_pool=None)``, ``num_classes``,
    ``num_features``, ``head_hidden_size``, ``in_chans``, ``drop_rate``,
    ``feature_info`` (one dict per feature level, see
    :func:`architecture.feature_levels`), ``forward_intermediates`` and
    ``prune_intermediate_layers``.

    ``meta`` (a :class:`~mobilenets.metadata.Metadata`) is what its weights
    need at inference: resolution, normalisation, labels, source.
    ``pretrained_cfg`` is derived from it and the config, so it stays true
    after ``reset_classifier``.
    """

    # Python-side views of the config and meta, not part of the scripted forward
    __jit_unused_properties__ = ["num_classes", "in_chans", "drop_rate", "head_hidden_size", "pretrained_cfg",
                                 "default_cfg"]

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
        self.global_pool = config.global_pool
        self.pool = nn.AdaptiveAvgPool2d(1) if config.global_pool else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        fc = architecture.classifier(self.blocks, config.num_classes)
        self.classifier = nn.Linear(fc.in_channels, fc.out_channels) if fc else nn.Identity()
        self._set_levels()
        self.meta = Metadata()
        self._cfg_extra: dict = {}
        self.init_weights()

    def _set_levels(self) -> None:
        levels = architecture.feature_levels(self.blocks)
        # positions in self.features of each level's last block, for forward_intermediates
        self.level_positions = [level.position for level in levels]
        self.feature_info = [
            {"num_chs": level.block.out_channels, "reduction": level.reduction,
             "module": f"features.{level.block.index}", "endpoint": level.block.name}
            for level in levels
        ]
        # a plain conv row is both a block and a layer: list its name once
        self.endpoint_names = tuple(
            dict.fromkeys(name for block in self.blocks for name in (block.name, *(l.name for l in block.layers)))
        )

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def in_chans(self) -> int:
        return self.config.in_chans

    @property
    def drop_rate(self) -> float:
        """Dropout before the classifier (timm's name for ``config.dropout``)."""
        return self.dropout.p

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the classifier reads: ``num_features`` (MobileNet has no pre-logits layer)."""
        return self.num_features

    @property
    def pretrained_cfg(self) -> dict:
        """timm's keys for this model's preprocessing and head, from ``meta`` and the config.

        Keys another library sets (timm's ``tag``, ``architecture``, ...) are kept; the derived ones always
        describe the model as it is now.
        """
        derived = self.meta.pretrained_cfg(self.config.num_classes, self.config.output_stride, self.config.in_chans)
        return {**self._cfg_extra, **derived}

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        self._cfg_extra = dict(cfg or {})

    default_cfg = pretrained_cfg  # timm's older name for the same dict

    def init_weights(self) -> None:
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
        """Pool a feature map to (N, channels) and classify; ``pre_logits=True`` stops before the classifier.

        With ``global_pool == ""`` nothing is pooled: the feature map is returned as it is, or classified at
        every position, giving (N, num_classes, H', W') logit maps.
        """
        x = self.pool(x)
        if self.global_pool == "":
            if pre_logits:
                return x
            # the classifier as a 1x1 convolution: channels last for the Linear, then back
            return self.classifier(self.dropout(x).movedim(1, -1)).movedim(-1, 1)
        x = torch.flatten(x, 1)
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised head for ``num_classes`` classes (0: pooled features), as timm's models have.

        ``global_pool`` is "avg" or "" (no pooling: forward returns the feature map, or logit maps with a
        classifier); None keeps the current one.  The new head takes the model's device, dtype and train/eval mode;
        ``config``, ``pretrained_cfg`` and ``meta`` (see ``Metadata.for_head``) follow, so saving and reloading
        the model keeps the new head.
        """
        global_pool = self.config.global_pool if global_pool is None else global_pool
        config = dataclasses.replace(self.config, num_classes=num_classes, global_pool=global_pool)  # validates
        fc = architecture.classifier(self.blocks, num_classes)
        classifier = nn.Linear(fc.in_channels, fc.out_channels) if fc else nn.Identity()
        if fc:
            nn.init.trunc_normal_(classifier.weight, std=0.09, a=-0.18, b=0.18)
            nn.init.zeros_(classifier.bias)
        old = next(self.features.parameters())
        self.classifier = classifier.to(device=old.device, dtype=old.dtype).train(self.training)
        self.pool = (nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()).train(self.training)
        self.global_pool = global_pool
        self.config = config
        self.meta = self.meta.for_head(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The feature maps of the levels in ``feature_info``, as timm's ``forward_intermediates``.

        ``indices``: None for every level, an int n for the last n, or a list of level indices (negative
        from the end).  Returns ``(final feature map, [maps])``, or only the list with
        ``intermediates_only=True``; ``stop_early=True`` stops after the last level asked for.  ``norm`` is
        accepted and has no effect: MobileNet has no final norm layer.  Only ``output_fmt="NCHW"``.
        """
        if output_fmt != "NCHW":
            raise ParameterError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take = self._take_indices(indices)
        wanted = {self.level_positions[i] for i in take}
        self._check_input(x)
        blocks = self.features[: max(wanted) + 1] if stop_early else self.features
        intermediates = []
        for position, block in enumerate(blocks):
            x = block(x)
            if position in wanted:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.unused
    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the layers after the last level in ``indices`` (as in :meth:`forward_intermediates`).

        Then ``forward_features`` ends at that level; when layers were dropped or ``prune_head`` is set the
        head goes too (``num_classes`` 0, no pooling).  Returns the absolute level indices.  A pruned model is
        a backbone: :func:`mobilenets.save` refuses it.  ``prune_norm`` has no effect (no final norm).
        """
        take = self._take_indices(indices)
        keep = self.level_positions[max(take)] + 1
        truncated = keep < len(self.features)
        if truncated:
            self.features = self.features[:keep]
            self.blocks = self.blocks[:keep]
            self.num_features = self.blocks[-1].out_channels
            self._set_levels()
        if truncated or prune_head:
            self.reset_classifier(0, "")
        return take

    def _take_indices(self, indices) -> list[int]:
        n = len(self.level_positions)
        if indices is None:
            indices = n
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= n:
                raise ParameterError(f"indices={indices} asks for the last {indices} of {n} feature levels; "
                                     f"use 1 to {n}, or a list of level indices 0 to {n - 1}")
            return list(range(n - indices, n))
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ParameterError(f"feature level index {i!r} is out of range: this model has {n} levels "
                                     f"(0 to {n - 1}, or -{n} to -1)")
            take.append(i % n)
        if not take:
            raise ParameterError("indices is empty; pass None for every feature level")
        return take

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
            raise ParameterTypeError(f"expected a torch.Tensor of shape (N, {self.in_chans}, H, W), "
                                     f"got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ParameterError(
                f"expected input of shape (N, {self.in_chans}, H, W) with H, W >= {architecture.MIN_RESOLUTION}, "
                f"got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < architecture.MIN_RESOLUTION:
            raise ParameterError(
                f"input is {x.shape[-2]}x{x.shape[-1]}; MobileNet needs at least "
                f"{architecture.MIN_RESOLUTION}x{architecture.MIN_RESOLUTION}"
            )
        if not x.is_floating_point():
            raise ParameterTypeError(f"expected a floating-point tensor, got {x.dtype}; preprocess images first")


class FeatureInfo:
    """The feature levels a features-only model returns, with timm's ``FeatureInfo`` accessors.

    ``info`` is the model's ``feature_info`` (one dict per level: ``num_chs``,
    ``reduction``, ``module``, ``endpoint``); ``channels()``, ``reduction()``
    and ``module_name()`` give the values at ``out_indices``, or at ``idx``.
    """

    def __init__(self, info: list[dict], out_indices):
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx=None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys=None, idx=None):
        picked = self.out_indices if idx is None else idx
        one = not isinstance(picked, (tuple, list))
        dicts = [self.info[i] if keys is None else {k: self.info[i][k] for k in keys}
                 for i in ((picked,) if one else picked)]
        return dicts[0] if one else dicts

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class MobileNetV1Features(MobileNetV1):
    """A backbone: ``forward`` returns the list of feature maps at ``out_indices`` (timm's ``features_only``).

    The layers after the last level asked for and the head are dropped; tensor
    names are the classifier's (``features.<row>...``), so its weights load
    as they are.  ``feature_info`` is a :class:`FeatureInfo` over those levels.
    """

    def __init__(self, config: MobileNetV1Config | None = None, out_indices=(0, 1, 2, 3, 4), **options):
        super().__init__(config, **options)
        self.out_indices = tuple(self.prune_intermediate_layers(out_indices))
        self.feature_info = FeatureInfo(self.feature_info, self.out_indices)

    @classmethod
    def from_model(cls, model: MobileNetV1, out_indices=(0, 1, 2, 3, 4)) -> "MobileNetV1Features":
        """The backbone of ``model`` (same tensors, device, dtype and train/eval mode)."""
        with torch.device("meta"):
            backbone = cls(model.config, out_indices=out_indices)
        own = model.state_dict()
        backbone.load_state_dict({k: own[k] for k in backbone.state_dict()}, assign=True)
        return backbone.train(model.training)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
