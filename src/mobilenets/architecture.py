"""MobileNet v1 as data: the paper's Table 1, the width rule, the ablation variants.

Everything that knows the shape of the network reads this file: ``model.py``
builds modules from :func:`body`, ``cost.py`` counts mult-adds and parameters
from :func:`layers`.  Because both read one table they cannot disagree.

Howard et al., 2017, "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications", arXiv:1704.04861, Table 1 (corrected: the
14x14x512 pair repeats five times and the last depthwise convolution has
stride 1; see docs/architecture.md, Errata).
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import is_integer, is_number
from .errors import ParameterError, ParameterTypeError


@dataclass(frozen=True)
class Conv:
    """A standard convolution followed by BatchNorm and the activation."""

    kernel: int
    stride: int
    depth: int


@dataclass(frozen=True)
class DepthSepConv:
    """A depthwise kxk convolution then a pointwise 1x1 one, each followed by BN and activation."""

    kernel: int
    stride: int
    depth: int


# Table 1, with channel depths for alpha = 1.  Index i is TF-slim's Conv2d_i and
# Keras' conv_dw_i / conv_pw_i, so weight names line up with both.
CONV_DEFS: tuple[Conv | DepthSepConv, ...] = (
    Conv(kernel=3, stride=2, depth=32),
    DepthSepConv(kernel=3, stride=1, depth=64),
    DepthSepConv(kernel=3, stride=2, depth=128),
    DepthSepConv(kernel=3, stride=1, depth=128),
    DepthSepConv(kernel=3, stride=2, depth=256),
    DepthSepConv(kernel=3, stride=1, depth=256),
    DepthSepConv(kernel=3, stride=2, depth=512),
    DepthSepConv(kernel=3, stride=1, depth=512),
    DepthSepConv(kernel=3, stride=1, depth=512),
    DepthSepConv(kernel=3, stride=1, depth=512),
    DepthSepConv(kernel=3, stride=1, depth=512),
    DepthSepConv(kernel=3, stride=1, depth=512),
    DepthSepConv(kernel=3, stride=2, depth=1024),
    DepthSepConv(kernel=3, stride=1, depth=1024),
)

# Table 5's "shallow" MobileNet removes the five 14x14x512 separable pairs.
SHALLOW_REMOVED = (7, 8, 9, 10, 11)

MIN_RESOLUTION = 32  # five stride-2 layers: 32 px is the smallest input that leaves a 1x1 map
# The one home of the bounds every entry point checks (model config, weight files, training, the CLI).
# Far beyond every published model (alpha <= 1, resolution <= 224; timm's widest is alpha 1.25) yet small
# enough that a typo such as alpha 50 (a 10 GB model) or resolution 20000 (an eval resize of 5 GB per image)
# is refused before anything is allocated. ImageNet-21k has 21,843 classes.
MAX_ALPHA = 4.0
MAX_RESOLUTION = 2048
MAX_CLASSES = 100_000
# min_depth raises every layer to at least this width; no layer is ever wider than 1024 * MAX_ALPHA, so neither
# may this be (min_depth 10**9 asked for 13 trillion parameters)
MAX_MIN_DEPTH = int(1024 * MAX_ALPHA)
OUTPUT_STRIDES = (8, 16, 32)
MAX_IN_CHANS = 1024  # input channels: RGB is 3; multispectral stacks have tens; a typo of 10**6 is refused


def depth(channels: int, alpha: float, min_depth: int = 8) -> int:
    """The width rule: int(c * alpha), clamped below by ``min_depth`` as TF-slim does."""
    return max(int(channels * alpha), min_depth)


ALPHA_RANGE = f"a number in (0, {MAX_ALPHA:g}] such as 1.0, 0.75, 0.5, 0.25"
RESOLUTION_RANGE = f"an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] such as 224, 192, 160, 128"


def alpha_ok(alpha) -> bool:
    """Whether ``alpha`` is a width multiplier this library builds: finite, in (0, MAX_ALPHA]."""
    return is_number(alpha) and 0 < alpha <= MAX_ALPHA


def resolution_ok(resolution) -> bool:
    """Whether ``resolution`` is an input size in [MIN_RESOLUTION, MAX_RESOLUTION]."""
    return is_integer(resolution) and MIN_RESOLUTION <= resolution <= MAX_RESOLUTION


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ParameterTypeError(f"alpha must be {ALPHA_RANGE}, got {alpha!r}")
    if not alpha_ok(alpha):
        raise ParameterError(f"alpha must be {ALPHA_RANGE}, got {alpha!r}")
    return float(alpha)


def check_input_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise an input size to (height, width) and check each side is in [MIN_RESOLUTION, MAX_RESOLUTION]."""
    size = (resolution, resolution) if not isinstance(resolution, (tuple, list)) else tuple(resolution)
    if len(size) != 2 or not all(is_integer(s) for s in size):
        raise ParameterTypeError(f"resolution must be an integer or a (height, width) pair of integers, "
                                 f"got {resolution!r}")
    if not all(resolution_ok(s) for s in size):
        raise ParameterError(f"resolution must be {RESOLUTION_RANGE} on each side, got {resolution!r}")
    return size  # type: ignore[return-value]


def check_num_classes(num_classes: int) -> int:
    if not is_integer(num_classes):
        raise ParameterTypeError(f"num_classes must be an integer >= 0 (0 gives pooled features), "
                                 f"got {num_classes!r}")
    if not 0 <= num_classes <= MAX_CLASSES:
        raise ParameterError(f"num_classes must be in [0, {MAX_CLASSES}] (0 gives pooled features), "
                             f"got {num_classes!r}")
    return num_classes


@dataclass(frozen=True)
class Layer:
    """One convolution (or the classifier) of a concrete network, resolution-free.

    ``index`` is the row of Table 1 it comes from (Conv2d_i in TF-slim); ``kind``
    is one of "conv", "depthwise", "pointwise", "fc".
    """

    name: str
    index: int
    kind: str
    kernel: int
    stride: int
    dilation: int
    in_channels: int
    out_channels: int

    @property
    def groups(self) -> int:
        return self.in_channels if self.kind == "depthwise" else 1


@dataclass(frozen=True)
class Block:
    """A row of Table 1 as built: a standard conv, or a depthwise + pointwise pair."""

    index: int
    layers: tuple[Layer, ...]

    @property
    def name(self) -> str:
        return f"Conv2d_{self.index}"

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_channels


def body(
    alpha: float = 1.0,
    *,
    min_depth: int = 8,
    full_conv: bool = False,
    shallow: bool = False,
    output_stride: int | None = None,
    in_chans: int = 3,
) -> tuple[Block, ...]:
    """The convolutional body for width multiplier ``alpha``.

    ``full_conv`` replaces every separable pair by a standard 3x3 convolution
    (Table 4); ``shallow`` removes rows 7-11 (Table 5); ``output_stride`` keeps
    the feature map at 1/8 or 1/16 of the input by turning later strides into
    dilation, as TF-slim does for dense prediction; ``in_chans`` is the number
    of input channels (3 for RGB; 1 for grayscale, more for other sensors).
    """
    alpha = check_alpha(alpha)
    if not is_integer(in_chans) or not 1 <= in_chans <= MAX_IN_CHANS:
        raise ParameterError(f"in_chans must be an integer in [1, {MAX_IN_CHANS}] (3 for RGB), got {in_chans!r}")
    if not is_integer(min_depth) or not 1 <= min_depth <= MAX_MIN_DEPTH:
        raise ParameterError(f"min_depth must be an integer in [1, {MAX_MIN_DEPTH}] (TF-slim uses 8), "
                             f"got {min_depth!r}")
    if output_stride is not None and output_stride not in OUTPUT_STRIDES:
        raise ParameterError(f"output_stride must be one of {OUTPUT_STRIDES} or None, got {output_stride!r}")

    blocks = []
    in_channels = in_chans
    current_stride, rate = 1, 1
    for index, conv_def in enumerate(CONV_DEFS):
        if shallow and index in SHALLOW_REMOVED:
            continue
        # TF-slim's rule: once the target stride is reached, later strides become dilation.
        if output_stride is not None and current_stride == output_stride:
            stride, dilation = 1, rate
            rate *= conv_def.stride
        else:
            stride, dilation = conv_def.stride, 1
            current_stride *= conv_def.stride
        out_channels = depth(conv_def.depth, alpha, min_depth)
        name = f"Conv2d_{index}"
        if isinstance(conv_def, Conv) or full_conv:
            layers = (Layer(name, index, "conv", conv_def.kernel, stride, dilation, in_channels, out_channels),)
        else:
            layers = (
                Layer(f"{name}_depthwise", index, "depthwise", conv_def.kernel, stride, dilation, in_channels, in_channels),
                Layer(f"{name}_pointwise", index, "pointwise", 1, 1, 1, in_channels, out_channels),
            )
        blocks.append(Block(index, layers))
        in_channels = out_channels
    return tuple(blocks)


@dataclass(frozen=True)
class FeatureLevel:
    """A feature map for dense prediction: the output of the last row at one of the paper's five resolutions."""

    position: int  # index into the body's blocks (= the ``features`` child), not the Table 1 row
    block: Block
    reduction: int  # input size / feature-map size, after output_stride's dilation


def feature_levels(blocks: tuple[Block, ...]) -> tuple[FeatureLevel, ...]:
    """One level per stride of Table 1 (1/2, 1/4, 1/8, 1/16, 1/32): the last row before the next stride-2 row.

    For the standard body these are rows 1, 3, 5, 11 and 13 with 64, 128, 256, 512 and 1024 channels at alpha 1
    (TF-slim's Conv2d_11 and Conv2d_13 are SSD's two backbone taps).  The levels follow Table 1's strides, not
    the dilated ones, so level i names the same row at every output_stride; only its reduction changes.
    """
    levels, table_stride, reduction = [], 1, 1
    for position, block in enumerate(blocks):
        table_stride *= CONV_DEFS[block.index].stride
        reduction *= block.layers[0].stride
        level = FeatureLevel(position, block, reduction)
        if levels and levels[-1][0] == table_stride:
            levels[-1] = (table_stride, level)
        elif table_stride > 1:
            levels.append((table_stride, level))
    return tuple(level for _, level in levels)


def classifier(blocks: tuple[Block, ...], num_classes: int) -> Layer | None:
    """The fully connected layer after global pooling (None for a feature extractor)."""
    if num_classes == 0:
        return None
    return Layer("Logits", len(CONV_DEFS), "fc", 1, 1, 1, blocks[-1].out_channels, num_classes)


def output_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Spatial size after a 'same'-padded convolution: both PyTorch's k//2 and TF's SAME give ceil(n/s)."""
    return (-(-size[0] // stride), -(-size[1] // stride))


@dataclass(frozen=True)
class SizedLayer:
    """A :class:`Layer` at a given input resolution."""

    layer: Layer
    input_size: tuple[int, int, int]  # (height, width, channels), as Table 1 writes it
    output_size: tuple[int, int, int]


def layers(blocks: tuple[Block, ...], resolution: int | tuple[int, int], num_classes: int) -> tuple[SizedLayer, ...]:
    """Every convolution and the classifier, with input and output sizes for ``resolution``."""
    size = check_input_size(resolution)
    sized = []
    for block in blocks:
        for layer in block.layers:
            out = output_size(size, layer.stride)
            sized.append(SizedLayer(layer, (*size, layer.in_channels), (*out, layer.out_channels)))
            size = out
    fc = classifier(blocks, num_classes)
    if fc is not None:
        sized.append(SizedLayer(fc, (1, 1, fc.in_channels), (1, 1, fc.out_channels)))
    return tuple(sized)
