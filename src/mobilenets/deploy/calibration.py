"""Input batches: calibration data for int8 (a folder, the built-in digits, any iterable), their checks and sizes."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import ParameterTypeError
from .machine import DeployError

DEFAULT_RESOLUTION = 224


def as_input(x) -> torch.Tensor:
    """``x`` (a float tensor or numpy array) as a float32 tensor; anything else is refused with what would work."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ParameterTypeError(f"expected a torch.Tensor or numpy array of shape (N, 3, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ParameterTypeError(f"expected preprocessed float input, got {x.dtype}; use mobilenets.images.eval_transform")
    return x.float()


def check_input_shape(x: torch.Tensor, resolution: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise DeployError(f"expected input of shape (N, 3, {resolution}, {resolution}), got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (resolution, resolution):
        raise DeployError(f"this predictor was compiled for {resolution}x{resolution} input, got "
                          f"{x.shape[-2]}x{x.shape[-1]}; compile another with resolution={x.shape[-1]}")


def example_input(batch_size: int, resolution: int) -> torch.Tensor:
    """A seeded random batch: the shape a graph is traced or compiled for (its values do not matter)."""
    return torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))


def calibration_batches(calibration, resolution: int) -> list[torch.Tensor]:
    """Normalise ``calibration`` (an iterable of (N,3,H,W) tensors/arrays, or (x, y) pairs) to float32 tensors."""
    if calibration is None:
        raise DeployError("int8 needs calibration data: pass calibration= an iterable of (N, 3, H, W) batches "
                          "of preprocessed images (mobilenets.deploy.image_batches(folder, resolution) reads a folder)")
    out = []
    for batch in calibration:
        if isinstance(batch, (tuple, list)) and batch and not isinstance(batch, torch.Tensor):
            batch = batch[0]  # (images, labels) from a DataLoader
        x = as_input(batch)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        check_input_shape(x, resolution)
        out.append(x)
    if not out:
        raise DeployError("calibration data is empty; int8 needs at least one batch of images")
    return out


def image_batches(directory, resolution: int, *, normalization=None, batch_size: int = 8,
                  limit: int | None = 256) -> tuple[list[torch.Tensor], list]:
    """Read up to ``limit`` images below ``directory`` with the evaluation preprocessing.

    Returns (batches, paths).  Unreadable files are skipped with a warning.
    """
    from .. import images, pipeline

    normalization = normalization or images.INCEPTION
    files = images.list_images(directory)
    tensors, paths = [], []
    # the pipeline of predict and evaluate: the same decoding, in worker processes for a large folder
    for batch in pipeline.batches(files[: limit * 2] if limit else files, resolution=resolution,
                                  normalization=normalization, batch_size=batch_size):
        for i, why in batch.failed:
            images.warn_skipped(files[i], images.ImageError(why))
        if batch.x is not None:
            tensors += list(batch.x)
            paths += [files[i] for i in batch.indices]
        if limit and len(tensors) >= limit:
            tensors, paths = tensors[:limit], paths[:limit]
            break
    if not tensors:
        raise DeployError(f"no decodable images in {directory}")
    x = torch.stack(tensors)
    return list(x.split(batch_size)), paths


def builtin_batches(resolution: int, *, normalization=None, batch_size: int = 8,
                    limit: int = 64) -> tuple[list[torch.Tensor], list[int]]:
    """The built-in calibration set: ``limit`` held-out images of the built-in digits (data.Digits "val").

    Returns (batches, labels), classes spread evenly.  Real scans rather than
    noise, so activation ranges are those of natural inputs; for ImageNet
    models calibrate on your own images.
    """
    from .. import images

    x, labels = _builtin(int(resolution), normalization or images.INCEPTION, int(limit))
    return list(x.split(batch_size)), list(labels)


@functools.lru_cache(maxsize=8)
def _builtin(resolution: int, normalization, limit: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    from .. import data

    digits = data.Digits("val", resolution, data.EvalTransform(resolution, normalization))
    # round-robin over the ten digits so a short calibration set still sees every class
    by_class = [[i for i, t in enumerate(digits.targets) if t == c] for c in range(10)]
    order = [i for group in zip(*by_class) for i in group][:limit]
    return torch.stack([digits[i][0] for i in order]), tuple(digits.targets[i] for i in order)


def rebatch(batches: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The same calibration rows in batches of exactly ``batch_size`` (static-shape graphs take no other size).

    Rows are repeated when there are fewer than ``batch_size``; a short tail is dropped when there are more.
    """
    rows = torch.cat(batches)
    if len(rows) < batch_size:
        rows = rows.repeat(-(-batch_size // len(rows)), 1, 1, 1)[:batch_size]
    return list(rows[: len(rows) - len(rows) % batch_size].split(batch_size))
