"""Every test, in-process or in a subprocess, runs this checkout's src (not whatever is installed), with a
cache folder of its own.

The cache: the user's (``~/.cache/mobilenets`` or ``$MOBILENETS_CACHE``) is never read or written by the
suite. Each test process gets an empty cache folder in the temp folder, removed when the process exits, and
set as ``$MOBILENETS_CACHE`` before anything imports mobilenets, so subprocesses inherit it too. Another
mobilenets process on the machine (the user's, another test file run beside this one) cannot write in it,
and a test that checks the cache is untouched sees only its own process's writes. The one thing worth
keeping between runs, the real test data fetched from PyPI (17 MB, tests/real_data.py), lives in this
checkout's ignored ``.test-cache/test-data`` (``$MOBILENETS_TEST_DATA``), shared by the processes of a run.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = str(REPO / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)

# the prefix does not start with "mobilenets": test_cli_fuzz counts stray mobilenets* entries in the temp folder
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="pytest-cache-of-mobilenets-"))
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)
# A pytest run started by a test (tests/test_peer_timm.py runs timm's suite so) keeps the cache that test chose:
# the marker says the folder already belongs to the suite, not to the user.
if not os.environ.get("MOBILENETS_TEST_CACHE_SET"):
    os.environ["MOBILENETS_CACHE"] = str(SESSION_CACHE)
    os.environ["MOBILENETS_TEST_CACHE_SET"] = "1"
os.environ["MOBILENETS_TEST_DATA"] = str(REPO / ".test-cache" / "test-data")


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
