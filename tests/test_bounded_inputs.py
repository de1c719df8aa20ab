"""Memory is bounded by what a file is, not by what it claims or hides.

Each hostile file is made here, small on disk: a JPEG followed by a 2 GiB
sparse hole, PNGs that decode to 169 megapixels, a .pt whose deflated member
unpacks to 256 MiB.  Each runs through the command line in a subprocess whose
peak resident memory (ru_maxrss) is compared with the same command on a small
valid image: a refusal from the header may cost little more than that, while
acting on the file's word costs at least the bytes it claims (169 MB for one
8-bit grayscale bomb, before its conversion to RGB; 256 MiB for the tensor).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mobilenets
from mobilenets import images

# what a refusal may cost beyond a normal run; far below the smallest claim acted on (169 MB)
MARGIN_MB = 64

MEASURED = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr)
"""


def _measured(*argv: str) -> tuple[int, str, str, int]:
    """(status, stdout, stderr, peak MB) of ``mobilenets argv`` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEASURED, sys.executable, "-m", "mobilenets", *argv],
                          capture_output=True, text=True, timeout=300)
    *err, last = done.stderr.splitlines()
    status, peak = map(int, last.split())
    return status, done.stdout, "\n".join(err), peak


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """An 8-bit grayscale PNG of zeros: each row is a filter byte and ``width`` zeros, deflated to almost nothing."""
    deflate = zlib.compressobj(9)
    row = bytes(width + 1)
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    model = mobilenets.mobilenet_v1(alpha=0.25, num_classes=10)
    return mobilenets.save(model, tmp_path_factory.mktemp("weights") / "m.safetensors")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def baseline_mb(weights_file, photo):
    status, out, err, peak = _measured("predict", str(photo), "--weights", str(weights_file), "--json")
    assert status == 0, err
    return peak


def test_a_jpeg_hiding_a_2_gib_hole_is_refused_unread(tmp_path, weights_file, photo, baseline_mb):
    hole = tmp_path / "hole.jpg"
    hole.write_bytes(photo.read_bytes())
    with open(hole, "r+b") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB that cost no disk, and 2 GiB of RAM to whoever reads them whole
    status, out, err, peak = _measured("predict", str(hole), "--weights", str(weights_file))
    assert status == 2 and err.startswith(f"mobilenets: error: {hole} is 2,147,483,648 bytes, far more than a "
                                          f"64x48 image takes"), err
    assert err.count("\n") == 0 and out == ""
    assert peak < baseline_mb + MARGIN_MB, (peak, baseline_mb)


def test_decompression_bombs_under_pils_limit_are_refused_from_the_header(tmp_path, weights_file, photo,
                                                                         baseline_mb):
    # 169 megapixels: over PIL's warning threshold (89M), under its error (179M), so PIL alone only warns
    bomb = _bomb_png(tmp_path / "bomb.png", 13000, 13000)
    assert bomb.stat().st_size < 1 << 20
    status, out, err, peak = _measured("predict", str(bomb), "--weights", str(weights_file))
    assert status == 2 and err.startswith(f"mobilenets: error: {bomb} is 13000x13000 = 169 megapixels, over the "
                                          f"33.6 megapixels mobilenets decodes"), err
    assert err.count("\n") == 0 and "DecompressionBombWarning" not in err
    assert peak < baseline_mb + MARGIN_MB, (peak, baseline_mb)

    # a folder of four: each reported in one line and skipped, the good image still classified; the exit
    # status says some inputs failed (1; 2 is for none read)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(4):
        (folder / f"bomb{i}.png").write_bytes(bomb.read_bytes())
    (folder / "photo.jpg").write_bytes(photo.read_bytes())
    status, out, err, peak = _measured("predict", str(folder), "--weights", str(weights_file), "--json")
    assert status == 1, err
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(folder / "photo.jpg")]
    assert err.count("megapixels, over the 33.6 megapixels") == 4 and err.count("\n") == 3, err
    assert peak < baseline_mb + MARGIN_MB, (peak, baseline_mb)


def test_a_jpeg_over_the_decode_limit_is_decoded_at_reduced_scale(tmp_path):
    # 6400 x 5600 = 35.8 megapixels, just over the limit: decoded at 1/2 scale, 3200 x 2800
    y, x = np.mgrid[0:5600, 0:6400]
    rgb = np.dstack([(x // 25) % 256, (y // 22) % 256, ((x + y) // 47) % 256]).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(rgb).save(path, quality=60)
    del rgb, x, y
    assert images.load_pixels(path).shape == (3, 2800, 3200)
    assert images.load_rgb(path).size == (3200, 2800)
    # below the limit nothing changes: the full image
    small = tmp_path / "small.jpg"
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(small)
    assert images.load_pixels(small).shape == (3, 300, 500)


def test_a_pt_whose_members_unpack_to_far_more_than_the_file_is_refused_before_loading(tmp_path, baseline_mb):
    buffer = io.BytesIO()
    torch.save({"features.0.weight": torch.zeros(64 << 20)}, buffer)  # 256 MiB of zeros, stored
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(buffer) as stored, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as deflated:
        for member in stored.infolist():
            deflated.writestr(member.filename, stored.read(member))
    assert bomb.stat().st_size < 1 << 20
    status, out, err, peak = _measured("predict", str(tmp_path), "--weights", str(bomb))
    assert status == 2 and err.startswith(f"mobilenets: error: refusing to load {bomb}: its members unpack to "), err
    assert err.count("\n") == 0
    assert peak < baseline_mb + MARGIN_MB, (peak, baseline_mb)


def test_a_tgz_whose_graph_inflates_far_beyond_the_archive_is_refused_from_its_header(tmp_path, baseline_mb):
    """The issue's 262 KB .tgz of fill operations (1.5 GB, 45 s): a MobileNet graph padded with 200 MB of zeros
    that deflate to almost nothing.  Read whole, the graph alone costs 200 MB; refused from the tar header."""
    import gzip
    import tarfile

    from graphdefs import const, mobilenet_graph, tensor_proto

    padding = const("padding", proto=tensor_proto((50 << 20,), bytes(200 << 20)))
    graph = tmp_path / "mobilenet_v1_0.25_128_frozen.pb"
    graph.write_bytes(mobilenet_graph() + padding)
    bomb = tmp_path / "mobilenet_v1_0.25_128.tgz"
    with open(bomb, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as packed, \
            tarfile.open(fileobj=packed, mode="w") as tar:
        tar.add(graph, arcname=graph.name)
    graph.unlink()
    assert bomb.stat().st_size < 2 << 20
    status, out, err, peak = _measured("convert", "--from", "tf-frozen", str(bomb), "--out", str(tmp_path / "w"))
    assert status == 2 and err.startswith(f"mobilenets: error: {bomb}: mobilenet_v1_0.25_128_frozen.pb would "
                                          f"inflate to "), err
    assert err.count("\n") == 0 and not (tmp_path / "w").exists()
    assert peak < baseline_mb + MARGIN_MB, (peak, baseline_mb)
