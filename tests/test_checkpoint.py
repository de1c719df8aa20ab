"""The checkpoint format: atomic writes, weights-only loading, mismatches named."""

import os

import pytest
import torch

from mobilenets import checkpoint, mobilenet_v1


def make(model, **meta):
    return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": model.config.to_dict(),
            "state_dict": model.state_dict(), "meta": meta}


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = mobilenet_v1(0.25, num_classes=5, padding="tf_same").eval()
    path = checkpoint.save(make(model, resolution=64, labels=list("abcde")), tmp_path / "run" / "last.pt")
    loaded, meta = checkpoint.model_from(checkpoint.load(path), path=path)
    assert loaded.config == model.config and meta == {"resolution": 64, "labels": list("abcde")}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"format": "mobilenets", "epoch": 1}, path)

    def dies_halfway(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, dies_halfway)
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Payload(str(marker))}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load .*safetensors"):
        checkpoint.load(path)
    assert not marker.exists()


def test_unreadable_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load(junk)
    text = tmp_path / "notes.txt"
    text.write_text("hello world\nline two\n")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read .*notes.txt"):
        checkpoint.load(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a mobilenets checkpoint.*mobilenets convert"):
        checkpoint.model_from({"weight": torch.zeros(1)})
    newer = make(mobilenet_v1(0.25)) | {"version": checkpoint.VERSION + 1}
    with pytest.raises(checkpoint.CheckpointError, match="format version"):
        checkpoint.model_from(newer)


def test_mismatch_names_tensor_and_both_shapes():
    small = mobilenet_v1(0.25, num_classes=10)
    obj = make(small) | {"config": mobilenet_v1(0.25, num_classes=12).config.to_dict()}
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"classifier.weight: file has \(10, 256\), model expects \(12, 256\)"):
        checkpoint.model_from(obj)
    state = dict(small.state_dict())
    state.pop("features.3.pointwise.bn.running_var")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['features.3.pointwise.bn.running_var'\].*"
                                                         r"unexpected \['extra.weight'\]"):
        checkpoint.load_state_dict(mobilenet_v1(0.25, num_classes=10), state)
