"""The one resolver of model files, used by every command and by ``mobilenets.load``.

A source is "imagenet" (the released weights for alpha x resolution), a
training run folder (its best.pt, else last.pt), a training checkpoint
(.pt), one of our .safetensors files, or a plain ``torch.save(state_dict)``
file of our model.  :func:`resolve` turns it into a file; :func:`read` reads
that file once into (config, state_dict, meta), checking every claim in it
against the tensors actually present before anything is built.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import checkpoint
from ..metadata import Metadata
from ..model import MobileNetV1Config
from . import file
from .download import pretrained
from .keras import HDF5_SIGNATURE
from .layout import (DEFAULT_RESOLUTION, FIXED_OPTIONS, Converted, MissingWeightsError, WeightsError,
                     check_shapes, infer_config)

RUN_FILES = ("best.pt", "last.pt")


def resolve(source, *, alpha: float = 1.0, resolution: int | None = None, progress: bool = True) -> Path:
    """The model file ``source`` names: "imagenet", a run folder, or a file (checked to exist)."""
    if isinstance(source, str) and source == "imagenet":
        return pretrained(alpha, resolution or DEFAULT_RESOLUTION, progress=progress)
    if not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"weights must be None, 'imagenet' or a path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        for name in RUN_FILES:
            if (path / name).is_file():
                return path / name
        raise MissingWeightsError(f"{path} is a folder without {' or '.join(RUN_FILES)}; pass a training run "
                                  f"folder (train's out), a checkpoint, a .safetensors file or 'imagenet'")
    if not path.exists():
        raise MissingWeightsError(f"{path} does not exist; pass a training run folder, a checkpoint (.pt), "
                                  f"a .safetensors file or 'imagenet'")
    if not path.is_file():
        raise WeightsError(f"{path} is not a regular file")
    return path


def is_torch_file(head: bytes) -> bool:
    """torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle (protocol 2+)."""
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read(source, *, options: dict | None = None, **resolve_args) -> Converted:
    """The weights, config and metadata of ``source`` (see :func:`resolve`), read once, model not built.

    ``options`` (padding, bn_eps, ...) are used only for a plain state-dict
    file, which does not record the settings its model was built with.
    """
    path = resolve(source, **resolve_args)
    if file.is_safetensors(path):
        return file.read(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == HDF5_SIGNATURE:
        raise WeightsError(f"{path} is a Keras HDF5 file; convert it first: "
                           f"mobilenets convert --from keras {path} --out {path.with_suffix('.safetensors')}")
    if path.name.endswith(".index") or ".data-" in path.name:
        raise WeightsError(f"{path} is part of a TensorFlow checkpoint; convert it first: "
                           f"mobilenets convert --from tf-slim {path} --out model.safetensors")
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG")):  # JPEG, PNG: the likeliest wrong file to name
        raise WeightsError(f"{path} is an image, not weights: images are the inputs (mobilenets predict "
                           f"{path.name} --weights imagenet, or a converted .safetensors file)")
    if not is_torch_file(head):
        raise WeightsError(f"cannot read {path}: it is neither a .safetensors file, a mobilenets checkpoint nor a "
                           f"state dict; convert released weights first: mobilenets convert SRC --out "
                           f"FILE.safetensors (mobilenets.weights.convert in Python)")
    obj = checkpoint.load(path)  # weights-only: refuses pickles that would run code
    if checkpoint.is_mobilenets_checkpoint(obj):
        return _from_checkpoint(obj, path)
    sd = _state_dict(obj, path)
    if "features.13.pointwise.conv.weight" not in sd:
        raise WeightsError(f"{path} is a PyTorch file but neither a mobilenets checkpoint nor a state dict of "
                           f"mobilenets' MobileNetV1; if it is a timm state dict, convert it: "
                           f"mobilenets convert --from timm {path} --out model.safetensors")
    options = {k: v for k, v in (options or {}).items() if k in FIXED_OPTIONS and k != "alpha"}
    config = infer_config(sd, name=str(path), **options)
    return Converted(sd, config, Metadata(source=f"state_dict:{path.name}"))


def _state_dict(obj, path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded weights-only (no code runs)."""
    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(f"{path} does not exist")
    if not path.is_file():
        raise WeightsError(f"{path} is not a regular file; pass a weights file")
    if file.is_safetensors(path):
        return file.read_tensors(path)
    with open(path, "rb") as f:
        if not is_torch_file(f.read(8)):
            raise WeightsError(f"cannot read {path}: expected a PyTorch state dict (.pth, .bin) or .safetensors")
    return _state_dict(checkpoint.load(path), path)


def _from_checkpoint(obj: dict, path: Path) -> Converted:
    """A training checkpoint's (config, state_dict, meta), every claim checked before a model is built."""
    if not isinstance(obj.get("version", 0), int) or obj.get("version", 0) > checkpoint.VERSION:
        raise WeightsError(f"{path} has format version {obj.get('version')!r}; this mobilenets reads up to "
                           f"{checkpoint.VERSION}")
    try:
        config = MobileNetV1Config.from_dict(obj["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path}: unreadable model config ({(str(e).splitlines() or [''])[0]})") from None
    sd = _state_dict(obj.get("state_dict"), path)
    check_shapes(config, {k: tuple(v.shape) for k, v in sd.items()}, str(path))
    stored = obj.get("meta") or {}
    if not isinstance(stored, dict):
        raise WeightsError(f"{path}: meta must be a dict, got {type(stored).__name__}")
    meta = Metadata.from_dict({"source": f"checkpoint:{path.name}", **stored}, str(path),
                              num_classes=config.num_classes)
    return Converted(sd, config, meta)
