"""Caches are inputs too: a damaged backend-choice cache is measured afresh and rewritten; an unwritable one
degrades to no cache with one warning.  Backends are stubs (each build counted) so no runtime is timed."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import mobilenets
from mobilenets import deploy

RES = 32
CANDIDATES = {"torch", "onnxruntime", "openvino", "litert"}


@pytest.fixture
def built(monkeypatch):
    calls = []
    for name in deploy.BACKENDS:
        monkeypatch.setattr(deploy.backend.get(name), "build",
                            lambda *a, name=name: calls.append(name) or (lambda x: x))
    monkeypatch.setattr(deploy.auto.cores, "busy_cores", lambda *a: 0.0)  # quiet: a choice is final
    return calls


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mobilenets.mobilenet_v1(alpha=0.25, num_classes=10).eval()


DAMAGED = {
    "a list": [1, 2],
    "a string": "fastest",
    "a string entry": {"KEY": "torch"},
    "missing backend": {"KEY": {"timings": {"torch": 1.0}}},
    "missing timings": {"KEY": {"backend": "torch"}},
    "mistyped timings": {"KEY": {"backend": "torch", "timings": ["torch", 1.0]}},
    "a timing that is text": {"KEY": {"backend": "torch", "timings": {"torch": "fast"}}},
    "a backend that was not timed": {"KEY": {"backend": "torch", "timings": {"openvino": 1.0}}},
    "mistyped busy cores": {"KEY": {"backend": "torch", "timings": {"torch": 1.0}, "busy_cores": "none"}},
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_choice_cache_is_measured_afresh_and_rewritten(case, model, built, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    first = deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    key, = json.loads((tmp_path / "auto-backend.json").read_text())
    content = json.dumps(DAMAGED[case]).replace("KEY", key)  # damage the entry this very request reads
    (tmp_path / "auto-backend.json").write_text(content)
    built.clear()
    again = deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    assert set(built) == CANDIDATES  # measured afresh, no traceback
    entry = json.loads((tmp_path / "auto-backend.json").read_text())[key]
    assert entry["backend"] == again.backend and set(entry["timings"]) == CANDIDATES
    built.clear()
    deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    assert built == [again.backend]  # the rewritten entry serves
    assert first.backend in CANDIDATES


def test_an_unwritable_cache_degrades_to_no_cache_with_one_warning(model, built, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MOBILENETS_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(deploy.auto, "_warned_unwritable", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            compiled = deploy.compile(model, "fp32", batch_size=1, resolution=RES)
            assert compiled(torch.zeros(1, 3, RES, RES)) is not None
    notes = [str(w.message) for w in caught if "cannot keep the backend choice" in str(w.message)]
    assert len(notes) == 1 and str(blocker / "cache" / "auto-backend.json") in notes[0], notes
    assert len(built) == 2 * len(CANDIDATES)  # each run measured every candidate: nothing was kept


# ---------------------------------------------------------------- the int8 preparation cache


@pytest.fixture
def calibration():
    torch.manual_seed(1)
    return [torch.randn(2, 3, RES, RES)]


@pytest.fixture
def preparations(monkeypatch):
    from mobilenets import quantize

    real, counted = quantize.prepare_int8, []
    monkeypatch.setattr(quantize, "prepare_int8", lambda *a, **k: counted.append(1) or real(*a, **k))
    return counted


def test_int8_entries_are_trusted_only_when_signed_by_a_private_cache(model, calibration, preparations,
                                                                           tmp_path, monkeypatch):
    from mobilenets.deploy import prepare

    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    first = prepare.prepared_int8(model, calibration)
    other_images = [calibration[0].flip(-1)]
    prepare.prepared_int8(model, other_images)
    assert len(preparations) == 2
    prepare.prepared_int8(model, calibration)
    assert len(preparations) == 2  # signed by this cache: read back

    # a valid entry under another key (valid tensors, valid checksums, other ranges): what an edit looks like
    entry, other = prepare.cache_path(model, calibration), prepare.cache_path(model, other_images)
    entry.write_bytes(other.read_bytes())
    with pytest.warns(UserWarning, match="does not carry this cache's signature"):
        again = prepare.prepared_int8(model, calibration)
    assert len(preparations) == 3
    assert again.ranges == first.ranges  # prepared afresh, not the swapped-in ranges
    prepare.prepared_int8(model, calibration)
    assert len(preparations) == 3  # and re-signed


    # a folder others may write cannot vouch for its entries: not used at all
    (tmp_path / "int8").chmod(0o777)
    with pytest.warns(UserWarning, match="others may write to it"):
        prepare.prepared_int8(model, calibration)
    assert len(preparations) == 4
