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
