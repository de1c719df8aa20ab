"""Classifying image files with a set of weights, preprocessed as those weights expect.

The resolution and normalization come from the weights' metadata
(``model.meta``), so an image is resized by resolution / 0.875 and
centre-cropped exactly as in evaluation (:func:`images.eval_transform`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import ImageError, Normalization, eval_transform, list_images, load_rgb, warn_skipped
from .model import MobileNetV1


@dataclass(frozen=True)
class Prediction:
    """The ``topk`` most probable classes for one image, most probable first."""

    image: str
    top: list[dict]  # {"class_index": int, "label": str, "probability": float}

    def to_dict(self) -> dict:
        return {"image": self.image, "top": self.top}


def expand(inputs: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """Files as given and the images found in folders, in order; the flag marks files found in a folder."""
    found: list[tuple[Path, bool]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend((f, True) for f in list_images(p))
        elif p.is_file():
            found.append((p, False))
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    if not found:
        raise ValueError("no images to classify; pass image files or folders")
    return found


def predict(model: MobileNetV1, inputs: Iterable[str | Path], *, topk: int = 5, batch_size: int = 32,
            resolution: int | None = None, normalization: Normalization | None = None) -> Iterator[Prediction]:
    """Classify image files and the images in folders, ``batch_size`` at a time.

    ``resolution`` and ``normalization`` default to ``model.meta`` (set by
    :func:`mobilenets.load` and :func:`mobilenets.mobilenet_v1`).  A file
    named directly that cannot be decoded is an error; one found in a folder
    is skipped with a warning.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if model.config.num_classes == 0:
        raise ValueError("these weights have no classifier (a feature extractor, e.g. a _no_top file); "
                         "classifying needs weights with their classification head")
    meta = getattr(model, "meta", None) or {}
    resolution = resolution or int(meta.get("resolution") or 224)
    if normalization is None:
        normalization = Normalization.from_dict(meta["normalization"]) if meta.get("normalization") else Normalization()
    labels = meta.get("labels") or None
    if labels is not None and len(labels) != model.config.num_classes:
        labels = None
    topk = min(topk, model.config.num_classes)
    device = next(model.parameters()).device
    model.eval()

    batch: list[tuple[str, torch.Tensor]] = []
    for path, in_folder in expand(inputs):
        try:
            x = eval_transform(load_rgb(path), resolution, normalization)
        except ImageError as e:
            if not in_folder:
                raise
            warn_skipped(path, e)
            continue
        batch.append((str(path), x))
        if len(batch) == batch_size:
            yield from _classify(model, batch, topk, labels, device)
            batch = []
    if batch:
        yield from _classify(model, batch, topk, labels, device)


def _classify(model, batch, topk, labels, device) -> Iterator[Prediction]:
    with torch.inference_mode():
        logits = model(torch.stack([x for _, x in batch]).to(device))
        probabilities = torch.softmax(logits.float(), dim=1)
        values, indices = probabilities.topk(topk, dim=1)
    for (name, _), vs, ixs in zip(batch, values.tolist(), indices.tolist()):
        top = [{"class_index": i, "label": labels[i] if labels else str(i), "probability": v} for v, i in zip(vs, ixs)]
        yield Prediction(name, top)


def format_table(predictions: Iterable[Prediction]) -> Iterator[str]:
    """A readable block per image: rank, class index, probability, label."""
    for p in predictions:
        yield p.image
        for rank, t in enumerate(p.top, start=1):
            yield f"  {rank:>2}  {t['class_index']:>4}  {100 * t['probability']:6.2f}%  {t['label']}"
