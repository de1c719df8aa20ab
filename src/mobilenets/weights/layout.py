"""Weights in our layout: (config, state_dict, meta), checked against the architecture before anything is built.

Every reader (our .safetensors, training checkpoints, Keras, TF-slim, timm)
ends in a :class:`Converted`.  Shapes are compared with a model built on the
``meta`` device (no memory, no initialisation) before any tensor is
allocated, so a file whose header or metadata claims ``alpha: 1000`` or a
billion classes is refused in one line instead of exhausting memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .. import checkpoint, labels
from ..architecture import MAX_ALPHA, MAX_CLASSES, RESOLUTION_RANGE, resolution_ok
from ..errors import MissingWeightsError, WeightsError  # noqa: F401 (their historical home)
from ..errors import ParameterTypeError
from .. import metadata
from ..images import Normalization
from ..metadata import DEFAULT_RESOLUTION, Metadata, check_normalization  # noqa: F401 (readers import them here)
from ..model import MobileNetV1, MobileNetV1Config
# Options that are properties of a set of weights; a caller may not override them when loading.
FIXED_OPTIONS = ("alpha", "activation", "padding", "bn_eps", "min_depth", "full_conv", "shallow")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in the order every released MobileNet uses (synset order), as a new list."""
    return list(labels.imagenet_labels())


def check_resolution(value, name: str = "<weights>") -> int:
    """A stored resolution, within the bounds of ``architecture`` (the eval resize allocates resolution^2 pixels)."""
    if not resolution_ok(value):
        raise WeightsError(f"{name}: resolution must be {RESOLUTION_RANGE}, got {value!r}")
    return value


def meta_shapes(config: MobileNetV1Config) -> dict[str, tuple[int, ...]]:
    """Our tensor names and shapes for ``config``, from a model on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MobileNetV1(config).state_dict().items()}


def check_shapes(config: MobileNetV1Config, shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """Refuse unless ``shapes`` (from a file's header) are exactly those of ``config``'s model.

    The config itself is bounded (alpha, num_classes) when it is made, so ``meta_shapes`` allocates nothing large.
    """
    own = meta_shapes(config)
    bad = [f"{k}: file has {shapes[k]}, the config expects {v}" for k, v in own.items()
           if k in shapes and tuple(shapes[k]) != v]
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    if bad or missing or unexpected:
        detail = bad[:2] + ([f"missing {missing[:3]}"] if missing else []) + \
            ([f"unexpected {unexpected[:3]}"] if unexpected else [])
        raise WeightsError(f"{name}: the tensors do not fit the stored config (alpha {config.alpha:g}, "
                           f"{config.num_classes} classes): {'; '.join(detail)}")


def infer_config(shapes: dict[str, tuple[int, ...]], *, name: str = "<weights>", **options) -> MobileNetV1Config:
    """The config whose model has exactly these tensor shapes: alpha from the widths, classes from the head.

    ``shapes`` maps our tensor names to shapes (a state dict's ``.shape`` works too).
    """
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    last_shape = shapes.get("features.13.pointwise.conv.weight")
    if not last_shape:
        raise WeightsError(f"{name}: no last pointwise layer (features.13.pointwise) found; "
                           f"is this a MobileNet v1 with 13 separable blocks?")
    last = last_shape[0]
    head = shapes.get("classifier.weight")
    num_classes = head[0] if head else 0
    if not 0 < last <= MAX_ALPHA * 1024 or num_classes > MAX_CLASSES:
        raise WeightsError(f"{name}: {last} channels and {num_classes} classes are beyond what this library "
                           f"loads (alpha <= {MAX_ALPHA:g}, num_classes <= {MAX_CLASSES})")
    first = shapes.get("features.0.conv.weight")
    if first and len(first) == 4:
        options.setdefault("in_chans", first[1])
    mismatch = ""
    # widths are int(c * alpha), so several alphas fit one file: the 4-digit rounding of the last width
    # over 1024 is exact for the released 1.0, 0.75, 0.5, 0.25 (and timm's 1.25); the raw ratio is the fallback
    for alpha in dict.fromkeys((round(last / 1024, 4), last / 1024)):
        try:
            config = MobileNetV1Config(alpha=alpha, num_classes=num_classes, **options)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{name}: {e}") from None
        own = meta_shapes(config)
        bad = [f"{k}: file has {shapes[k]}, alpha {alpha:g} expects {v}"
               for k, v in own.items() if k in shapes and shapes[k] != v]
        if not bad:
            missing = [k for k in own if k not in shapes]
            unexpected = [k for k in shapes if k not in own]
            if missing or unexpected:
                raise WeightsError(f"{name}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
            return config
        mismatch = bad[0]
    raise WeightsError(f"{name}: the layer widths fit no width multiplier alpha ({mismatch})")


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The first convolution's weight (out, c, k, k) for ``in_chans`` input channels, the rule timm uses.

    One channel: the sum over the colour channels, so a grey image gives what its RGB copy gave.  More:
    the channels repeated cyclically and scaled by c / in_chans, so an input of whole RGB copies gives the
    RGB output.
    """
    channels = weight.shape[1]
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    repeats = -(-in_chans // channels)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (channels / in_chans)


@dataclass
class Converted:
    """Weights in our layout: a state dict, the config that fits it and the metadata of the weights."""

    state_dict: dict[str, torch.Tensor]
    config: MobileNetV1Config
    meta: Metadata

    def model(self, **options) -> MobileNetV1:
        return build(self, options, self.meta.source or "<converted>")

    @classmethod
    def from_model(cls, model: MobileNetV1) -> Converted:
        """Any model (converted, trained, fine-tuned, ablated), with its meta or the defaults of a fresh one."""
        if not isinstance(model, MobileNetV1):
            raise WeightsError(f"expected a mobilenets MobileNetV1 model, got {type(model).__name__}")
        if len(model.features) != len(model.config.blocks()):
            raise WeightsError("this model is a pruned backbone (features_only or prune_intermediate_layers): "
                               "its config no longer describes it; save the full model it came from")
        meta = metadata.of(model).check_labels(model.config.num_classes, "model.meta")
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return cls(sd, model.config, meta)


def empty_model(config: MobileNetV1Config) -> MobileNetV1:
    """The model with uninitialised storage, for weights that will overwrite every tensor (skips the init)."""
    with torch.device("meta"):
        model = MobileNetV1(config)
    return model.to_empty(device="cpu")


def build(converted: Converted, options: dict, name) -> MobileNetV1:
    """The model (eval mode) holding ``converted``; ``options`` may change training-only settings or the head."""
    fixed = [k for k in options if k in FIXED_OPTIONS and options[k] != getattr(converted.config, k)]
    if fixed:
        raise WeightsError(f"{name}: {', '.join(f'{k}={options[k]!r}' for k in fixed)} conflicts with the weights "
                           f"({', '.join(f'{k}={getattr(converted.config, k)!r}' for k in fixed)}); leave it out")
    options = {k: v for k, v in options.items() if k not in FIXED_OPTIONS}
    unknown = sorted(set(options) - {f.name for f in fields(MobileNetV1Config)})
    if unknown:
        raise ParameterTypeError(f"{name}: unknown model option(s) {', '.join(unknown)}")
    try:
        config = replace(converted.config, **options)
    except ValueError as e:
        raise WeightsError(f"{name}: {e}") from None
    new_head = config.num_classes != converted.config.num_classes
    model = MobileNetV1(config) if new_head else empty_model(config)
    sd = dict(converted.state_dict)
    meta = converted.meta
    if config.in_chans != converted.config.in_chans:
        sd["features.0.conv.weight"] = adapt_first_conv(sd["features.0.conv.weight"], config.in_chans)
    if new_head:
        # a new head for fine-tuning: keep the body, let the classifier start from its initialisation
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
        meta = meta.for_head(config.num_classes)
    checkpoint.load_state_dict(model, sd, path=name)
    model.meta = meta
    return model.eval()



def finish(sd: dict[str, torch.Tensor], config: MobileNetV1Config, *, source: str, path, resolution,
           normalization: Normalization, labels=None) -> Converted:
    """A converter's result: the tensors checked against ``config``, with the metadata every file carries."""
    from pathlib import Path

    check_shapes(config, {k: tuple(v.shape) for k, v in sd.items()}, str(path))
    if labels is None and config.num_classes == 1000:
        labels = imagenet_labels()
    meta = Metadata.from_dict({"resolution": check_resolution(int(resolution or DEFAULT_RESOLUTION), str(path)),
                               "normalization": normalization, "labels": labels,
                               "source": f"{source}:{Path(path).name}"}, str(path), num_classes=config.num_classes)
    return Converted(sd, config, meta)
