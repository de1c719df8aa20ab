"""Generated image folders for the data, training and evaluation tests.

The classes differ in the orientation of a striped pattern with random
phase, colour and noise: easy enough to learn in two epochs at 32 px, but not
solvable from the mean colour of an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("horizontal", "vertical", "diagonal")


def pattern(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(6, 10)
    phase = rng.uniform(0, 2 * np.pi)
    coordinate = {"horizontal": y, "vertical": x, "diagonal": (x + y) / np.sqrt(2)}[kind]
    wave = np.sin(2 * np.pi * coordinate / period + phase) > 0
    colour = rng.uniform(80, 255, size=3)
    base = rng.uniform(0, 60, size=3)
    pixels = np.where(wave[..., None], colour, base) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_split(root: Path, per_class: int, seed: int, classes=CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern(kind, rng).save(folder / f"{i:03d}.png")
    return root


def make_dataset(root: Path, train_per_class: int = 24, val_per_class: int = 8, classes=CLASSES) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png."""
    make_split(root / "train", train_per_class, 0, classes)
    make_split(root / "val", val_per_class, 1, classes)
    return root
