"""Frozen TensorFlow graphs convert without TensorFlow and give TensorFlow's logits.

The authority is TensorFlow itself (tests/frozen_peer.py, in a subprocess):
it runs the real graph (Google's MobileNet v1 1.0-224 ImageNet weights, from
the nudity==0.2.3 sdist, see tests/real_data.py) on crops of real photos, and
it builds and serializes the crafted graphs whose constants and logits the
reader must reproduce.  The bar: max |ours - TF| <= 1e-4 * max |TF| and the
same top-1 on every crop.  ``pytest tests/test_tf_frozen.py -s`` prints the
measured numbers.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mobilenets
import real_data
from graphdefs import field, varint
from mobilenets import weights
from mobilenets.errors import MobilenetsError
from mobilenets.weights.tf_frozen import FrozenGraphError, from_tf_frozen, read_graph

TOLERANCE = 1e-4
PEER = Path(__file__).with_name("frozen_peer.py")
CROPS = 32


def tensorflow_peer(*args: str) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install -e '.[test]' installs it)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(PEER), *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def real_pb() -> Path:
    return real_data.real_graph_path()


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crafted")
    tensorflow_peer("craft", str(out))
    return out


def logits(model, x_nchw: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x_nchw).numpy()


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# ---------------------------------------------------------------- the real graph against TensorFlow


def test_real_graph_logits_match_tensorflow(real_pb, tmp_path):
    crops = real_data.heldout_crops(CROPS)
    np.save(tmp_path / "x.npy", real_data.inception_input(crops, layout="nhwc"))
    tensorflow_peer("logits", str(real_pb), real_data.INPUT_NODE, real_data.LOGITS_NODE,
                    str(tmp_path / "x.npy"), str(tmp_path / "tf.npy"))
    tf_logits = np.load(tmp_path / "tf.npy")
    assert tf_logits.shape == (CROPS, 1001)

    x = real_data.inception_input(crops)
    with_background = from_tf_frozen(real_pb, keep_background=True).model()
    ours = logits(with_background, x)
    rel = relative_difference(ours, tf_logits)
    agree = float((ours.argmax(1) == tf_logits.argmax(1)).mean())
    print(f"\nreal graph, {CROPS} held-out photo crops: max|ours - TF|/max|TF| = {rel:.2e}, "
          f"top-1 agreement {agree:.0%}")
    assert rel <= TOLERANCE
    assert agree == 1.0
    # the default drops class 0 (background): ImageNet class k is TensorFlow's k + 1
    model = real_data.real_model()
    assert model.config.num_classes == 1000 and len(model.meta.labels) == 1000
    assert relative_difference(logits(model, x), tf_logits[:, 1:]) <= TOLERANCE
    # real weights classify real photos: the cat (chelsea.png) crops are mostly cats
    cats = [k for k, box in enumerate(real_data.heldout_boxes(CROPS))
            if real_data.photos()[box[0]][0] == "chelsea.png"]
    labels = [model.meta.labels[i] for i in logits(model, x[cats]).argmax(1)]
    assert cats and sum("cat" in label for label in labels) > len(cats) / 2, labels


def test_real_graph_metadata(real_pb):
    converted = real_data.real_converted()
    c = converted.config
    assert (c.alpha, c.padding, c.bn_eps, c.activation) == (1.0, "tf_same", 1e-3, "relu6")
    assert converted.meta.resolution == 224  # the input placeholder's 1x224x224x3
    assert converted.meta.source == "tf-frozen:retrained_graph.pb"
    assert converted.meta.normalization.to_dict() == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def test_cli_chooses_tf_frozen_for_pb_and_load_gives_the_same_model(real_pb, tmp_path):
    out = tmp_path / "real.safetensors"
    env = dict(os.environ, PYTHONPATH="src")
    root = Path(__file__).parents[1]
    run = subprocess.run([sys.executable, "-m", "mobilenets", "convert", str(real_pb), "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr
    assert '"source": "tf-frozen:retrained_graph.pb"' in run.stdout
    x = real_data.inception_input(real_data.heldout_crops(4))
    assert np.array_equal(logits(mobilenets.load(out), x), logits(real_data.real_model(), x))
    # without --from, other files need it
    run = subprocess.run([sys.executable, "-m", "mobilenets", "convert", str(out), "--out", str(tmp_path / "y")],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 2 and "--from keras|tf-slim|tf-frozen|timm" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_release_archive_holding_the_graph(real_pb, tmp_path):
    archive = tmp_path / "mobilenet_v1_1.0_224.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(real_pb, arcname="./mobilenet_v1_1.0_224_frozen.pb")
        tar.addfile(tarfile.TarInfo("./mobilenet_v1_1.0_224_info.txt"), io.BytesIO())
        info = tarfile.TarInfo("../../escaped_eval.pb")  # a path outside the folder: read, never extracted
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x0a\x02\x0a\x00"))
    converted = weights.convert("tf-frozen", archive)
    plain = real_data.real_converted()
    assert converted.meta.source == "tf-frozen:mobilenet_v1_1.0_224.tgz"
    assert all(torch.equal(converted.state_dict[k], v) for k, v in plain.state_dict.items())
    assert not (tmp_path.parent / "escaped_eval.pb").exists() and not Path("escaped_eval.pb").exists()


# ---------------------------------------------------------------- graphs TensorFlow writes


def test_every_tensor_encoding_reads_as_tensorflow_reads_it(crafted):
    graph = read_graph(crafted / "values.pb")
    expected = np.load(crafted / "values.npz")
    for name in expected.files:
        ours = graph.constant(name)
        assert ours.dtype == expected[name].dtype and ours.shape == expected[name].shape, name
        np.testing.assert_array_equal(ours, expected[name], err_msg=name)


def test_crafted_graph_alpha_resolution_epsilon_from_the_graph(crafted):
    """alpha 0.5, 160 px, fused BatchNorm with epsilon 1e-5, a layer without gamma, names under 'import/'."""
    converted = from_tf_frozen(crafted / "mobilenet_050.pb", keep_background=True)
    ref = np.load(crafted / "mobilenet_050.npz")
    assert (converted.config.alpha, converted.config.bn_eps, converted.meta.resolution) == (0.5, 1e-5, 160)
    assert converted.config.num_classes == 1001 and converted.meta.labels[0] == "background"
    sd = converted.state_dict
    dw = ref["const:MobilenetV1/Conv2d_5_depthwise/depthwise_weights"]  # H, W, C, 1 -> C, 1, H, W
    np.testing.assert_array_equal(sd["features.5.depthwise.conv.weight"].numpy(), dw.transpose(2, 3, 0, 1))
    pw = ref["const:MobilenetV1/Conv2d_5_pointwise/weights"]  # H, W, I, O -> O, I, H, W
    np.testing.assert_array_equal(sd["features.5.pointwise.conv.weight"].numpy(), pw.transpose(3, 2, 0, 1))
    assert torch.equal(sd["features.3.depthwise.bn.weight"], torch.ones(64))  # scale=False: gamma is 1
    # without keep_background the head loses TF's class 0 ("background"): ImageNet class k is TF's k + 1
    dropped = from_tf_frozen(crafted / "mobilenet_050.pb")
    head_w = ref["const:MobilenetV1/Logits/Conv2d_1c_1x1/weights"][0, 0]  # (C, 1001)
    head_b = ref["const:MobilenetV1/Logits/Conv2d_1c_1x1/biases"]
    assert dropped.config.num_classes == 1000 and len(dropped.meta.labels) == 1000
    np.testing.assert_array_equal(dropped.state_dict["classifier.weight"].numpy(), head_w[:, 1:].T)
    np.testing.assert_array_equal(dropped.state_dict["classifier.bias"].numpy(), head_b[1:])
    ours = logits(converted.model(), torch.from_numpy(ref["x"]).permute(0, 3, 1, 2))
    rel = relative_difference(ours, ref["y"])
    print(f"\ncrafted alpha 0.5, 160 px, eps 1e-5: max|ours - TF|/max|TF| = {rel:.2e}")
    assert rel <= TOLERANCE


def test_resolution_argument_wins_over_the_placeholder(crafted):
    assert from_tf_frozen(crafted / "mobilenet_050.pb", resolution=192).meta.resolution == 192


# ---------------------------------------------------------------- bad files: one line that says what would work


def const_node(name: str, tensor: bytes) -> bytes:
    attr = field(1, b"value") + field(2, field(8, tensor))  # map entry: key, AttrValue.tensor
    return field(1, field(1, name.encode()) + field(2, b"Const") + field(5, attr))


def one_line_error(path, match: str, kind=FrozenGraphError) -> str:
    with pytest.raises(kind, match=match) as e:
        from_tf_frozen(path)
    assert isinstance(e.value, MobilenetsError)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_graph(real_pb, tmp_path, fraction):
    data = real_pb.read_bytes()
    bad = tmp_path / "truncated.pb"
    bad.write_bytes(data[: int(len(data) * fraction)])
    one_line_error(bad, "not a readable TensorFlow GraphDef .*whole and uncorrupted")


def test_huge_declared_lengths_are_refused_before_allocating(tmp_path):
    bad = tmp_path / "huge_length.pb"
    bad.write_bytes(varint(1 << 3 | 2) + varint(1 << 40) + b"\x00" * 16)  # a node of 1 TB
    one_line_error(bad, r"declares 1099511627776 bytes but only 16 remain")
    # a well-formed constant whose shape (2**20 x 2**20 floats, listed as one value) would need 4 TiB
    shape = field(2, varint(1 << 3) + varint(1 << 20)) * 2
    tensor = varint(1 << 3) + varint(1) + field(2, shape) + field(5, np.float32(0).tobytes())
    bad = tmp_path / "huge_shape.pb"
    bad.write_bytes(const_node("MobilenetV1/Conv2d_0/weights", tensor))
    # converting stops at the first missing layer before reading any tensor; the constant itself, read, is bounded
    one_line_error(bad, r"no variable MobilenetV1/Conv2d_0/BatchNorm/beta", weights.WeightsError)
    with pytest.raises(FrozenGraphError, match=r"shape \(1048576, 1048576\) declares 4398046511104 bytes, more "
                                               r"than the file's"):
        read_graph(bad).constant("MobilenetV1/Conv2d_0/weights")


def test_graphs_that_are_not_mobilenet(tmp_path, crafted):
    one_line_error(crafted / "values.pb", r"not a MobileNet v1 one: no node named MobilenetV1/Conv2d_0/weights "
                                          r"among its 11 nodes")
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    one_line_error(empty, "holds no graph nodes")
    png = tmp_path / "photo.pb"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    one_line_error(png, "not a readable TensorFlow GraphDef")
    unfrozen = tmp_path / "unfrozen.pb"
    unfrozen.write_bytes(field(1, field(1, b"MobilenetV1/Conv2d_0/weights") + field(2, b"VariableV2")))
    one_line_error(unfrozen, r"holds variables, not constants: it is not frozen; convert its checkpoint instead")


def test_graph_missing_layers_names_the_first_missing_variable(tmp_path):
    dims = b"".join(field(2, varint(1 << 3) + varint(d)) for d in (3, 3, 3, 32))
    kernel = varint(1 << 3) + varint(1) + field(2, dims)  # dtype float32, shape 3x3x3x32
    kernel += field(4, np.zeros(3 * 3 * 3 * 32, np.float32).tobytes())
    only_first = tmp_path / "first_layer_only.pb"
    only_first.write_bytes(const_node("MobilenetV1/Conv2d_0/weights", kernel))
    one_line_error(only_first, "no variable MobilenetV1/Conv2d_0/BatchNorm/beta", kind=weights.WeightsError)


def test_archives_without_one_graph(tmp_path, crafted):
    none = tmp_path / "no_graph.tgz"
    with tarfile.open(none, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("model.ckpt.index"), io.BytesIO())
    one_line_error(none, r"holds 0 frozen graphs")
    two = tmp_path / "two_graphs.tgz"
    with tarfile.open(two, "w:gz") as tar:
        tar.add(crafted / "values.pb", arcname="a.pb")
        tar.add(crafted / "values.pb", arcname="b.pb")
    one_line_error(two, r"holds 2 frozen graphs \['a.pb', 'b.pb'\]")
    huge = tmp_path / "huge_member.tar"
    info = tarfile.TarInfo("mobilenet_v1_1.0_224_frozen.pb")
    info.size = 3 << 30  # declares 3 GiB, holds a few bytes
    huge.write_bytes(info.tobuf() + b"\x0a\x00" * 256)
    one_line_error(huge, r"not a readable tar archive \(unexpected end of data\)")


def test_archive_member_size_is_bounded_before_reading(tmp_path, crafted, monkeypatch):
    from mobilenets.weights import tf_frozen

    archive = tmp_path / "mobilenet_v1_0.5_160.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(crafted / "mobilenet_050.pb", arcname="mobilenet_v1_0.5_160_frozen.pb")
    size = (crafted / "mobilenet_050.pb").stat().st_size
    assert from_tf_frozen(archive).config.alpha == 0.5
    monkeypatch.setattr(tf_frozen, "MAX_GRAPH_BYTES", size - 1)
    one_line_error(archive, rf"mobilenet_v1_0.5_160_frozen.pb declares {size} bytes, more than any GraphDef "
                            rf"can have \({size - 1}\)")
    one_line_error(crafted / "mobilenet_050.pb", rf"has {size} bytes, more than any GraphDef can have")


def test_a_graph_file_over_protobufs_2_gib_limit_is_refused_by_its_size_without_being_read(tmp_path):
    """protobuf refuses messages of 2 GiB or more (its limit is INT_MAX bytes), so no GraphDef is that large: a
    file of exactly 2^31 bytes (sparse: it takes no disk) is refused by its size alone.  Read, it would take 2 GiB
    of memory; the subprocess has 1 GiB of address space more than it started with, so reading it fails."""
    big = tmp_path / "mobilenet_v1_1.0_224_frozen.pb"
    with big.open("wb") as f:
        f.truncate(1 << 31)
    script = (
        "import resource, sys\nfrom mobilenets.weights.tf_frozen import from_tf_frozen\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n    from_tf_frozen(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", script, str(big)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH="src"))
    assert done.stdout.startswith("FrozenGraphError ") and (
        f"has {1 << 31} bytes, more than any GraphDef can have ({(1 << 31) - 1})" in done.stdout), (
        done.stdout + done.stderr[-2000:])


def test_not_a_tar_archive(tmp_path):
    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"not a tar archive at all" * 40)
    one_line_error(garbage, "not a readable tar archive")


def test_cli_reports_a_bad_graph_in_one_line(tmp_path):
    bad = tmp_path / "bad.pb"
    bad.write_bytes(varint(1 << 3 | 2) + varint(1 << 40))
    run = subprocess.run([sys.executable, "-m", "mobilenets", "convert", str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH="src"),
                         cwd=Path(__file__).parents[1], timeout=300)
    assert run.returncode == 2
    assert run.stderr.startswith("mobilenets: error: ") and len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------- the real photos are what they claim


def test_calibration_and_heldout_crops_are_disjoint_real_photos():
    calibration, heldout = real_data.calibration_crops(16), real_data.heldout_crops(16)
    assert calibration.shape == heldout.shape == (16, 224, 224, 3) and calibration.dtype == np.uint8
    assert not set(real_data.calibration_boxes(real_data.MAX_CALIBRATION)) & set(real_data.heldout_boxes(512))
    assert np.array_equal(real_data.calibration_crops(8), calibration[:8])  # a larger n extends a smaller one
    names = {name for name, _ in real_data.photos()}
    assert len(names) == 15 and {"astronaut.png", "chelsea.png", "grace_hopper.jpg"} <= names
    assert min(float(c.std()) for c in heldout) > 5  # crops of photos, not flat fills


# ---------------------------------------------------------------- hostile graphs, crafted on the wire (round two)


def test_a_graph_of_identity_ladders_converts_through_them(tmp_path):
    """Every rung of two ladders of 2,000 Identity nodes is read (by a Conv2D, by an unfused BatchNorm's AddV2):
    the input placeholder and the epsilon are still found through them.  The time this took (quadratic, 40 s
    for 8,000 nodes) is measured by benchmarks/frozen_graph_walk.py, not asserted here."""
    from graphdefs import float_attr, identity_ladders, mobilenet_graph

    path = tmp_path / "ladders.pb"
    path.write_bytes(mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3), extra=identity_ladders(8000)))
    converted = from_tf_frozen(path)
    assert (converted.config.alpha, converted.config.bn_eps, converted.meta.resolution) == (0.25, 1e-3, 128)


@pytest.mark.parametrize("eps_attr,match", [
    (b"\x2a\x0b\x0a\x07epsilon\x12\x00", r"FusedBatchNorm has an attribute epsilon that holds no float"),
    # an AttrValue whose float (field 4, fixed 32-bit) is cut after 2 of its 4 bytes
    (b"\x2a\x0e\x0a\x07epsilon\x12\x03\x25\x6f\x12", r"FusedBatchNorm has an attribute epsilon that holds no float"),
    (None, None),  # no attribute: TensorFlow's FusedBatchNorm applies its default, 1e-4
    ("nan", r"FusedBatchNorm gives BatchNorm an epsilon of nan; it must be a positive number"),
    ("-0.001", r"FusedBatchNorm gives BatchNorm an epsilon of -0.001"),
])
def test_a_fused_batchnorm_epsilon_that_is_empty_or_no_number_is_refused(tmp_path, eps_attr, match):
    from graphdefs import float_attr, mobilenet_graph

    if isinstance(eps_attr, str):
        eps_attr = float_attr("epsilon", float(eps_attr))
    path = tmp_path / "eps.pb"
    path.write_bytes(mobilenet_graph(eps_attr=eps_attr))
    if match is None:
        assert from_tf_frozen(path).config.bn_eps == 1e-4
    else:
        one_line_error(path, match)


@pytest.mark.parametrize("proto,match", [
    (dict(shape=(0,)), r"BatchNorm/batchnorm/add adds an epsilon of shape \(0,\) to the variance"),
    (dict(shape=(2,), float_val=[1e-3, 1e-3]), r"adds an epsilon of shape \(2,\)"),
    (dict(shape=()), r"batchnorm/add/y gives BatchNorm an epsilon of 0.0; it must be a positive number"),
    (dict(shape=(), float_val=[float("inf")]), r"an epsilon of inf"),
])
def test_an_unfused_batchnorm_epsilon_that_is_empty_or_not_one_number_is_refused(tmp_path, proto, match):
    from graphdefs import const, mobilenet_graph, node, tensor_proto

    scope = "MobilenetV1/MobilenetV1/Conv2d_1_pointwise/BatchNorm/batchnorm"
    extra = const(f"{scope}/add/y", proto=tensor_proto(**proto))
    extra += node(f"{scope}/add", "AddV2", ["MobilenetV1/Conv2d_1_pointwise/BatchNorm/moving_variance",
                                             f"{scope}/add/y"])
    path = tmp_path / "eps.pb"
    path.write_bytes(mobilenet_graph(eps_attr=None, extra=extra).replace(b"FusedBatchNorm", b"Relu6BatchNorm"))
    one_line_error(path, match)


@pytest.mark.parametrize("number", [1, 2, 3, 5])  # NodeDef's name, op, input and attr: each a string or message
def test_a_node_field_the_reader_uses_written_as_a_number_is_refused_naming_the_field(tmp_path, number):
    """A damaged node carries a varint (wire type 0) where NodeDef has a length-delimited field (2): refused as an
    unreadable graph naming the field, not read as 7 NUL bytes (what ``bytes(7)`` would make of the number)."""
    from graphdefs import field, mobilenet_graph, varint

    parts = {1: field(1, b"MobilenetV1/extra"), 2: field(2, b"Identity"), 3: field(3, b"input")}
    parts[number] = varint(number << 3 | 0) + varint(7)
    path = tmp_path / "damaged.pb"
    path.write_bytes(mobilenet_graph(extra=field(1, b"".join(parts[k] for k in sorted(parts)))))
    one_line_error(path, rf"not a readable TensorFlow GraphDef \(field {number} has wire type 0, expected 2\)")


def _first_layers_kernel_as(op: str) -> bytes:
    from graphdefs import node

    return node("MobilenetV1/Conv2d_0/weights", op, ["input"])


def _a_beta_without_its_value() -> bytes:
    from graphdefs import const, node
    from weights_helpers import tf_slim_variables

    beta = "MobilenetV1/Conv2d_3_depthwise/BatchNorm/beta"
    return b"".join(node(name, "Const") if name == beta else const(name, value)
                    for name, value in tf_slim_variables(0.25).items())


def _two_epsilons() -> bytes:
    from graphdefs import float_attr, mobilenet_graph, node

    other = node("MobilenetV1/MobilenetV1/Conv2d_1_depthwise/BatchNorm/FusedBatchNorm", "FusedBatchNorm",
                 ["MobilenetV1/MobilenetV1/Conv2d_1_depthwise/depthwise"], float_attr("epsilon", 1e-5))
    return mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3), extra=other)


def _a_node_without_a_name() -> bytes:
    from graphdefs import field, mobilenet_graph

    return mobilenet_graph(extra=field(1, field(2, b"Identity") + field(3, b"input")))


@pytest.mark.parametrize("graph, match", [
    (lambda: _first_layers_kernel_as("Identity"),
     r"MobilenetV1/Conv2d_0/weights is a Identity node, not a constant; expected a frozen graph"),
    (_a_beta_without_its_value, r"constant MobilenetV1/Conv2d_3_depthwise/BatchNorm/beta is unreadable \(its value "
                                r"attribute holds no tensor\); the file is damaged"),
    (_two_epsilons, r"its BatchNorm layers use different epsilons \[1e-05, 0.001\]; a MobileNet v1 uses one"),
    (_a_node_without_a_name, r"not a readable TensorFlow GraphDef \(a node without a name\)")])
def test_a_graph_that_is_not_one_frozen_mobilenet_is_refused_saying_why(tmp_path, graph, match):
    """Graphs TensorFlow could hold but no frozen MobileNet v1 is: the first kernel computed by another node, a
    constant with no value, BatchNorm layers of two epsilons, a node with no name; each refused in one line."""
    path = tmp_path / "graph.pb"
    path.write_bytes(graph())
    one_line_error(path, match)


def test_a_graph_path_that_is_missing_or_a_folder_is_refused_saying_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none.pb does not exist"):
        from_tf_frozen(tmp_path / "none.pb")
    (tmp_path / "folder.pb").mkdir()
    one_line_error(tmp_path / "folder.pb", r"is not a regular file; pass a frozen graph .pb or its release .tgz")


def test_filled_constants_are_bounded_by_the_graph_they_come_from(tmp_path):
    """Every variable of an alpha-2 MobileNet filled from one listed value: each fits the 24 MB graph (padded
    with zeros) and the architecture, but together they claim 51 MB that the file never held."""
    from graphdefs import const, tensor_proto
    from weights_helpers import tf_slim_variables

    def alpha_2(name, shape):  # alpha 1's shapes with every channel count doubled
        if name.endswith("Conv2d_0/weights"):
            return shape[:3] + (2 * shape[3],)
        if name.endswith("depthwise_weights"):
            return shape[:2] + (2 * shape[2], 1)
        if name.endswith("Logits/Conv2d_1c_1x1/weights"):
            return shape[:2] + (2 * shape[2], shape[3])
        if name.endswith("/weights"):
            return shape[:2] + (2 * shape[2], 2 * shape[3])
        return shape if "Logits" in name else (2 * shape[0],)

    graph = b"".join(const(name, proto=tensor_proto(alpha_2(name, np.shape(v)), float_val=[0.5]))
                     for name, v in tf_slim_variables(1.0).items())
    graph += const("padding", proto=tensor_proto((6 << 20,), bytes(24 << 20)))
    path = tmp_path / "filled.pb"
    path.write_bytes(graph)
    message = one_line_error(path, r"its constants up to MobilenetV1/\S+ declare more bytes than the graph's "
                                   r"[\d,]+ \(filled from a few listed values\): not a trained model's weights")
    assert "Conv2d_13_pointwise" in message or "Conv2d_12_pointwise" in message or "Conv2d_13_depthwise" in message


@pytest.mark.parametrize("excess_mib, refused", [(3, False), (6, True)])  # the 4 MiB slack halved or doubled
def test_constants_may_declare_4_mib_more_than_the_graph_holds_and_no_more(tmp_path, excess_mib, refused):
    """Every variable of a 1.0 MobileNet filled from one listed value (16 MB declared), in a graph padded to
    3 or 6 MiB less than that: within the 4 MiB slack for repeated BatchNorm values it converts, beyond it it
    is refused; a slack of 2 or 8 MiB would put one of the two on the other side."""
    from graphdefs import const, tensor_proto
    from weights_helpers import tf_slim_variables

    variables = tf_slim_variables(1.0)
    declared = sum(int(np.prod(np.shape(v))) * 4 for v in variables.values())
    graph = b"".join(const(name, proto=tensor_proto(np.shape(v), float_val=[0.5])) for name, v in variables.items())
    pad = declared - (excess_mib << 20) - len(graph) - 64  # the padding constant's own header: under 64 bytes
    graph += const("padding", proto=tensor_proto((pad // 4,), bytes(pad // 4 * 4)))
    assert declared - (excess_mib << 20) - 64 <= len(graph) <= declared - (excess_mib << 20)
    path = tmp_path / "filled.pb"
    path.write_bytes(graph)
    if refused:
        one_line_error(path, r"declare more bytes than the graph's [\d,]+ \(filled from a few listed values\)")
    else:
        assert from_tf_frozen(path).config.alpha == 1.0


def test_a_filled_constant_costs_its_declared_size_once():
    """TensorFlow's fill (the last listed value repeated) and packed varints decode straight into the array:
    an int8 constant of 2^24 elements from one int_val, a packed int32 list, as TensorFlow reads them."""
    import tracemalloc

    from graphdefs import field, varint
    from mobilenets.formats.tensorflow import tensor

    dims = field(2, varint(1 << 3) + varint(1 << 24))
    proto = varint(1 << 3) + varint(6) + field(2, dims) + varint(7 << 3) + varint(5)  # DT_INT8, int_val: 5
    tracemalloc.start()
    array = tensor(memoryview(proto), 1 << 30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert array.dtype == np.int8 and array.shape == (1 << 24,) and (array == 5).all()
    assert peak < (1 << 24) * 1.1  # the int8 array itself (16 MiB); int64 intermediates were 8 times that
    packed = [-3, 0, 1 << 20, 127, -(1 << 31)]
    payload = b"".join(varint(v & ((1 << 64) - 1)) for v in packed)
    proto = (varint(1 << 3) + varint(3) + field(2, field(2, varint(1 << 3) + varint(6)))
             + field(7, payload))  # DT_INT32, shape (6,), int_val packed: the last value repeats
    assert tensor(memoryview(proto), 1 << 20).tolist() == packed + [packed[-1]]


@pytest.mark.parametrize("control", [False, True])
def test_an_unfused_batchnorm_epsilon_is_read_from_the_add_even_with_a_control_input(tmp_path, control):
    """slim's unfused batch_norm adds epsilon to moving_variance; an add that also waits on a control input
    ("^name", as graphs with update ops give it) still adds the same two values: 1e-5 here, not slim's 1e-3."""
    from graphdefs import const, mobilenet_graph, node

    scope = "MobilenetV1/MobilenetV1/Conv2d_1_pointwise/BatchNorm/batchnorm"
    extra = const(f"{scope}/add/y", np.array(1e-5, np.float32))
    extra += node(f"{scope}/add", "AddV2", ["MobilenetV1/Conv2d_1_pointwise/BatchNorm/moving_variance",
                                             f"{scope}/add/y"] + (["^input"] if control else []))
    path = tmp_path / "eps.pb"
    path.write_bytes(mobilenet_graph(eps_attr=None, extra=extra).replace(b"FusedBatchNorm", b"Relu6BatchNorm"))
    assert from_tf_frozen(path).config.bn_eps == 1e-5


def test_an_unfused_batchnorm_epsilon_computed_by_a_node_is_refused_naming_it(tmp_path):
    """An epsilon the graph computes (a Cast of a float64 1e-5) is not a number the converter can read: refused,
    naming the add and the node, rather than converted with slim's 1e-3 in its place."""
    from graphdefs import const, mobilenet_graph, node

    scope = "MobilenetV1/MobilenetV1/Conv2d_1_pointwise/BatchNorm/batchnorm"
    extra = const(f"{scope}/add/y64", np.array(1e-5, np.float64))
    extra += node(f"{scope}/add/y", "Cast", [f"{scope}/add/y64"])
    extra += node(f"{scope}/add", "AddV2", ["MobilenetV1/Conv2d_1_pointwise/BatchNorm/moving_variance",
                                             f"{scope}/add/y"])
    path = tmp_path / "cast.pb"
    path.write_bytes(mobilenet_graph(eps_attr=None, extra=extra).replace(b"FusedBatchNorm", b"Relu6BatchNorm"))
    with pytest.raises(FrozenGraphError, match=rf"{scope}/add adds '{scope}/add/y', a Cast node, to the variance"):
        from_tf_frozen(path)


@pytest.mark.parametrize("dims", [(1, -1, -1, 3), (-1, 160, 192, 3)])
def test_an_input_of_unknown_or_unequal_sides_gives_no_resolution(tmp_path, dims):
    """Only a known, square input size is the model's resolution: a placeholder of unknown height and width (as
    graphs exported for any size have) or of 160 x 192 leaves it to the caller or the default, 224."""
    from graphdefs import float_attr, mobilenet_graph

    path = tmp_path / "input.pb"
    path.write_bytes(mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3), dims=dims))
    assert from_tf_frozen(path).meta.resolution == 224
    assert from_tf_frozen(path, resolution=96).meta.resolution == 96


def test_a_node_reading_nodes_absent_from_the_graph_is_passed_over(tmp_path):
    """A pruned graph may keep a node whose inputs were removed: outside the network it changes nothing (the
    same weights, epsilon and resolution as without it), and walking from it names no missing node."""
    from graphdefs import float_attr, mobilenet_graph, node

    plain, stray = tmp_path / "plain.pb", tmp_path / "stray.pb"
    plain.write_bytes(mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3)))
    stray.write_bytes(mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3),
                                      extra=node("pruned/add", "AddV2", ["gone/a", "gone/b"])))
    a, b = from_tf_frozen(plain), from_tf_frozen(stray)
    assert (b.config.bn_eps, b.meta.resolution) == (a.config.bn_eps, a.meta.resolution) == (1e-3, 128)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
