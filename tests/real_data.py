"""Real weights and real photos for tests and benchmarks, fetched from the package registry, never invented.

**Weights.**  :func:`real_graph_path` is Google's MobileNet v1 1.0-224
ImageNet model as a frozen TensorFlow graph: the sdist of ``nudity==0.2.3``
on PyPI ships ``nudity/files/retrained_graph.pb``, a "retrained" graph whose
body and 1001-way ``MobilenetV1/Logits`` are the released weights (input
``input``, 1x224x224x3, Inception preprocessing x / 127.5 - 1; the
``final_training_ops`` head on top is not ours).  It is fetched once with
``pip download --no-deps --no-binary :all: nudity==0.2.3`` into
``$MOBILENETS_TEST_DATA`` (the suite's: ``.test-cache/test-data`` in the checkout, see tests/conftest.py;
outside the suite ``mobilenets.cache.cache_dir() / "test-data"``), and its sha256 is checked
against :data:`GRAPH_SHA256` on every use.  When the registry cannot be
reached the caller is skipped with the reason, except under CI (``$CI`` set),
where the registry is reachable and a failure fails (outside pytest, as a
benchmark, these raise pytest's Skipped / Failed).  :func:`real_model`
converts it with our reader (1000 classes, background dropped).

**Photos.**  :func:`photos` are the real photographs that installed packages
ship (scikit-image's ``skimage/data``, in the test extra, and matplotlib's
``mpl-data/sample_data``), as RGB uint8 (grayscale ones repeated to 3
channels).  :func:`calibration_crops` and :func:`heldout_crops` cut them into
seeded random square crops (side 35-100% of the shorter edge, any position,
half of them mirrored), resized to ``size`` x ``size``: a (n, size, size, 3)
uint8 array, RGB, NHWC.  Crop ``k`` of a set depends only on ``k``, so a
larger ``n`` extends a smaller one.  The two sets never share a crop: they
come from different seeds, and a held-out crop whose box equals any of the
first :data:`MAX_CALIBRATION` calibration boxes is skipped.  They are
different crops of the same photos, as calibration and evaluation images of
one domain are.  :func:`inception_input` turns crops into the float input
the weights expect.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilenets.cache import cache_dir
from mobilenets.checkpoint import atomic_write

REQUIREMENT = "nudity==0.2.3"
SDIST = "nudity-0.2.3.tar.gz"
GRAPH_MEMBER = "nudity-0.2.3/nudity/files/retrained_graph.pb"
GRAPH_SHA256 = "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"
GRAPH_BYTES = 17124178
INPUT_NODE = "input"  # the graph's placeholder, 1x224x224x3
LOGITS_NODE = "MobilenetV1/Logits/SpatialSqueeze"  # the 1001 ImageNet logits (class 0: background)

# photographs only: the packages' synthetic images, text, charts and tiny icons are left out
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png", "coins.png", "moon.png",
                  "brick.png", "grass.png", "gravel.png")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
CALIBRATION_SEED, HELDOUT_SEED = 20_170_417, 20_170_418  # arXiv:1704.04861, April 2017
MAX_CALIBRATION = 4096  # held-out crops avoid the boxes of this many calibration crops
MIN_SIDE, MAX_SIDE = 0.35, 1.0
# pip's words when it cannot reach the index (as opposed to the index refusing the request)
_OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
            "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
            "Max retries exceeded", "Connection refused")


# ---------------------------------------------------------------- the real graph


def data_dir() -> Path:
    """``$MOBILENETS_TEST_DATA`` (the suite sets it: tests/conftest.py), else the cache's ``test-data``."""
    return Path(os.environ.get("MOBILENETS_TEST_DATA") or cache_dir() / "test-data")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(folder: Path, requirement: str = REQUIREMENT, sdist: str = SDIST,
                 what: str = "the real MobileNet graph") -> Path:
    """The source release ``sdist`` of ``requirement`` from the package registry, into ``folder``.

    Skipped when the registry is unreachable (failed under CI, where it is reachable).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement,
           "-d", str(folder), "--disable-pip-version-check"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    path = folder / sdist
    if done.returncode == 0 and path.is_file():
        return path
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    if not os.environ.get("CI") and any(word in done.stderr for word in _OFFLINE):
        pytest.skip(f"the package registry is unreachable, so {what} ({requirement}) cannot be fetched: {tail}")
    pytest.fail(f"'{' '.join(cmd)}' failed (exit {done.returncode}): {tail}")


@functools.cache
def real_graph_path() -> Path:
    """The real frozen graph (17 MB), fetched and extracted once, its sha256 checked."""
    path = data_dir() / "nudity-0.2.3" / "retrained_graph.pb"
    if not path.is_file() or _sha256(path) != GRAPH_SHA256:
        with tempfile.TemporaryDirectory(prefix="pip-download-") as tmp:
            sdist = pip_download(Path(tmp))
            with tarfile.open(sdist) as tar:
                member = tar.getmember(GRAPH_MEMBER)
                if not member.isfile() or member.size != GRAPH_BYTES:
                    pytest.fail(f"{sdist}: {GRAPH_MEMBER} is not the {GRAPH_BYTES}-byte file it was")
                data = tar.extractfile(member).read(GRAPH_BYTES + 1)  # read in memory: no path from the archive
        digest = hashlib.sha256(data).hexdigest()
        if digest != GRAPH_SHA256:
            pytest.fail(f"{REQUIREMENT}'s {GRAPH_MEMBER} has sha256 {digest}, not the pinned {GRAPH_SHA256}")
        atomic_write(path, lambda f: f.write(data))
    return path


@functools.cache
def real_converted():
    """The real weights converted by our frozen-graph reader (a ``weights.Converted``; 1000 classes)."""
    from mobilenets.weights.tf_frozen import from_tf_frozen

    return from_tf_frozen(real_graph_path())


def real_model():
    """A fresh MobileNetV1 (eval mode) with the real ImageNet weights; input :func:`inception_input` NCHW."""
    return real_converted().model()


# ---------------------------------------------------------------- real photos


def _photo_paths() -> list[Path]:
    import matplotlib
    import skimage

    skimage_data = Path(skimage.__file__).parent / "data"
    mpl_data = Path(matplotlib.get_data_path()) / "sample_data"
    paths = [skimage_data / n for n in SKIMAGE_PHOTOS] + [mpl_data / n for n in MATPLOTLIB_PHOTOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"photos the packages should ship are missing: {missing}")
    return paths


@functools.cache
def photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(file name, RGB uint8 HxWx3) for every packaged photo, in a fixed order."""
    out = []
    for p in _photo_paths():
        with Image.open(p) as im:
            out.append((p.name, np.asarray(im.convert("RGB"))))
    return tuple(out)


def _box(seed: int, k: int, sizes: list[tuple[int, int]]) -> tuple[int, int, int, int, bool]:
    """Crop k of a set: (photo index, left, top, side, flip); it depends on the seed and k only."""
    rng = np.random.default_rng([seed, k])
    i = int(rng.integers(len(sizes)))
    w, h = sizes[i]
    side = int(round(min(w, h) * rng.uniform(MIN_SIDE, MAX_SIDE)))
    left = int(rng.integers(0, w - side + 1))
    top = int(rng.integers(0, h - side + 1))
    return i, left, top, side, bool(rng.integers(2))


def _sizes() -> list[tuple[int, int]]:
    return [(a.shape[1], a.shape[0]) for _, a in photos()]


@functools.cache
def _calibration_boxes() -> frozenset:
    sizes = _sizes()
    return frozenset(_box(CALIBRATION_SEED, k, sizes) for k in range(MAX_CALIBRATION))


def calibration_boxes(n: int) -> list[tuple]:
    sizes = _sizes()
    return [_box(CALIBRATION_SEED, k, sizes) for k in range(n)]


def heldout_boxes(n: int) -> list[tuple]:
    sizes, taken, out, k = _sizes(), _calibration_boxes(), [], 0
    while len(out) < n:
        box = _box(HELDOUT_SEED, k, sizes)
        if box not in taken:
            out.append(box)
        k += 1
    return out


def _cut(boxes: list[tuple], size: int) -> np.ndarray:
    images = [Image.fromarray(a) for _, a in photos()]
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for j, (i, left, top, side, flip) in enumerate(boxes):
        crop = images[i].resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
        out[j] = np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop)
    return out


def calibration_crops(n: int, size: int = 224) -> np.ndarray:
    """``n`` calibration crops, (n, size, size, 3) uint8 RGB; never one of :func:`heldout_crops`."""
    if not 0 < n <= MAX_CALIBRATION:
        raise ValueError(f"n must be in 1..{MAX_CALIBRATION}, got {n}")
    return _cut(calibration_boxes(n), size)


def heldout_crops(n: int, size: int = 224) -> np.ndarray:
    """``n`` held-out crops, (n, size, size, 3) uint8 RGB; never one of :func:`calibration_crops`."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return _cut(heldout_boxes(n), size)


def inception_input(crops: np.ndarray, layout: str = "nchw"):
    """The weights' preprocessing, x / 127.5 - 1, as float32: a torch NCHW tensor, or numpy NHWC (TensorFlow)."""
    x = crops.astype(np.float32) / 127.5 - 1.0
    if layout == "nhwc":
        return x
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
