"""Values no trained model holds are refused, naming the tensor; text from files reaches the terminal escaped.

The crafted files are consistent in every other way (their sha256 recomputed,
as anyone editing a file can), so only the value check can catch them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mobilenets
import mobilenets.metadata
from mobilenets import predict as predict_module
from mobilenets.errors import MobilenetsError
from mobilenets.weights import file as weights_file_module

NAN_WEIGHT = "features.3.pointwise.conv.weight"


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobilenets", *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = mobilenets.mobilenet_v1(alpha=0.25, num_classes=3)
    m.eval()
    return m


@pytest.fixture(scope="module")
def good_file(model, tmp_path_factory):
    return mobilenets.save(model, tmp_path_factory.mktemp("good") / "m.safetensors")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def _edited(good: Path, out: Path, edit) -> Path:
    """``good`` with its tensors edited and its sha256 recomputed: a file consistent in all but its values."""
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(good))
    edit(tensors)
    metadata["sha256"] = weights_file_module.tensors_sha256(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _keys(model, suffix):
    return [k for k in model.state_dict() if k.endswith(suffix)]


@pytest.mark.parametrize("case", ["nan weight", "infinite weight", "negative running variance"])
def test_weights_no_trained_model_holds_are_refused_naming_the_tensor(case, model, good_file, photo, tmp_path):
    variance = _keys(model, "running_var")[2]

    def edit(tensors):
        if case == "nan weight":
            tensors[NAN_WEIGHT][0, 0, 0, 0] = math.nan
        elif case == "infinite weight":
            tensors[NAN_WEIGHT][1, 0, 0, 0] = -math.inf
        else:
            tensors[variance][3] = -0.5

    bad = _edited(good_file, tmp_path / "bad.safetensors", edit)
    done = _cli("predict", str(photo), "--weights", str(bad))
    name = variance if case == "negative running variance" else NAN_WEIGHT
    assert done.returncode == 2 and done.stderr.startswith(f"mobilenets: error: {bad}: tensor {name} holds "), \
        done.stderr
    assert done.stderr.count("\n") == 1 and "nan" not in done.stdout.lower()

    # a plain state dict in a .pt, and the library's own load: the same refusal
    pt = tmp_path / "bad.pt"
    torch.save(load_file(str(bad)), pt)
    with pytest.raises(MobilenetsError, match=f"tensor {name} holds"):
        mobilenets.load(pt, alpha=0.25)


def test_a_model_with_nan_weights_is_never_written(model, tmp_path):
    broken = mobilenets.mobilenet_v1(alpha=0.25, num_classes=3)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.get_parameter(NAN_WEIGHT)[0, 0, 0, 0] = math.nan
    with pytest.raises(MobilenetsError, match=f"tensor {NAN_WEIGHT} holds 1 non-finite"):
        mobilenets.save(broken, tmp_path / "broken.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_predict_refuses_a_nan_input_tensor(model):
    x = torch.zeros(3, 3, 224, 224)
    x[1, 2, 5, 5] = math.nan
    with pytest.raises(MobilenetsError, match="input tensor 1 holds NaN or infinite values"):
        list(predict_module.predict(model, x))
    answers = list(predict_module.predict(model, torch.zeros(2, 3, 224, 224)))  # finite input: answers as before
    assert all(math.isfinite(t["probability"]) for a in answers for t in a.top)


def test_decode_predictions_with_too_few_labels_says_so():
    with pytest.raises(MobilenetsError, match="labels must name each of the 4 classes, got 2 labels"):
        predict_module.decode_predictions(torch.randn(2, 4), k=3, labels=["a", "b"])


def test_labels_and_file_names_reach_the_terminal_escaped_and_json_exact(model, tmp_path):
    labels = ["\x1b[2J\x1b]0;owned\x07cat", "dog\n  1     0  100.00%  fake", "bird\u202e"]
    weights = model.__class__(model.config)
    weights.load_state_dict(model.state_dict())
    weights.meta = mobilenets.metadata.of(model).__class__.from_dict(
        {**mobilenets.metadata.of(model).to_dict(), "labels": labels}, "test", num_classes=3)
    path = mobilenets.save(weights, tmp_path / "labelled.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "a\nb\x1b[31m.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(image)

    table = _cli("predict", str(folder), "--weights", str(path), "--topk", "3")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 4, lines  # the file, then one line per class: no faked line
    assert lines[0] == str(folder / "a\\nb\\x1b[31m.png")
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout
    shown = {line.split("%  ", 1)[1] for line in lines[1:]}
    assert shown == {"\\x1b[2J\\x1b]0;owned\\x07cat", "dog\\n  1     0  100.00%  fake", "bird\\u202e"}

    exact = _cli("predict", str(folder), "--weights", str(path), "--topk", "3", "--json")
    record = json.loads(exact.stdout)
    assert record["image"] == str(image) and {t["label"] for t in record["top"]} == set(labels)


GOOD_INT8 = {"version": 1, "scales": [[1.0]], "ranges": {"features.0": [0.0, 6.0]}, "report": {}}


@pytest.mark.parametrize("data,why", [
    ({**GOOD_INT8, "version": "one"}, "its version must be a whole number"),
    ({k: v for k, v in GOOD_INT8.items() if k != "scales"}, "its scales must be"),
    ({**GOOD_INT8, "scales": "1.0"}, "its scales must be"),
    ({**GOOD_INT8, "scales": [["1.0"]]}, "its scales must be"),
    ({**GOOD_INT8, "scales": [[]]}, "its scales must be"),
    ({**GOOD_INT8, "ranges": {"features.0": [math.nan, 6.0]}}, "its ranges must be finite"),
    ({**GOOD_INT8, "ranges": {"features.0": [6.0, 0.0]}}, "its ranges must be finite"),
    ({**GOOD_INT8, "ranges": {"features.0": "0..6"}}, "its ranges must be finite"),
    ({**GOOD_INT8, "report": []}, "its report must be an object"),
])
def test_crafted_int8_metadata_is_refused_in_one_line(model, data, why):
    from dataclasses import replace

    from mobilenets import quantize

    crafted = model.__class__(model.config)
    crafted.meta = replace(mobilenets.metadata.of(model), int8=data)
    with pytest.raises(MobilenetsError, match=f"the int8 data of these weights is damaged: {why}"):
        quantize.from_model(crafted)


@pytest.mark.parametrize("queued", [False, True], ids=["at-once", "after-queueing-batches"])
def test_a_killed_decoding_worker_loses_no_image_and_says_so_in_one_line(tmp_path, queued):
    """A worker killed mid-run (SIGKILL, as the system's out-of-memory killer sends) used to end predict in
    PyTorch's traceback, raised wherever the main thread was.  Now every image still arrives, in order, with
    the pixels an undisturbed in-process run gives, after one warning line.

    Killed after it has queued batches, the worker takes with it the shared memory those batches' pixels
    are in: receiving them fails in unpickling (EOFError), not in PyTorch's own check for dead workers."""
    import multiprocessing
    import os
    import signal
    import time

    from PIL import Image

    from mobilenets import pipeline

    files = []
    for k in range(24):
        path = tmp_path / f"{k:02d}.png"
        Image.new("RGB", (40, 30), (10 * k, 255 - 10 * k, 7 * k)).save(path)
        files.append(path)
    files[21].write_bytes(b"no image")  # decoded after the death, in this process: still reported as image 21
    # and one in the first batch, delivered before the death: it counts among the images already answered
    # (1 decoded + 1 failed), so decoding resumes at image 2, not at 0 (decoding 0 and 1 twice) or 1
    files[1].write_bytes(b"no image either")
    expected = torch.cat([b.x for b in pipeline.batches(files, resolution=32, batch_size=2, workers=0)])
    heard = []
    stream = pipeline.batches(files, resolution=32, batch_size=2, workers=2, warn=heard.append)
    got = [next(stream)]
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    if queued:
        time.sleep(1.0)  # each worker decodes its 2 prefetched batches of 2 tiny PNGs in milliseconds
    os.kill(workers[0].pid, signal.SIGKILL)
    got += list(stream)
    assert [i for b in got for i in b.indices] == [k for k in range(24) if k not in (1, 21)]
    assert [i for b in got for i, _ in b.failed] == [1, 21]
    assert torch.equal(torch.cat([b.x for b in got]), expected)
    assert len(heard) == 1 and "\n" not in heard[0], heard
    assert heard[0].startswith(f"a decoding worker died (DataLoader worker (pid {workers[0].pid}) is killed by "
                               f"signal: Killed") or heard[0].startswith("a decoding worker died (DataLoader "
                                                                         "worker (pid(s) "), heard
    assert "images not yet decoded are decoded in this process instead" in heard[0]
