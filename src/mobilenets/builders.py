"""The public builder, ``mobilenet_v1(alpha, weights=...)``, and ``save`` / ``load`` for any model.

``save(model, path)`` writes our .safetensors (config, weights, resolution,
normalisation, labels, checksum), so any model round-trips: converted,
trained, fine-tuned, with any number of classes or an ablation of Table 4/5.
Every model these return carries ``model.meta`` (a :class:`~mobilenets.metadata.Metadata`) and
``model.pretrained_cfg`` (timm's keys, derived from it), so timm's data helpers see its real preprocessing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import replace
from enum import Enum
from pathlib import Path

import torch

from . import weights as _weights
from .errors import ParameterError, ParameterTypeError
from .model import MobileNetV1, MobileNetV1Config, MobileNetV1Features
from .weights.layout import WeightsError, check_resolution


def mobilenet_v1(alpha: float | None = None, *, weights: str | os.PathLike | Enum | None = None,
                 resolution: int | None = None, num_classes: int | None = None, progress: bool = True,
                 features_only: bool = False, out_indices=(0, 1, 2, 3, 4), drop_rate: float | None = None,
                 device=None, dtype=None, **kwargs) -> MobileNetV1:
    """MobileNet v1 (Howard et al., 2017, arXiv:1704.04861) with width multiplier ``alpha`` (default 1.0).

    ``weights=None`` gives a freshly initialised model; ``kwargs`` are
    :class:`MobileNetV1Config`'s options: ``activation`` ("relu6" or "relu"),
    ``padding`` ("symmetric" or "tf_same"), ``bn_eps``, ``bn_momentum``,
    ``dropout``, ``min_depth``, ``output_stride`` (8, 16, 32), ``full_conv``
    (Table 4), ``shallow`` (Table 5), ``in_chans`` and ``global_pool``;
    ``num_classes`` defaults to 1000 and ``num_classes=0`` gives a
    pooled-feature model.  ``weights="imagenet"`` loads the released ImageNet
    weights for ``alpha`` x ``resolution`` (see ``mobilenets.weights.WEIGHTS``),
    fetched and converted once; so does a member of
    ``mobilenets.models.MobileNet_V1_Weights`` or its name
    ("MobileNet_V1_Weights.IMAGENET1K_0_5_160", as torchvision's
    ``get_weight`` takes it), which also sets ``alpha`` and ``resolution``.
    ``weights=PATH`` loads a run folder, checkpoint, .safetensors or state
    dict.  With weights, ``resolution`` defaults to the weights' own,
    ``num_classes`` gives a new, freshly initialised head for fine-tuning and
    ``in_chans`` other than 3 adapts the first convolution (see
    ``mobilenets.weights.layout.adapt_first_conv``).

    timm's arguments: ``features_only=True`` returns a
    :class:`~mobilenets.model.MobileNetV1Features` backbone whose forward
    gives the feature maps of the levels ``out_indices`` (of
    ``model.feature_info``); ``drop_rate`` is ``dropout``; ``device`` and
    ``dtype`` place the model.  An unknown argument raises ``TypeError``.
    """
    known = {f.name for f in dataclasses.fields(MobileNetV1Config)} - {"alpha", "num_classes"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hint = "; for pretrained weights pass weights='imagenet'" if "pretrained" in unknown else ""
        raise ParameterTypeError(f"mobilenet_v1() got unexpected keyword argument(s) {', '.join(unknown)}; "
                                 f"model options are {', '.join(sorted(known))}{hint}")
    if drop_rate is not None:
        if "dropout" in kwargs:
            raise ParameterError("pass dropout or drop_rate (timm's name for it), not both")
        kwargs["dropout"] = drop_rate
    released = _weights.registry.released(weights)
    if released is not None:
        for name, given, own in (("alpha", alpha, released.alpha), ("resolution", resolution, released.resolution)):
            if given is not None and given != own:
                raise WeightsError(f"{weights!r} are the {released.alpha:g}-{released.resolution} weights, "
                                   f"not {name} {given!r}; leave {name} out or choose the member for it")
        alpha, resolution, weights = released.alpha, released.resolution, "imagenet"
    alpha = 1.0 if alpha is None else alpha
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is None:
        config = MobileNetV1Config(alpha=alpha, **kwargs)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = MobileNetV1(config)
        if resolution is not None:
            model.meta = replace(model.meta, resolution=check_resolution(resolution, "mobilenet_v1"))
    else:
        if isinstance(weights, str) and weights == "imagenet":
            converted = _weights.read("imagenet", alpha=alpha, resolution=resolution, progress=progress)
        else:
            converted = _weights.read(weights, options=kwargs, progress=progress)
            if converted.config.alpha != alpha:
                raise WeightsError(f"{weights} holds alpha {converted.config.alpha:g} weights, not alpha {alpha:g}; "
                                   f"pass alpha={converted.config.alpha:g} or use mobilenets.load({str(weights)!r})")
            if resolution is not None:
                converted.meta = replace(converted.meta, resolution=check_resolution(resolution, "mobilenet_v1"))
        model = _weights.build(converted, kwargs, weights)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if features_only:
        backbone = MobileNetV1Features.from_model(model, out_indices)
        backbone.meta = model.meta
        return backbone
    return model


def save(model: MobileNetV1, path) -> Path:
    """Write ``model`` (any MobileNetV1) as .safetensors with its config and ``model.meta``; atomically."""
    return _weights.save(model, path)


def load(path, **options) -> MobileNetV1:
    """The model in ``path`` (eval mode): a file from :func:`save`, a run folder, checkpoint or state dict."""
    return _weights.load(path, **options)
