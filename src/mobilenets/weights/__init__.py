"""Weights: the released ImageNet weights, converters from Keras / TF-slim / timm, our file format, one resolver.

- :mod:`.registry`: the typed registry of released weights (file, preprocessing, labels, published accuracy).
- :mod:`.keras`, :mod:`.tf_slim` (with :mod:`.tf_checkpoint`), :mod:`.tf_frozen`, :mod:`.timm`: per-source converters.
- :mod:`.file`: our ``.safetensors`` format; :mod:`.download`: fetch, cache, sha256 records.
- :mod:`.resolve`: run folder / checkpoint / safetensors / state dict / "imagenet" -> (config, state_dict, meta).

No reader ever unpickles code, and every size a file claims is checked
against the architecture before memory is allocated for it.
"""

from __future__ import annotations


from ..model import MobileNetV1
from . import registry
from . import download  # the module: download.download, download.verify_sha256
from .download import pretrained, verify_sha256
from .file import save, tensors_sha256
from .keras import from_keras
from .layout import Converted, MissingWeightsError, WeightsError, build, imagenet_labels, infer_config
from .registry import WEIGHTS, Weights
from .resolve import read, resolve
from .tf_frozen import from_tf_frozen
from .tf_slim import from_tf_slim, from_tf_slim_variables
from .timm import from_timm

SOURCES = ("keras", "tf-slim", "tf-frozen", "timm", "tflite")


def convert(source: str, path, *, keep_background: bool = False, resolution: int | None = None) -> Converted:
    """Convert released weights (``source`` one of "keras", "tf-slim", "tf-frozen", "timm", "tflite") to our layout."""
    if source == "keras":
        return from_keras(path, resolution=resolution)
    if source == "tf-slim":
        return from_tf_slim(path, keep_background=keep_background, resolution=resolution)
    if source == "tf-frozen":
        return from_tf_frozen(path, keep_background=keep_background, resolution=resolution)
    if source == "tflite":
        from .tflite import from_tflite

        return from_tflite(path, keep_background=keep_background, resolution=resolution)
    if source == "timm":
        return from_timm(path, resolution=resolution)
    raise WeightsError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")


def load(source, *, progress: bool = True, **options) -> MobileNetV1:
    """The model (eval mode) in ``source``: a run folder, checkpoint, .safetensors, state dict or "imagenet".

    ``model.meta`` (a :class:`~mobilenets.metadata.Metadata`) holds what the weights need at inference (``resolution``,
    ``normalization``, ``labels``, ``source``) and ``model.pretrained_cfg``
    the same in timm's keys.  ``options`` may change training-only settings
    (``dropout``, ``bn_momentum``, ``output_stride``) or give a new head
    (``num_classes``; freshly initialised); for a plain state-dict file they
    also give the settings it does not record (``padding``, ``bn_eps``).
    With "imagenet", ``alpha`` and ``resolution`` choose the released model.
    """
    resolve_args = {"progress": progress}
    if isinstance(source, str) and source == "imagenet":
        resolve_args.update(alpha=options.pop("alpha", 1.0), resolution=options.pop("resolution", None))
    converted = read(source, options=options, **resolve_args)
    return build(converted, options, source)


__all__ = ["SOURCES", "WEIGHTS", "Converted", "MissingWeightsError", "Weights", "WeightsError", "build", "convert",
           "download", "from_keras", "from_tf_frozen", "from_tf_slim", "from_tf_slim_variables", "from_timm", "imagenet_labels", "infer_config", "load",
           "pretrained", "read", "registry", "resolve", "save", "tensors_sha256", "verify_sha256"]

