"""Our weights file: a ``.safetensors`` whose metadata says how to rebuild and feed the model.

The metadata (str -> str, values JSON) carries the config, alpha, the
resolution the weights were trained at, the normalisation, the labels, the
source and a sha256 of the tensors.  :func:`read` checks every claim of the
header against the tensors actually present (shapes, before any tensor is
read) and the checksum after, and returns one (config, state_dict, meta);
the model is built once, by the caller.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import checkpoint
from ..model import MobileNetV1Config
from ..metadata import Metadata
from .layout import Converted, WeightsError, check_shapes

FORMAT = "mobilenets"
VERSION = 1
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A checksum of names, dtypes, shapes and bytes, independent of the file's layout."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(weights, path) -> Path:
    """Write a :class:`Converted` or any MobileNetV1 model as .safetensors with its metadata, atomically."""
    from safetensors.torch import save as st_save

    converted = weights if isinstance(weights, Converted) else Converted.from_model(weights)
    sd = {k: v.detach().contiguous().cpu() for k, v in converted.state_dict.items()}
    checkpoint.check_values(sd, path)  # what loading refuses is never written
    meta = converted.meta.check_labels(converted.config.num_classes).to_dict()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(converted.config.to_dict()),
        "alpha": json.dumps(converted.config.alpha),
        **{k: v if k == "source" else json.dumps(v) for k, v in meta.items()},
        "sha256": tensors_sha256(sd),
    }
    data = st_save(sd, metadata=metadata)
    return checkpoint.atomic_write(path, lambda f: f.write(data))


def is_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length that fits the file, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]]:
    """(metadata, shapes, dtypes) from a safetensors header; no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes, dtypes = {}, {}
            for k in f.keys():
                s = f.get_slice(k)
                shapes[k], dtypes[k] = tuple(s.get_shape()), s.get_dtype()
    except Exception as e:  # safetensors raises its own error types (SafetensorError) for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {_first_line(e)}") from None
    return metadata, shapes, dtypes


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise WeightsError(f"cannot read {path} as safetensors: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def read(path) -> Converted:
    """Read a file written by :func:`save`: header claims checked against the tensors, then the checksum."""
    path = Path(path)
    metadata, shapes, dtypes = read_header(path)
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path} is a safetensors file without mobilenets metadata; convert the original "
                           f"weights with mobilenets.weights.convert (the 'convert' command) first")
    try:
        version = int(metadata.get("version", "0"))
        config = MobileNetV1Config.from_dict(json.loads(metadata["config"]))
        stored = {k: json.loads(metadata[k]) for k in ("resolution", "normalization", "labels", "int8")
                  if metadata.get(k)}
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: unreadable mobilenets metadata ({_first_line(e)})") from None
    if version > VERSION:
        raise WeightsError(f"{path} has format version {version}; this mobilenets reads up to {VERSION}")
    check_shapes(config, shapes, str(path))  # before any tensor is read: the header's claims must agree
    odd = [k for k, d in dtypes.items() if d not in FLOAT_DTYPES and not k.endswith("num_batches_tracked")]
    if odd:
        raise WeightsError(f"{path}: tensor {odd[0]} has dtype {dtypes[odd[0]]}, expected a float type")
    if "resolution" not in stored or "normalization" not in stored:
        raise WeightsError(f"{path}: unreadable mobilenets metadata (no resolution or normalization)")
    meta = Metadata.from_dict({**stored, "source": metadata.get("source", "")}, str(path),
                              num_classes=config.num_classes)
    sd = read_tensors(path)
    digest = tensors_sha256(sd)
    recorded = metadata.get("sha256")
    # a file written by save() always has one; a file without it has lost its integrity check
    if not recorded:
        raise WeightsError(f"{path} has no sha256 of its tensors; convert or save it again")
    if digest != recorded:
        raise WeightsError(f"{path} is corrupted: its tensors' sha256 {digest[:12]}... does not match the "
                           f"recorded {recorded[:12]}...; convert or download it again")
    return Converted(sd, config, meta)

