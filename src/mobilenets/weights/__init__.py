"""Weights: the released ImageNet weights, converters from Keras / TF-slim / timm, our file format, one resolver.

- :mod:`.registry`: the typed registry of released weights (file, preprocessing, labels, published accuracy).
- :mod:`.keras`, :mod:`.tf_slim` (with :mod:`.tf_checkpoint`), :mod:`.tf_frozen`, :mod:`.timm`: per-source converters.
- :mod:`.file`: our ``.safetensors`` format; :mod:`.download`: fetch, cache, sha256 records.
- :mod:`.resolve`: run folder / checkpoint / safetensors / state dict / "imagenet" -> (config, state_dict, meta).

No reader ever unpickles code, and every size a file claims is checked
against the architecture before memory is allocated for it.
"""

from __future__ import annotations

from pathlib import Path

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

def _from_tflite(path, **options) -> Converted:
    from .tflite import from_tflite  # the LiteRT reader and its flatbuffer schema load only when asked for

    return from_tflite(path, **options)


# source -> (converter, whether it reads keep_background): what convert() reads, and the CLI's --from
CONVERTERS = {
    "keras": (from_keras, False),
    "tf-slim": (from_tf_slim, True),
    "tf-frozen": (from_tf_frozen, True),
    "timm": (from_timm, False),
    "tflite": (_from_tflite, True),
}
SOURCES = tuple(CONVERTERS)
# the suffixes that say on their own where a file comes from; any other file needs its source named
SUFFIX_SOURCES = {".pb": "tf-frozen", ".tflite": "tflite"}


def convert(source: str, path, *, keep_background: bool = False, resolution: int | None = None) -> Converted:
    """Convert released weights (``source`` one of :data:`SOURCES`) to our layout."""
    if source not in CONVERTERS:
        raise WeightsError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    converter, reads_background = CONVERTERS[source]
    options = {"keep_background": keep_background} if reads_background else {}
    return converter(path, resolution=resolution, **options)


def convert_file(path, out, *, source: str | None = None, keep_background: bool = False,
                 resolution: int | None = None) -> dict:
    """Convert the weights in ``path`` and write them to ``out`` (.safetensors); returns what was written.

    ``source`` defaults to what the suffix says (:data:`SUFFIX_SOURCES`).  The summary holds ``out``,
    ``source``, ``alpha``, ``resolution``, ``num_classes``, ``padding``, ``bn_eps`` and ``normalization``.
    """
    source = source or SUFFIX_SOURCES.get(Path(str(path).lower()).suffix)
    if source is None:
        raise WeightsError(f"say where {path} comes from with --from {'|'.join(SOURCES)} (source= in Python; only "
                           f"{' and '.join(SUFFIX_SOURCES)} files are recognised on their own)")
    converted = convert(source, path, keep_background=keep_background, resolution=resolution)
    written = save(converted, out)
    c, meta = converted.config, converted.meta.to_dict()
    return {"out": str(written), "source": meta["source"], "alpha": c.alpha, "resolution": meta["resolution"],
            "num_classes": c.num_classes, "padding": c.padding, "bn_eps": c.bn_eps,
            "normalization": meta["normalization"]}


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


__all__ = ["CONVERTERS", "SOURCES", "SUFFIX_SOURCES", "WEIGHTS", "Converted", "MissingWeightsError", "Weights",
           "WeightsError", "build", "convert", "convert_file", "download", "from_keras", "from_tf_frozen",
           "from_tf_slim", "from_tf_slim_variables", "from_timm", "imagenet_labels", "infer_config", "load",
           "pretrained", "read", "registry", "resolve", "save", "tensors_sha256", "verify_sha256"]
