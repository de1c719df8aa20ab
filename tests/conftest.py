"""Every test, in-process or in a subprocess, runs this checkout's src (not whatever is installed)."""

import os
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)


import pytest  # noqa: E402 (after PYTHONPATH is set for subprocesses)


@pytest.fixture
def decoded_sizes(monkeypatch):
    """The (width, height) of every image images.load_rgb or images.load_pixels decodes from here on, in
    order: what reduced-scale JPEG decoding actually decoded."""
    from mobilenets import images

    sizes = []
    load_rgb, load_pixels = images.load_rgb, images.load_pixels

    def recording_rgb(path, *, min_side=None):
        image = load_rgb(path, min_side=min_side)
        sizes.append(image.size)
        return image

    def recording_pixels(path, *, min_side=None):
        pixels = load_pixels(path, min_side=min_side)
        sizes.append((pixels.shape[-1], pixels.shape[-2]))
        return pixels

    monkeypatch.setattr(images, "load_rgb", recording_rgb)
    monkeypatch.setattr(images, "load_pixels", recording_pixels)
    return sizes
