"""Every test, in-process or in a subprocess, runs this checkout's src (not whatever is installed)."""

import os
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)


import pytest  # noqa: E402 (after PYTHONPATH is set for subprocesses)


@pytest.fixture
def decoded_sizes(monkeypatch):
    """The (width, height) of every image images.load_rgb decodes from here on, in order: what reduced-scale
    JPEG decoding actually decoded."""
    from mobilenets import images

    sizes = []
    load_rgb = images.load_rgb

    def recording(path, *, min_side=None):
        image = load_rgb(path, min_side=min_side)
        sizes.append(image.size)
        return image

    monkeypatch.setattr(images, "load_rgb", recording)
    return sizes
