"""Accuracy of a checkpoint on a folder of labelled images (or on the built-in held-out digits).

``evaluate_checkpoint`` reads a model file through ``weights.resolve`` (a run
folder means its best.pt; checkpoints and converted .safetensors files both
work) and preprocesses every image
with the resolution and normalisation stored beside the weights, as
``images.eval_transform`` does: resize to resolution / 0.875, centre crop.
Every pixel is decoded, as the published accuracies were measured: unlike
``predict``, evaluation never decodes a large JPEG at a reduced DCT scale,
so its top-1 is comparable with the papers' and the peers' numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data, weights
from .architecture import RESOLUTION_RANGE, resolution_ok
from .checks import check_integer
from .data import DataError
from .errors import ParameterError
from .labels import imagenet_labels, imagenet_wnids


@torch.no_grad()
def evaluate(model, loader, *, device="cpu", amp: bool = False, channels_last: bool = False, dist=None,
             on_skip=None) -> dict:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy and the image count over ``loader``.

    With fewer than five classes, top-5 counts the top ``num_classes``.
    Under DDP (``dist`` enabled) every rank evaluates its shard and the
    counts are summed, so each image counts once.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    top1 = torch.zeros((), dtype=torch.float64)
    top5 = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        for x, y, skipped in loader:
            if on_skip is not None:
                on_skip(skipped)
            if x is None:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == y[:, None]
            top1 += hits[:, 0].sum().double().cpu()
            top5 += hits.any(dim=1).sum().double().cpu()
            count += len(y)
    finally:
        model.train(was_training)
    values = [loss_sum.item(), top1.item(), top5.item(), float(count)]
    if dist is not None and dist.enabled:
        values = dist.all_sum(values, device)
    loss_sum, top1, top5, count = values
    n = max(count, 1)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss_sum / n, "images": int(count)}


def _device(name: str | None) -> torch.device:
    """The device to evaluate on: ``name`` (cpu, cuda, cuda:N) checked against this machine, else cuda when present."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's word for a malformed device string
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ParameterError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ParameterError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use device 'cpu'" + (" or cuda:0" if torch.cuda.device_count() else ""))
    return device


class _Labelled(data.ImageFolder):
    """An ImageFolder whose class indices are the checkpoint's labels (a folder may hold only some classes)."""

    def __init__(self, root: Path, transform, labels: list[str]):
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        index = {name: i for i, name in enumerate(labels)}
        if len(labels) == 1000 and tuple(labels) == imagenet_labels():
            # ImageNet's own layout names class folders by WordNet ID (val/n01440764/...)
            index.update({wnid: i for i, wnid in enumerate(imagenet_wnids())})
        unknown = [f for f in folders if f not in index]
        if unknown:
            hint = ""
            if {"train", "val"} <= set(folders):
                hint = f"; {root} looks like a data set root: pass {root / 'val'}"
            raise DataError(f"class folders {unknown[:5]} in {root} are not among the model's {len(labels)} labels "
                             f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}){hint}")
        super().__init__(root, transform, classes=folders)
        self.targets = [index[folders[t]] for t in self.targets]
        self.classes = list(labels)


def evaluate_checkpoint(checkpoint_path: str | Path, data_dir: str | Path | None = None, *,
                        resolution: int | None = None, batch_size: int = 64, num_workers: int = 2,
                        device: str | None = None) -> dict:
    """Evaluate a checkpoint on ``data_dir/<class>/*`` (or on the built-in held-out digits when None).

    Returns ``{"top1", "top5", "loss", "images", "classes", "checkpoint", "resolution", "data"}``; top-1/top-5
    are percentages (top-5 is 100% with five classes or fewer, so the command prints it only with more).
    """
    # the arguments are checked before the model is read, so a typo costs nothing
    if resolution is not None and not resolution_ok(resolution):
        raise ParameterError(f"resolution must be {RESOLUTION_RANGE}, got {resolution!r}")
    check_integer(batch_size, "batch_size", 1)
    check_integer(num_workers, "num_workers", 0, data.MAX_WORKERS)
    device = _device(device)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir} is not a directory; expected {data_dir}/<class>/*.jpg")
    path = weights.resolve(checkpoint_path)
    model = weights.load(path)
    meta = model.meta
    resolution = resolution or meta.resolution
    normalization = meta.normalization
    labels = list(meta.labels) if meta.labels is not None else None
    transform = data.EvalTransform(resolution, normalization)
    if data_dir is None:
        dataset = data.Digits("val", resolution, transform)
        if labels is not None and labels != dataset.classes:
            raise DataError(f"{path} was not trained on the built-in digits (its labels are {labels[:10]}); "
                            f"pass data_dir, a folder of its classes")
    else:
        root = Path(data_dir)
        if labels is None:
            warnings.warn(f"{path} stores no labels; assuming the sorted class folders of {root} are its classes")
            dataset = data.ImageFolder(root, transform)
        else:
            dataset = _Labelled(root, transform, labels)
        if len(dataset.classes) > model.config.num_classes:
            raise DataError(f"{root} has {len(dataset.classes)} classes, the model only {model.config.num_classes}")
    model.to(device)
    skipped: list = []

    def on_skip(items):
        for s in items:
            warnings.warn(f"skipping an undecodable file: {s.error}", stacklevel=2)
            skipped.append(s.path)

    loader = data.loader(dataset, data.ShardSampler(len(dataset)), batch_size, num_workers)
    result = evaluate(model, loader, device=device, on_skip=on_skip)
    if result["images"] == 0:
        raise DataError(f"no decodable images in {data_dir}")
    return {**result, "classes": model.config.num_classes, "skipped": len(skipped), "checkpoint": str(path),
            "resolution": resolution,
            "data": str(data_dir) if data_dir is not None else f"{data.BUILTIN} (held-out split)"}
