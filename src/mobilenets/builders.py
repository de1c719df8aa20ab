"""The public builder, ``mobilenet_v1(alpha, weights=...)``, and ``save`` / ``load`` for any model.

``save(model, path)`` writes our .safetensors (config, weights, resolution,
normalisation, labels, checksum), so any model round-trips: converted,
trained, fine-tuned, with any number of classes or an ablation of Table 4/5.
Every model these return carries ``model.meta`` (a :class:`~mobilenets.metadata.Metadata`) and
``model.pretrained_cfg`` (timm's keys, derived from it), so timm's data helpers see its real preprocessing.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import weights as _weights
from .model import MobileNetV1, MobileNetV1Config
from .weights.layout import WeightsError, check_resolution


def mobilenet_v1(alpha: float = 1.0, *, weights: str | os.PathLike | None = None, resolution: int | None = None,
                 num_classes: int | None = None, progress: bool = True, **kwargs) -> MobileNetV1:
    """MobileNet v1 (Howard et al., 2017, arXiv:1704.04861) with width multiplier ``alpha``.

    ``weights=None`` gives a freshly initialised model; ``kwargs`` are
    :class:`MobileNetV1Config`'s options: ``activation`` ("relu6" or "relu"),
    ``padding`` ("symmetric" or "tf_same"), ``bn_eps``, ``bn_momentum``,
    ``dropout``, ``min_depth``, ``output_stride`` (8, 16, 32), ``full_conv``
    (Table 4) and ``shallow`` (Table 5); ``num_classes`` defaults to 1000 and
    ``num_classes=0`` gives a pooled-feature model.  ``weights="imagenet"`` loads the
    released ImageNet weights for ``alpha`` x ``resolution`` (see
    ``mobilenets.weights.WEIGHTS``), fetched and converted once.
    ``weights=PATH`` loads a run folder, checkpoint, .safetensors or state
    dict.  With weights, ``resolution`` defaults to the weights' own and
    ``num_classes`` gives a new, freshly initialised head for fine-tuning.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is None:
        try:
            model = MobileNetV1(MobileNetV1Config(alpha=alpha, **kwargs))
        except TypeError as e:
            raise WeightsError(f"unknown model option ({e})") from None
        if resolution is not None:
            model.meta = replace(model.meta, resolution=check_resolution(resolution, "mobilenet_v1"))
        return model
    if isinstance(weights, str) and weights == "imagenet":
        converted = _weights.read("imagenet", alpha=alpha, resolution=resolution, progress=progress)
    else:
        converted = _weights.read(weights, options=kwargs, progress=progress)
        if converted.config.alpha != alpha:
            raise WeightsError(f"{weights} holds alpha {converted.config.alpha:g} weights, not alpha {alpha:g}; "
                               f"pass alpha={converted.config.alpha:g} or use mobilenets.load({str(weights)!r})")
        if resolution is not None:
            converted.meta = replace(converted.meta, resolution=check_resolution(resolution, "mobilenet_v1"))
    return _weights.build(converted, kwargs, weights)


def save(model: MobileNetV1, path) -> Path:
    """Write ``model`` (any MobileNetV1) as .safetensors with its config and ``model.meta``; atomically."""
    return _weights.save(model, path)


def load(path, **options) -> MobileNetV1:
    """The model in ``path`` (eval mode): a file from :func:`save`, a run folder, checkpoint or state dict."""
    return _weights.load(path, **options)
