"""The builds of runtimes kept in the cache folder (deploy.artifacts): a second compile of the same request loads
what the first exported, with the same logits; what changes the graph changes the entry; a damaged or foreign
entry is built afresh, never run.

Each test has its own cache folder.  What an entry's key and trust cover is the same for every runtime; LiteRT,
whose export is the quickest, stands for them where one is enough.  The exporter of each runtime is counted (wrapped, still run), so "exported
again" is observed directly; the logits are compared with the eager model (the oracle) and with the first build.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mobilenets import deploy, mobilenet_v1
from mobilenets.benchmark import make_model
from mobilenets.deploy import artifacts

RES = 32
# each runtime and the function its build calls to make the bytes it keeps
EXPORTERS = {"onnxruntime": ("onnxruntime", "onnx_file"), "litert": ("litert", "tflite_bytes"),
             "openvino": ("openvino", "openvino_model")}


@pytest.fixture(scope="module")
def model():
    return make_model(0.25, steps=70, resolution=RES)


@pytest.fixture(scope="module")
def calibration():
    batches, _ = deploy.builtin_batches(RES, limit=8)
    return batches


@pytest.fixture(scope="module")
def images(calibration):
    return torch.cat(calibration)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    return tmp_path / "builds"


def counted(monkeypatch, backend: str) -> list:
    """Calls of ``backend``'s exporter from now on (it still runs)."""
    import importlib

    module_name, function = EXPORTERS[backend]
    module = importlib.import_module(f"mobilenets.deploy.{module_name}")
    real, calls = getattr(module, function), []
    monkeypatch.setattr(module, function, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def available(backend: str) -> bool:
    return backend in deploy.available_backends()


@pytest.mark.parametrize("backend", list(EXPORTERS))
def test_a_second_compile_loads_the_first_ones_build_with_the_same_logits(backend, model, images, cache,
                                                                          monkeypatch):
    if not available(backend):
        pytest.skip(f"{backend} is not installed")
    exports = counted(monkeypatch, backend)
    first = deploy.compile(model, "fp32", batch_size=4, resolution=RES, backend=backend)
    assert len(exports) == 1 and len(list(cache.glob(f"{backend}-*"))) == 1
    again = deploy.compile(model, "fp32", batch_size=4, resolution=RES, backend=backend)
    assert len(exports) == 1  # loaded, not exported again
    with torch.no_grad():
        eager = model(images)
    a, b = first(images), again(images)
    assert torch.equal(a, b)
    # the kept graph is the model: every answer of the eager model, logits within float rounding
    assert torch.equal(b.argmax(1), eager.argmax(1))
    assert torch.allclose(b, eager, atol=1e-3 * float(eager.abs().max()))


def test_what_changes_the_graph_changes_the_entry(model, calibration, images, cache, monkeypatch):
    """Other weights, precision, batch size, resolution or calibration images never share an entry."""
    if not available("litert"):
        pytest.skip("litert is not installed")
    exports = counted(monkeypatch, "litert")
    other = mobilenet_v1(0.25, num_classes=10).eval()
    requests = [
        (model, "fp32", {"batch_size": 2}),
        (other, "fp32", {"batch_size": 2}),
        (model, "fp32", {"batch_size": 3}),
        (model, "fp32", {"batch_size": 2, "resolution": RES + 8}),
        (model, "int8", {"batch_size": 2, "calibration": calibration}),
        (model, "int8", {"batch_size": 2, "calibration": calibration[:1]}),
    ]
    predictors = []
    for m, precision, options in requests:
        options = {"resolution": RES, **options}
        predictors.append(deploy.compile(m, precision, backend="litert", **options))
    assert len(exports) == len(requests) and len(list(cache.glob("litert-*"))) == len(requests)
    for (m, precision, options), first in zip(requests, predictors):  # each request reads its own entry back
        options = {"resolution": RES, **options}
        again = deploy.compile(m, precision, backend="litert", **options)
        x = torch.nn.functional.interpolate(images, size=options["resolution"])
        assert torch.equal(first(x), again(x))
    assert len(exports) == len(requests)


@pytest.mark.parametrize("damage", ["a flipped byte", "truncated", "another key's entry"])
def test_a_damaged_or_foreign_entry_is_built_afresh_with_the_same_answers(damage, model, images, cache,
                                                                          monkeypatch):
    if not available("litert"):
        pytest.skip("litert is not installed")
    exports = counted(monkeypatch, "litert")
    first = deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="litert")
    entry, = cache.glob("litert-*")
    data = entry.read_bytes()
    if damage == "a flipped byte":  # in the graph's weights, past the signature
        i = len(data) - 200
        entry.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif damage == "truncated":
        entry.write_bytes(data[:-100])
    else:  # a valid, signed entry of another request (batch size 3) in this one's place
        deploy.compile(model, "fp32", batch_size=3, resolution=RES, backend="litert")
        foreign, = set(cache.glob("litert-*")) - {entry}
        entry.write_bytes(foreign.read_bytes())
    built = len(exports)
    with pytest.warns(UserWarning, match="does not carry this cache's signature"):
        mended = deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="litert")
    assert len(exports) == built + 1
    assert torch.equal(first(images), mended(images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry was replaced by a signed one: read back quietly
        deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="litert")
    assert len(exports) == built + 1


def test_the_folder_is_bounded_and_keeps_the_recently_used(model, cache, monkeypatch):
    if not available("litert"):
        pytest.skip("litert is not installed")
    exports = counted(monkeypatch, "litert")
    deploy.compile(model, "fp32", batch_size=1, resolution=RES, backend="litert")
    size = next(cache.glob("litert-*")).stat().st_size
    monkeypatch.setattr(artifacts, "MAX_BYTES", int(2.5 * size))  # room for two entries of this size
    for b in (1, 2, 1, 3):  # batch size 1 is used again before 3 comes: 2 goes, not 1
        deploy.compile(model, "fp32", batch_size=b, resolution=RES, backend="litert")
    assert len(exports) == 3 and len(list(cache.glob("litert-*"))) == 2
    deploy.compile(model, "fp32", batch_size=1, resolution=RES, backend="litert")
    deploy.compile(model, "fp32", batch_size=3, resolution=RES, backend="litert")
    assert len(exports) == 3
    deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="litert")
    assert len(exports) == 4


def test_a_folder_others_may_write_is_not_used(model, images, cache, monkeypatch):
    if not available("litert"):
        pytest.skip("litert is not installed")
    exports = counted(monkeypatch, "litert")
    first = deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="litert")
    cache.chmod(0o777)
    with pytest.warns(UserWarning, match="not using the build cache .*others may write to it"):
        again = deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="litert")
    assert len(exports) == 2 and torch.equal(first(images), again(images))
