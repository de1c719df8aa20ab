"""The checkpoint format: atomic writes, weights-only loading, mismatches named."""

import os
from pathlib import Path

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


@pytest.mark.parametrize("version", [None, 0, checkpoint.VERSION])
def test_a_checkpoint_of_this_or_an_older_format_version_loads(tmp_path, version):
    # only a newer version is refused (test_unreadable_and_foreign_files): a file written before versions were
    # stored (no "version" key, read as 0) or with an older one still loads, to the model that was saved
    model = mobilenet_v1(0.25, num_classes=7).eval()
    obj = make(model, resolution=96)
    if version is None:
        del obj["version"]
    else:
        obj["version"] = version
    path = checkpoint.save(obj, tmp_path / "old.pt")
    loaded, meta = checkpoint.model_from(checkpoint.load(path), path=path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta == {"resolution": 96}


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


class BlockedModulePayload:
    """Calls into a module torch's weights-only unpickler blocks outright (os): its error says "GLOBAL" only,
    not the lowercase "global" of the not-allowlisted case above, and must still read as a refusal."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_calling_a_blocked_module_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": BlockedModulePayload(str(marker))}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load .*system"):
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
    # a pickle whose string is not UTF-8 (BINUNICODE of 0xff 0xfe): torch's reader raises UnicodeDecodeError
    latin = tmp_path / "latin.pt"
    latin.write_bytes(b"\x80\x02X\x02\x00\x00\x00\xff\xfe.")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read .*latin.pt as a PyTorch checkpoint: 'utf-8'"):
        checkpoint.load(latin)
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


@pytest.mark.parametrize("count", [4, 5, 6])
def test_a_mismatch_lists_the_first_five_of_each_kind_and_marks_only_a_longer_list(count):
    """The message names at most five tensors of each kind (missing, unexpected, mis-shaped), and ends a kind's
    list with " ..." exactly when it holds more than five: four or five names are the whole list."""
    import re

    model = mobilenet_v1(0.25, num_classes=10)
    state = dict(model.state_dict())
    running_vars = [k for k in state if k.endswith("running_var")][:count]
    for k in running_vars:
        state.pop(k)
    extra = [f"extra.{i}" for i in range(count)]
    state |= {k: torch.zeros(1) for k in extra}
    means = [k for k in state if k.endswith("running_mean")][:count]
    state |= {k: torch.zeros(state[k].numel() + 1) for k in means}
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_state_dict(model, state)
    message = str(error.value)
    more = " ..." if count > 5 else ""
    assert f"missing {running_vars[:5]}{more}; unexpected" in message
    assert message.endswith(f"unexpected {extra[:5]}{more}")
    named = re.findall(r"(\S+): file has \((\d+),\), model expects \((\d+),\)", message)
    assert [k for k, _, _ in named] == means[:5]
    assert all(int(f) == int(m) + 1 for _, f, m in named)
    last, listed, expected = named[-1]
    assert f"{last}: file has ({listed},), model expects ({expected},){more}; missing" in message


def test_a_checkpoint_recompressed_by_a_zip_tool_loads(tmp_path):
    """torch reads deflated archive members, so a checkpoint re-zipped with compression (here its members unpack
    to ~13% more than the file, ~0.1 MB) is a good file; only a file claiming over 1 MiB more than it holds is
    refused (tests/test_bounded_inputs.py's bomb)."""
    import zipfile

    model = mobilenet_v1(0.25, num_classes=10)
    plain, deflated = tmp_path / "plain.pt", tmp_path / "deflated.pt"
    torch.save(model.state_dict(), plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for member in source.infolist():
            out.writestr(member.filename, source.read(member))
    with zipfile.ZipFile(deflated) as archive:
        assert sum(m.file_size for m in archive.infolist()) > deflated.stat().st_size  # the fixture can show it
    state = checkpoint.load(deflated)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_sha256_covers_the_content_and_flipped_bytes_are_refused_naming_the_file(tmp_path):
    import hashlib

    model = mobilenet_v1(0.25, num_classes=5)
    path = checkpoint.save(make(model, resolution=64) | {"epoch": 3, "train_config": {"alpha": 0.25}},
                           tmp_path / "last.pt")
    stored = checkpoint.load(path, training=True)
    assert len(stored["sha256"]) == 64 and int(stored["sha256"], 16) >= 0
    # the digest covers tensor bytes: the same dict with one weight nudged has another digest
    other = dict(stored)
    other["state_dict"] = {**stored["state_dict"], "classifier.bias": stored["state_dict"]["classifier.bias"] + 1}
    assert checkpoint.digest(other) != stored["sha256"] == checkpoint.digest(stored)

    raw = bytearray(path.read_bytes())
    # 64 bytes inside the largest tensor's data (found from outside the code: its bytes in the file)
    weight = model.state_dict()["features.13.pointwise.conv.weight"]
    blob = weight.numpy().tobytes()
    at = raw.find(blob[:256])
    assert at > 0
    for i in range(at + 100, at + 164):
        raw[i] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match=r"damaged\.pt is damaged") as e:
        checkpoint.load(damaged)
    assert "\n" not in str(e.value)
    # a training checkpoint without its sha256 cannot prove its integrity
    bare = tmp_path / "bare.pt"
    torch.save({k: v for k, v in stored.items() if k != "sha256"}, bare)
    with pytest.raises(checkpoint.CheckpointError, match="carries no sha256"):
        checkpoint.load(bare, training=True)
    assert hashlib.sha256(bytes(raw)).hexdigest() != hashlib.sha256(path.read_bytes()).hexdigest()


def test_stale_temporary_files_are_found_and_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "keep.tmp").write_bytes(b"not ours: no leading dot")
    checkpoint.save({"format": "mobilenets", "epoch": 1}, tmp_path / "last.pt")
    assert [p.name for p in checkpoint.remove_stale_temporaries(tmp_path)] == [".last.pt.abc123.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["keep.tmp", "last.pt"]


def test_written_files_follow_the_umask(tmp_path):
    import os

    from mobilenets.checkpoint import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        assert path.stat().st_mode & 0o777 == 0o644  # as `touch` would make it, not mkstemp's 0600
        os.umask(0o077)
        assert atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x")).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_atomic_write_creates_missing_folders_at_any_depth(tmp_path):
    """A run folder or cache entry two levels below an existing folder (tests/real_data.py writes
    test-data/<package>/<file>): both levels are made, and nothing but the file is left in them."""
    path = tmp_path / "a" / "b" / "weights.bin"
    checkpoint.atomic_write(path, lambda f: f.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["weights.bin"]


def test_a_training_checkpoint_written_by_mobilenets_0_2_0_still_loads_and_verifies():
    """tests/data/last-0.2.0.pt was written by checkpoint.save at 0.2.0 (a tiny run state holding lists, tuples,
    dicts and tensors, 2.8 kB).  Its sha256 is the content digest of that release: a change to how the digest
    reads any container would make every user's last.pt "damaged" and their runs impossible to resume."""
    path = Path(__file__).parent / "data" / "last-0.2.0.pt"
    stored = checkpoint.load(path, training=True)
    assert stored["sha256"] == "8326681c70669c0746db2f8fe954b2b972b65e38853846abea2bfba6e5f64f4f"
    assert stored["train_config"] == {"alpha": 0.25, "resolution": 64, "betas": (0.9, 0.999), "milestones": [3, 6]}
    assert stored["rng"] == [(1, 2), [3, 4]] and stored["meta"]["labels"] == ["cat", "dog", "owl"]
    assert torch.equal(stored["state_dict"]["classifier.bias"], torch.tensor([0.5, -1.25, 2.0]))


@pytest.mark.parametrize("claimed_mib, refused", [(0.75, False), (1.5, True)])  # half the slack either side
def test_an_archive_claiming_more_than_a_mib_beyond_its_size_is_refused_before_torch_reads_it(tmp_path, claimed_mib,
                                                                                             refused):
    """The members' declared sizes come from zipfile's own reading of the directory (not the code under test);
    a deflated run of zeros claims far more than the file holds, and only over the 1 MiB slack is it refused
    (claims of 0.75 and 1.5 MiB: a slack halved or doubled puts one of them on the other side)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(int(claimed_mib * (1 << 20)) // 4)}, buffer)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(buffer) as stored, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for member in stored.infolist():
            out.writestr(member.filename, stored.read(member))
    with zipfile.ZipFile(path) as archive:
        declared = sum(m.file_size for m in archive.infolist())
    assert (declared > path.stat().st_size + (1 << 20)) == refused  # the fixture sits on the side it claims
    if refused:
        with pytest.raises(checkpoint.CheckpointError, match=r"its members unpack to [\d,]+ bytes from a"):
            checkpoint.load(path)
    else:
        assert torch.count_nonzero(checkpoint.load(path)["w"]) == 0


def test_values_after_an_empty_tensor_or_a_non_tensor_entry_are_still_checked():
    """Nothing to check in an empty tensor or a stored number, but the tensors after them are checked all
    the same: a NaN weight that follows either is refused, naming it."""
    state = {"features.0.bn.extra": torch.empty(0), "note": 3, "features.0.conv.weight": torch.ones(2, 1, 3, 3),
             "features.1.conv.weight": torch.tensor([[[[float("nan")]]]])}
    with pytest.raises(checkpoint.CheckpointError, match="w.pt: tensor features.1.conv.weight holds 1 non-finite"):
        checkpoint.check_values(state, "w.pt")


@pytest.mark.parametrize("key, value, refused", [
    ("features.0.bn.running_var", torch.tensor([1.0, float("nan")]), "holds 1 non-finite values"),
    ("features.0.bn.running_var", torch.tensor([1.0, -0.5]), "holds a negative variance"),
    # stored as integers, loading casts them to a float variance of -2: refused as well
    ("features.0.bn.running_var", torch.tensor([1, -2]), "holds a negative variance"),
    ("features.0.bn.num_batches_tracked", torch.tensor(-3), None),  # a counter, not a variance
    ("features.0.bn.running_var", torch.empty(0), None),
])
def test_values_no_trained_model_holds_are_refused_whatever_their_dtype(key, value, refused):
    good = {"features.0.conv.weight": torch.ones(2, 1, 3, 3), "features.0.bn.running_mean": torch.zeros(2)}
    if refused is None:
        checkpoint.check_values(good | {key: value}, "w.pt")
    else:
        with pytest.raises(checkpoint.CheckpointError, match=f"w.pt: tensor {key} {refused}"):
            checkpoint.check_values(good | {key: value}, "w.pt")
