"""The checkpoint file format shared by training, ``mobilenets.load`` and export.

A checkpoint is a ``torch.save`` of a dict of tensors and plain data only, so
it loads with ``weights_only=True`` (no code from the file ever runs)::

    {"format": "mobilenets", "version": 1,
     "config": MobileNetV1Config.to_dict(),
     "state_dict": model.state_dict(),
     "meta": {"resolution": int, "normalization": {"mean": [...], "std": [...]},
              "labels": [str, ...] or None, "source": str},
     ...training state (optimizer, scheduler, ema, epoch, rng) for training checkpoints,
     "sha256": digest of everything above}

Writes are atomic (:mod:`mobilenets.atomic`): a temporary file in the same
folder, fsync, then rename, so a crash or a full disk leaves either the old
file or the new one, never half of one; the temporary files a killed writer
leaves behind are removed by :func:`remove_stale_temporaries`.  The ``sha256`` covers every tensor's bytes,
dtype and shape and every other value, so a corrupted file is refused on load
instead of training on from damaged weights.  This module is the only writer
and reader of the format: training builds its files with
:func:`model_checkpoint` and :func:`training_checkpoint`.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_write, remove_stale_temporaries, temporary_files  # noqa: F401 (run folders use them)
from .errors import MobilenetsError

FORMAT = "mobilenets"
VERSION = 1


class CheckpointError(MobilenetsError):
    """A file that is not a usable checkpoint; the message says why and what would work."""


def _feed(h, obj) -> None:
    """Hash ``obj`` canonically: tensors by dtype, shape and bytes; containers in order, dict keys sorted."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors and plain data only, not {type(obj).__name__}")


def digest(obj: dict) -> str:
    """The sha256 of a checkpoint dict's content, its own ``sha256`` entry excluded."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "sha256"})
    return h.hexdigest()


def model_checkpoint(config: dict, state_dict: dict, meta: dict, **extra) -> dict:
    """A checkpoint of weights: what ``mobilenets.load`` and ``evaluate`` read (``best.pt``)."""
    return {"format": FORMAT, "version": VERSION, "config": config,
            "state_dict": {k: v.detach().contiguous() for k, v in state_dict.items()}, "meta": meta, **extra}


def training_checkpoint(config: dict, state_dict: dict, meta: dict, *, train_config: dict, optimizer: dict,
                        scheduler: dict, ema: dict | None, epoch: int, step: int, partial: list, rng: list,
                        history: list, best_top1: float) -> dict:
    """The full state of a run (``last.pt``): weights plus all a resume needs to continue exactly."""
    return model_checkpoint(config, state_dict, meta, optimizer=optimizer, scheduler=scheduler, ema=ema,
                            epoch=epoch, step=step, partial=list(partial), rng=list(rng), history=history,
                            best_top1=best_top1, train_config=train_config)


def save(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` atomically with its ``sha256``."""
    stamped = {**obj, "sha256": digest(obj)}
    return atomic_write(path, lambda f: torch.save(stamped, f))


# torch.save stores its archive's members uncompressed; a reader that inflates deflated ones gives a 2 MB file
# 2 GiB of tensors. The members may hold at most this much more than the file itself (zip headers, padding).
ARCHIVE_SLACK_BYTES = 1 << 20


def check_declared_sizes(path: Path) -> None:
    """Refuse, from its zip directory alone, an archive whose members claim more bytes than the file holds.

    So memory is bounded by the file's size, not by what it claims: a deflated member, or sizes that lie.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy pickle, or junk): torch.load reads it, or says what it is
    declared = sum(m.file_size for m in members)
    size = path.stat().st_size
    if declared > size + ARCHIVE_SLACK_BYTES:
        biggest = max(members, key=lambda m: m.file_size)
        raise CheckpointError(f"refusing to load {path}: its members unpack to {declared:,} bytes from a "
                              f"{size:,}-byte file ({biggest.filename} alone {biggest.file_size:,}); torch.save "
                              f"stores tensors uncompressed, so this file is not one it wrote")


def load(path: str | Path, *, training: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True``; refuse pickles that would run code and damaged files.

    A file with a ``sha256`` must match it.  ``training=True`` asks for a
    training checkpoint (``last.pt``), which must carry both its training
    state and its ``sha256``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_declared_sizes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" not in text and "global" not in text:
            # the weights-only unpickler met bytes that are no pickle at all
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: the file is corrupt or of "
                                  f"another format") from None
        culprit = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line), "")
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain data, and loading "
            f"it would run code from the file ({culprit}). Only weights-only files are loaded: re-save the "
            f"state_dict with torch.save(model.state_dict(), ...) or use safetensors"
        ) from None
    # torch.load reports junk in many ways (a text file raises KeyError): all mean "not a checkpoint"
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, UnicodeDecodeError) as e:
        detail = "neither a zip archive nor a pickle" if isinstance(e, KeyError) else (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {detail}") from None
    if isinstance(obj, dict) and "sha256" in obj:
        try:
            actual = digest(obj)
        except TypeError:
            actual = None
        if actual != obj["sha256"]:
            raise CheckpointError(f"{path} is damaged: its content no longer matches the sha256 stored in it; "
                                  f"restore it from a copy, or use the run's other checkpoint")
    if training:
        if not isinstance(obj, dict) or "train_config" not in obj:
            raise CheckpointError(f"{path} has no training state (is it a best.pt or a converted model?); resume "
                                  f"from the run's last.pt, or fine-tune from its weights")
        if "sha256" not in obj:
            raise CheckpointError(f"{path} carries no sha256, so its integrity cannot be checked; it was damaged "
                                  f"or written by another program")
    return obj


def is_mobilenets_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def model_from(obj: dict, *, path: str | Path = "<checkpoint>"):
    """Rebuild the model a checkpoint dict describes and load its weights; returns (model, meta).

    Mismatches name the tensor and both shapes rather than failing deep inside PyTorch.
    """
    from .model import MobileNetV1, MobileNetV1Config

    if not is_mobilenets_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a mobilenets checkpoint (no 'format': 'mobilenets' key); "
            f"convert foreign weights with 'mobilenets convert' first")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {obj['version']}; this mobilenets reads up to {VERSION}")
    model = MobileNetV1(MobileNetV1Config.from_dict(obj["config"]))
    load_state_dict(model, obj["state_dict"], path=path)
    return model, dict(obj.get("meta") or {})


def check_values(state_dict: dict, name: str | Path = "<weights>") -> None:
    """Refuse weights whose every answer would be NaN or nonsense, naming the tensor: a NaN or infinite value
    anywhere, or a negative BatchNorm running variance (its square root is NaN)."""
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.numel():
            continue
        # an integer tensor is always finite, but a negative integer variance is cast to a float one on loading
        bad = t.numel() - int(torch.isfinite(t).sum()) if t.is_floating_point() else 0
        if bad:
            raise CheckpointError(f"{name}: tensor {key} holds {bad} non-finite values (NaN or infinity) of "
                                  f"{t.numel()}; these weights are damaged, or come from a diverged run")
        if key.endswith("running_var") and bool((t < 0).any()):
            raise CheckpointError(f"{name}: tensor {key} holds a negative variance ({float(t.min()):.3g}); "
                                  f"a BatchNorm variance is >= 0, so these weights are damaged")


def load_state_dict(model, state_dict: dict, *, path: str | Path = "<checkpoint>") -> None:
    """Strict load with a message that names every missing, unexpected or mis-shaped tensor, or a tensor whose
    values no trained model holds (:func:`check_values`)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file has {tuple(state_dict[k].shape)}, model expects {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        if missing:
            parts.append(f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"weights in {path} do not fit the model: " + "; ".join(parts))
    check_values(state_dict, path)
    model.load_state_dict(state_dict)
