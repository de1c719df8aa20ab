"""Hostile and damaged weight files: nothing outside the input is read, nothing huge is allocated, one-line errors.

Every crafted file is made here and is tiny on disk; what it claims (a
billion classes, a 2 GiB archive member, an external raw file) is what the
readers must refuse before acting on it.
"""

from __future__ import annotations

import gzip
import http.server
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import mobilenets
from mobilenets import checkpoint, cli, weights
from mobilenets.errors import MobilenetsError
from mobilenets.weights import download
from mobilenets.weights.tf_checkpoint import MAX_MEMBER_BYTES

from weights_helpers import Server, tf_slim_variables, write_keras2_h5, write_tf_checkpoint

SECRET = b"TOP-SECRET-BYTES"


def _secret_file(folder: Path) -> Path:
    path = folder / "secret.bin"
    path.write_bytes(SECRET * 250)  # 4000 bytes: exactly the 1000 float32 values of conv_preds' bias
    return path


def _replace(path: Path, dataset: str, make) -> None:
    with h5py.File(path, "a") as f:
        data = np.asarray(f[dataset])
        del f[dataset]
        make(f, dataset, data)


def _external_storage(tmp_path, f, name, data):
    f.create_dataset(name, shape=data.shape, dtype=data.dtype, external=[(str(_secret_file(tmp_path)), 0, 4000)])


def _external_link(tmp_path, f, name, data):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o.create_dataset("bias", data=np.frombuffer(SECRET * 250, dtype=np.float32))
    f[name] = h5py.ExternalLink(str(other), "/bias")


def _soft_link(tmp_path, f, name, data):
    f.create_dataset("/elsewhere", data=data)
    f[name] = h5py.SoftLink("/elsewhere")


def _virtual(tmp_path, f, name, data):
    src = tmp_path / "source.h5"
    with h5py.File(src, "w") as s:
        s.create_dataset("bias", data=np.frombuffer(SECRET * 250, dtype=np.float32))
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[:] = h5py.VirtualSource(str(src), "bias", shape=data.shape)
    f.create_virtual_dataset(name, layout)


HOSTILE_H5 = {"external storage": (_external_storage, "external file"),
              "external link": (_external_link, "ExternalLink"),
              "soft link": (_soft_link, "SoftLink"),
              "virtual dataset": (_virtual, "virtual dataset")}


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "secret.bin")


@pytest.mark.parametrize("kind", list(HOSTILE_H5))
def test_keras_h5_that_reads_other_files_is_refused_naming_the_dataset(tmp_path, kind, capsys):
    make, words = HOSTILE_H5[kind]
    src = write_keras2_h5(tmp_path / "mobilenet_2_5_128_tf.h5", 0.25)
    _replace(src, "conv_preds/conv_preds/bias:0", lambda f, n, d: make(tmp_path, f, n, d))
    out = tmp_path / "out" / "m.safetensors"
    assert cli.main(["convert", "--from", "keras", str(src), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and words in err and "conv_preds/conv_preds/bias:0" in err
    assert not out.exists()
    assert SECRET not in _all_bytes(tmp_path / "out") + captured.out.encode() + captured.err.encode()


def test_imagenet_download_path_uses_the_same_checks(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    src = write_keras2_h5(served / "mobilenet_2_5_128_tf.h5", 0.25)
    _replace(src, "conv_preds/conv_preds/bias:0", lambda f, n, d: _external_storage(tmp_path, f, n, d))
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))
    server = Server(served)
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
    try:
        with pytest.raises(MobilenetsError, match="external file"):
            mobilenets.mobilenet_v1(0.25, weights="imagenet", resolution=128, progress=False)
    finally:
        server.close()
    assert not list(cache.glob("*.safetensors"))
    assert SECRET not in _all_bytes(cache)


# ---------------------------------------------------------------- sizes claimed by a file, bounded before allocation

_PROBE = r"""
import json, resource, sys
import mobilenets
from mobilenets import weights
from mobilenets.errors import MobilenetsError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for how, path in json.loads(sys.argv[1]):
    try:
        weights.convert(how, path) if how != "load" else mobilenets.load(path)
        results[path] = "loaded"
    except MobilenetsError as e:
        results[path] = "error: " + str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": results, "rss_growth_kb": after - before}))
"""


def _safetensors_claiming(tmp_path, name, **changes) -> Path:
    """A converted file whose metadata config is edited and whose sha256 is deleted."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = mobilenets.mobilenet_v1(0.25, num_classes=10)
    good = mobilenets.save(model, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["config"])
    for key, value in changes.items():
        if key == "resolution":
            metadata["resolution"] = json.dumps(value)
        else:
            config[key] = value
    metadata["config"] = json.dumps(config)
    metadata.pop("sha256")
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


def _checkpoint_claiming(tmp_path, name, **changes) -> Path:
    model = mobilenets.mobilenet_v1(0.25, num_classes=10)
    config = model.config.to_dict()
    meta = {"resolution": 96, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}, "labels": None}
    for key, value in changes.items():
        (meta if key == "resolution" else config)[key] = value
    checkpoint.save({"format": "mobilenets", "version": 1, "config": config, "state_dict": model.state_dict(),
                     "meta": meta}, tmp_path / name)
    return tmp_path / name


def _h5_declaring(tmp_path, name, dataset, shape) -> Path:
    src = write_keras2_h5(tmp_path / name, 0.25, include_top=False)
    with h5py.File(src, "a") as f:
        del f[dataset]
        f.create_dataset(dataset, shape=shape, dtype="f4")  # never written: nothing stored on disk
    return src


def _tgz_with_member_of(tmp_path, size: int) -> Path:
    info = tarfile.TarInfo("mobilenet_v1_0.25_128/model.ckpt.data-00000-of-00001")
    info.size = size
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024  # the header claims it, the archive holds none of it
    path = tmp_path / "mobilenet_v1_0.25_128.tgz"
    path.write_bytes(gzip.compress(raw))
    return path


def test_sizes_a_file_claims_are_bounded_before_anything_is_allocated(tmp_path):
    cases = [
        ("load", _safetensors_claiming(tmp_path, "alpha.safetensors", alpha=1000.0), "alpha must be a number in (0, 4]"),
        ("load", _safetensors_claiming(tmp_path, "classes.safetensors", num_classes=10**9),
         "num_classes must be in [0, 100000]"),
        ("load", _safetensors_claiming(tmp_path, "res.safetensors", resolution=10**12), "resolution must be"),
        ("load", _checkpoint_claiming(tmp_path, "alpha.pt", alpha=1000.0), "alpha must be a number in (0, 4]"),
        ("load", _checkpoint_claiming(tmp_path, "classes.pt", num_classes=10**9),
         "num_classes must be in [0, 100000]"),
        ("load", _checkpoint_claiming(tmp_path, "res.pt", resolution=10**12), "resolution must be"),
        ("keras", _h5_declaring(tmp_path, "stem.h5", "conv1/conv1/kernel:0", (3, 3, 3, 10**9)), "features.0.conv"),
        ("keras", _h5_declaring(tmp_path, "wide.h5", "conv_pw_13/conv_pw_13/kernel:0", (1, 1, 256, 10**9)),
         "beyond what this library loads"),
        ("tf-slim", _tgz_with_member_of(tmp_path, 2 * 1024**3), "not extracted"),
    ]
    assert all(path.stat().st_size < 2_000_000 for _, path, _ in cases)
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([(how, str(p)) for how, p, _ in cases])],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(mobilenets.__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for _, path, words in cases:
        message = report["results"][str(path)]
        assert message.startswith("error: ") and words in message and "\n" not in message, (path.name, message)
    assert report["rss_growth_kb"] < 400_000  # the smallest claim above would need 12 GB


def test_a_tgz_member_over_the_bound_is_never_extracted(tmp_path):
    archive = _tgz_with_member_of(tmp_path, MAX_MEMBER_BYTES + 1)
    with pytest.raises(MobilenetsError, match=f"declares {MAX_MEMBER_BYTES + 1:,} bytes"):
        weights.convert("tf-slim", archive)


# ---------------------------------------------------------------- sha256.json under concurrent first use


def _record(folder: str, name: str, barrier) -> None:
    barrier.wait()
    download.verify_sha256(Path(folder) / name)


def test_concurrent_first_use_loses_no_sha256_record(tmp_path):
    names = [f"w{i}.h5" for i in range(8)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * 1000)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_record, args=(str(tmp_path), name, barrier)) for name in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(names)
    recorded = json.loads((tmp_path / "sha256.json").read_text())
    assert set(recorded) == set(names)
    assert recorded["w3.h5"] == __import__("hashlib").sha256(bytes([3]) * 1000).hexdigest()


# ---------------------------------------------------------------- downloads: deadline and size cap


class _Slow(http.server.BaseHTTPRequestHandler):
    """Sends a header promising 1000 bytes, then one byte every 2 s; /big promises and sends too much."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.path == "/big":
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            return
        if self.path == "/unannounced":
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\x89HDF" * 4096)
            return
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(2)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def slow_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_trickling_server_fails_within_the_overall_timeout(slow_server, tmp_path):
    start = time.monotonic()
    with pytest.raises(MobilenetsError, match=r"not finished after 3 s") as e:
        download.download(f"{slow_server}/slow", tmp_path / "w.h5", progress=False, timeout=10, total_timeout=3)
    assert time.monotonic() - start < 8
    assert "\n" not in str(e.value) and str(tmp_path / "w.h5") in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no temp file left


@pytest.mark.parametrize("path", ["/big", "/unannounced"])
def test_downloads_over_the_size_cap_are_refused(slow_server, tmp_path, path):
    with pytest.raises(MobilenetsError, match="1,000,000-byte limit"):
        download.download(slow_server + path, tmp_path / "w.h5", progress=False, max_bytes=1_000_000)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- byte-level fuzz over each format


def _formats(tmp_path):
    """(how to read it, a valid file) for every binary format mobilenets reads: weights of each kind, a frozen
    graph and a .tflite (their readers of our own), and the JPEG and PNG images predict decodes."""
    from PIL import Image

    from graphdefs import float_attr, mobilenet_graph
    from mobilenets import deploy

    model = mobilenets.mobilenet_v1(0.25, num_classes=10)
    yield "load", mobilenets.save(model, tmp_path / "m.safetensors")
    yield "load", checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(),
                                   "state_dict": model.state_dict(), "meta": {"resolution": 96}},
                                  tmp_path / "m.pt")
    yield "keras", write_keras2_h5(tmp_path / "mobilenet_2_5_128_tf.h5", 0.25, include_top=False)
    folder = tmp_path / "mobilenet_v1_0.25_128"
    folder.mkdir()
    prefix = write_tf_checkpoint(folder / "model.ckpt", tf_slim_variables(0.25))
    yield "tf-slim", Path(str(prefix) + ".index")
    archive = tmp_path / "mobilenet_v1_0.25_128.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    yield "tf-slim", archive
    graph = tmp_path / "mobilenet_v1_0.25_128_frozen.pb"
    graph.write_bytes(mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3)))
    yield "tf-frozen", graph
    yield "tflite", deploy.export(mobilenets.mobilenet_v1(0.25, num_classes=10, padding="tf_same").eval(),
                                  tmp_path / "m.tflite", resolution=32)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=90)
    yield "image", tmp_path / "photo.jpg"
    photo.save(tmp_path / "photo.png")
    yield "image", tmp_path / "photo.png"


# a damaged file may cost what reading a valid one costs, plus this: far below any bomb of issue 20 (the
# smallest, a 169-megapixel PNG, took 2.4 GB); a case slower than this many seconds is reported too
FUZZ_MARGIN_MB = 256
FUZZ_CASE_SECONDS = 10

# Run in a fresh process, so that its peak memory is the fuzz's own, not an earlier test's in this file.
_FUZZ = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
import mobilenets
from mobilenets import images, weights
from mobilenets.errors import MobilenetsError

formats, damaged, case_seconds = json.loads(sys.argv[1])
damaged = Path(damaged)

def read(how, path):
    if how == "image":
        return images.load_pixels(path)
    return weights.convert(how, path) if how != "load" else mobilenets.load(path)

def cases(data, seed):  # seeded: 30 truncations and 30 single-bit flips
    rng = np.random.default_rng(seed)
    for pos in sorted(rng.integers(0, len(data), 30)):
        yield f"truncated at {pos}", data[:pos]
    for pos in sorted(rng.integers(0, len(data), 30)):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        yield f"bit flipped at {pos}", bytes(flipped)

for how, path in formats:
    read(how, Path(path))
baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
escaped, count = [], 0
for seed, (how, path) in enumerate(formats):
    path = Path(path)
    data = path.read_bytes()
    for case, blob in cases(data, seed):
        count += 1
        target = path if path.suffix == ".index" else damaged / path.name  # a damaged index beside its shard
        original = target.read_bytes() if target.exists() else None
        target.write_bytes(blob)
        start = time.perf_counter()
        try:
            read(how, target)
        except MobilenetsError as e:
            if "\n" in str(e):
                escaped.append(f"{path.name} {case}: multi-line message {str(e)[:200]!r}")
        except Exception as e:  # anything else is a traceback for the user
            escaped.append(f"{path.name} {case}: {type(e).__name__}: {str(e)[:200]}")
        finally:
            if original is not None and target == path:
                target.write_bytes(original)
        if time.perf_counter() - start > case_seconds:
            escaped.append(f"{path.name} {case}: {time.perf_counter() - start:.1f} s")
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"escaped": escaped, "cases": count, "baseline_mb": baseline_mb, "peak_mb": peak_mb}))
"""


def test_damaged_files_of_every_format_give_only_mobilenets_errors(tmp_path):
    """Seeded: 60 truncations and bit flips of each of 9 valid files (540 cases), in a fresh process.  Each
    must load or be refused with one of our errors in one line, within FUZZ_CASE_SECONDS, and the process's
    peak memory may grow by no more than FUZZ_MARGIN_MB over reading every valid file once."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    formats = [(how, str(path)) for how, path in _formats(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", _FUZZ, json.dumps([formats, str(damaged), FUZZ_CASE_SECONDS])],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["cases"] == 60 * len(formats) == 540
    assert not r["escaped"], "\n".join(r["escaped"][:20])
    assert r["peak_mb"] < r["baseline_mb"] + FUZZ_MARGIN_MB, r
