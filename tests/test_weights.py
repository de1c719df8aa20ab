"""Converting, saving, loading and fetching weights: metadata, checksums, clear errors, no code from files.

Logit parity with Keras, TF-slim and timm is in test_parity.py; here the
files are written in the released layouts directly (tests/weights_helpers.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import mobilenets
from mobilenets import cache, checkpoint, cli, weights
from mobilenets.checkpoint import CheckpointError
from mobilenets.formats.sstable import snappy_decompress
from mobilenets.weights.tf_checkpoint import find_prefix
from mobilenets.weights import WeightsError

from weights_helpers import Server, write_keras2_h5


def forward(model, resolution=64, seed=0):
    x = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    return write_keras2_h5(tmp_path_factory.mktemp("keras") / "mobilenet_2_5_128_tf.h5", 0.25)


@pytest.fixture(scope="module")
def converted_file(keras_file, tmp_path_factory):
    return weights.save(weights.convert("keras", keras_file), tmp_path_factory.mktemp("conv") / "m.safetensors")


# ---------------------------------------------------------------- conversion and metadata


def test_keras_conversion_infers_alpha_resolution_classes_and_records_metadata(converted_file):
    from safetensors import safe_open

    with safe_open(str(converted_file), framework="pt") as f:
        raw = f.metadata()
    assert all(isinstance(v, str) for v in raw.values())  # safetensors metadata is str -> str
    config = json.loads(raw["config"])
    assert config["alpha"] == 0.25 and config["num_classes"] == 1000
    assert config["padding"] == "tf_same" and config["bn_eps"] == 1e-3 and config["activation"] == "relu6"
    assert json.loads(raw["resolution"]) == 128  # from mobilenet_2_5_128_tf.h5
    assert json.loads(raw["normalization"]) == {"mean": [0.5] * 3, "std": [0.5] * 3}  # x / 127.5 - 1
    labels = json.loads(raw["labels"])
    assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca" and labels[281] == "tabby, tabby cat"
    assert raw["source"] == "keras:mobilenet_2_5_128_tf.h5"
    assert len(raw["sha256"]) == 64

    model = mobilenets.load(converted_file)
    assert not model.training
    assert model.meta.resolution == 128 and model.meta.labels == tuple(labels)


def test_keras_weights_land_where_the_layout_says(keras_file):
    """HWIO -> OIHW, depthwise HWC1 -> C1HW, the 1x1 conv head -> Linear; BN by name."""
    import h5py

    c = weights.convert("keras", keras_file)
    with h5py.File(keras_file) as f:
        dw = np.asarray(f["conv_dw_5"]["conv_dw_5/depthwise_kernel:0"])
        pw = np.asarray(f["conv_pw_5"]["conv_pw_5/kernel:0"])
        var = np.asarray(f["conv_pw_5_bn"]["conv_pw_5_bn/moving_variance:0"])
        head = np.asarray(f["conv_preds"]["conv_preds/kernel:0"])
        stem = np.asarray(f["conv1"]["conv1/kernel:0"])
    sd = c.state_dict
    # the 3x3 stem in full: HWIO (kh, kw, in, out) -> OIHW, kh stays the row axis
    np.testing.assert_array_equal(sd["features.0.conv.weight"].numpy(), stem.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["features.5.depthwise.conv.weight"][7, 0].numpy(), dw[:, :, 7, 0])
    np.testing.assert_array_equal(sd["features.5.pointwise.conv.weight"][3, 9, 0, 0].numpy(), pw[0, 0, 9, 3])
    np.testing.assert_array_equal(sd["features.5.pointwise.bn.running_var"].numpy(), var)
    np.testing.assert_array_equal(sd["classifier.weight"][17].numpy(), head[0, 0, :, 17])


def test_keras_no_top_gives_a_feature_model(tmp_path):
    src = write_keras2_h5(tmp_path / "mobilenet_5_0_160_tf_no_top.h5", 0.5, include_top=False)
    c = weights.convert("keras", src)
    assert c.config.num_classes == 0 and c.meta.labels is None and c.meta.resolution == 160
    assert forward(c.model()).shape == (2, 512)


def test_resolution_defaults_to_224_and_can_be_given(tmp_path):
    src = write_keras2_h5(tmp_path / "weights.h5", 0.25)
    assert weights.convert("keras", src).meta.resolution == 224
    assert weights.convert("keras", src, resolution=96).meta.resolution == 96


def test_keras3_legacy_names_are_accepted(tmp_path, keras_file):
    """Keras 3's legacy writer drops ':0' and calls the depthwise kernel 'kernel'."""
    import h5py

    k3 = tmp_path / "k3.h5"
    with h5py.File(keras_file) as src, h5py.File(k3, "w") as dst:
        dst.attrs["layer_names"] = src.attrs["layer_names"]
        for name in src.attrs["layer_names"]:
            name = name.decode()
            g = dst.create_group(name)
            new = []
            for w in src[name].attrs["weight_names"]:
                short = w.decode().split("/")[-1].split(":")[0].replace("depthwise_kernel", "kernel")
                g.create_dataset(f"{name}/{short}", data=np.asarray(src[name][w.decode()]))
                new.append(f"{name}/{short}".encode())
            g.attrs["weight_names"] = np.array(new, dtype="S")
    a, b = weights.convert("keras", keras_file), weights.convert("keras", k3)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_alpha_is_inferred_for_every_released_width(tmp_path):
    for alpha in (1.0, 0.75, 0.5, 0.25):
        src = write_keras2_h5(tmp_path / f"a{alpha}.h5", alpha, include_top=False)
        assert weights.convert("keras", src).config.alpha == alpha


def test_timm_conversion_and_cli(tmp_path):
    pytest.importorskip("timm")
    from timm.models.efficientnet import _gen_mobilenet_v1

    theirs = _gen_mobilenet_v1("mobilenetv1_100", channel_multiplier=0.25, pretrained=False).eval()
    src = tmp_path / "timm.pth"
    torch.save({"state_dict": theirs.state_dict()}, src)  # a training-script wrapper around the state dict
    out = tmp_path / "timm.safetensors"
    assert cli.main(["convert", "--from", "timm", str(src), "--out", str(out)]) == 0
    model = mobilenets.load(out)
    assert model.config.bn_eps == 1e-5 and model.config.padding == "symmetric"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), theirs(x))


def test_convert_cli_rejects_unknown_source_in_one_line(tmp_path, capsys):
    assert cli.main(["convert", "--from", "caffe", "x", "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "keras" in err and "tf-slim" in err


# ---------------------------------------------------------------- loading: checkpoints, errors, no code


def test_load_reads_training_checkpoints(tmp_path):
    model = mobilenets.mobilenet_v1(0.25, num_classes=10)
    obj = {"format": "mobilenets", "version": 1, "config": model.config.to_dict(), "state_dict": model.state_dict(),
           "meta": {"resolution": 96, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
                    "labels": [str(i) for i in range(10)], "source": "train"}, "epoch": 3}
    checkpoint.save(obj, tmp_path / "ckpt.pt")
    loaded = mobilenets.load(tmp_path / "ckpt.pt")
    assert not loaded.training and loaded.meta.resolution == 96 and loaded.config.num_classes == 10
    assert torch.equal(forward(loaded, 96), forward(model, 96))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("how", ["load", "convert-timm"])
def test_pickles_with_code_are_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load .* run code"):
        if how == "load":
            mobilenets.load(evil)
        else:
            weights.convert("timm", evil)
    assert not marker.exists()


def _timm_without(drop=(), add=None) -> dict:
    from timm.models.efficientnet import _gen_mobilenet_v1

    sd = _gen_mobilenet_v1("mobilenetv1_100", channel_multiplier=0.25, pretrained=False).state_dict()
    sd = {k: v for k, v in sd.items() if not any(k.startswith(d) for d in drop)}
    sd.update(add or {})
    return sd


def test_shape_mismatches_name_the_tensor_and_both_shapes(tmp_path):
    torch.save(_timm_without(add={"blocks.1.0.conv_pw.weight": torch.zeros(40, 16, 1, 1)}), tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"features\.2\.pointwise\.conv\.weight: file has \(40, 16, 1, 1\), "
                                           r"alpha 0\.25 expects \(32, 16, 1, 1\)"):
        weights.convert("timm", tmp_path / "bad.pth")


@pytest.mark.parametrize("case, match", [
    (dict(add={"conv_head.weight": torch.zeros(8, 256, 1, 1)}), r"has a conv_head \(timm's mobilenetv1_100h\)"),
    (dict(drop=["conv_stem."]), r"is not a timm MobileNet v1 state dict \(no conv_stem.weight; keys start \['blocks.0.0.bn1.bias'"),
    (dict(add={"blocks.x.0.conv_dw.weight": torch.zeros(1)}), r"block keys must be blocks.<stage>.<index>.\*"),
    (dict(drop=["blocks.4.1."]), r"expected 13 separable blocks \(blocks.s.i\), found 12"),
    (dict(drop=["blocks.2.1.conv_pw."]), r"no tensor blocks.2.1.conv_pw.weight"),
    (dict(drop=["classifier.bias"]), r"classifier.weight without classifier.bias")])
def test_a_timm_state_dict_missing_or_adding_a_part_is_refused_naming_it(tmp_path, case, match):
    """timm's own mobilenetv1_100 (alpha 0.25) state dict, with one part taken away or one foreign part added:
    each refused in one line that names what is wrong, where the untouched dict converts (test above)."""
    path = tmp_path / "damaged.pth"
    torch.save(_timm_without(**case), path)
    with pytest.raises(WeightsError, match=match):
        weights.convert("timm", path)


def test_missing_layer_is_named(tmp_path, keras_file):
    import h5py

    broken = tmp_path / "broken.h5"
    broken.write_bytes(keras_file.read_bytes())
    with h5py.File(broken, "a") as f:
        names = [n for n in f.attrs["layer_names"] if n != b"conv_pw_7_bn"]
        f.attrs["layer_names"] = np.array(names)
    with pytest.raises(WeightsError, match="no layer conv_pw_7_bn"):
        weights.convert("keras", broken)


def _list(group, attr, name, keep: bool = True):
    """``name`` added to (or, ``keep`` False, taken out of) the list attribute ``attr`` of an HDF5 group."""
    others = [n for n in group.attrs[attr] if n != name.encode()]
    group.attrs[attr] = np.array(others + [name.encode()] if keep else others)


def _int_kernel(f):
    del f["conv_dw_3/conv_dw_3/depthwise_kernel:0"]
    f["conv_dw_3/conv_dw_3"].create_dataset("depthwise_kernel:0", data=np.zeros((3, 3, 16, 1), "i4"))


def _no_bias(f):
    del f["conv_preds/conv_preds/bias:0"]
    _list(f["conv_preds"], "weight_names", "conv_preds/bias:0", keep=False)


@pytest.mark.parametrize("damage, match", [
    # a kernel stored as integers: no Keras file holds one, and casting it would read nonsense as weights
    (_int_kernel, r"dataset /conv_dw_3/conv_dw_3/depthwise_kernel:0 has dtype int32, expected floats"),
    (lambda f: _list(f, "layer_names", "conv_pw_14"), r"layer 'conv_pw_14' is listed in layer_names but not stored"),
    (lambda f: _list(f["conv_pw_2_bn"], "weight_names", "conv_pw_2_bn/gamma_2:0"),
     r"weight conv_pw_2_bn/conv_pw_2_bn/gamma_2:0 is listed but not stored"),
    (_no_bias, r"layer conv_preds needs a kernel and a bias \(found \['kernel'\]\)")])
def test_a_keras_file_whose_lists_and_datasets_disagree_is_refused_naming_the_entry(tmp_path, keras_file, damage,
                                                                                     match):
    """Keras 2's HDF5 layout (layer_names and each layer's weight_names, then the datasets), damaged one entry at
    a time as h5py lets anyone write it: each refused in one line naming the entry, where the file converts."""
    import h5py

    broken = tmp_path / "broken.h5"
    broken.write_bytes(keras_file.read_bytes())
    with h5py.File(broken, "a") as f:
        damage(f)
    with pytest.raises(WeightsError, match=match):
        weights.convert("keras", broken)


def test_a_keras_path_that_is_missing_or_a_folder_is_refused_saying_what_to_pass(tmp_path):
    with pytest.raises(weights.MissingWeightsError, match=rf"{tmp_path / 'none.h5'} does not exist"):
        weights.convert("keras", tmp_path / "none.h5")
    (tmp_path / "folder.h5").mkdir()
    with pytest.raises(WeightsError, match=r"folder.h5 is not a regular file; pass a weights file"):
        weights.convert("keras", tmp_path / "folder.h5")


def _shapes(alpha: float, num_classes: int = 1000) -> dict:
    from mobilenets.model import MobileNetV1Config
    from mobilenets.weights.layout import meta_shapes

    return meta_shapes(MobileNetV1Config(alpha=alpha, num_classes=num_classes))  # on the meta device: no memory


def test_the_config_read_from_shapes_is_bounded_at_alpha_4_and_100000_classes():
    """infer_config reads alpha from the last layer's width and the classes from the head; the bounds are the
    architecture's own (alpha <= 4, <= 100,000 classes), tested at the bound and one past it, and a file whose
    tensors are those of a model plus or minus one is refused naming them."""
    from mobilenets.weights.layout import infer_config

    assert infer_config(_shapes(4.0)).alpha == 4.0
    assert infer_config(_shapes(0.25, num_classes=100_000)).num_classes == 100_000
    past_width = dict(_shapes(4.0), **{"features.13.pointwise.conv.weight": (4097, 4096, 1, 1)})
    with pytest.raises(WeightsError, match=r"4097 channels and 1000 classes are beyond what this library loads "
                                           r"\(alpha <= 4, num_classes <= 100000\)"):
        infer_config(past_width, name="wide.h5")
    with pytest.raises(WeightsError, match=r"256 channels and 100001 classes are beyond"):
        infer_config(dict(_shapes(0.25), **{"classifier.weight": (100_001, 256)}))
    with pytest.raises(WeightsError, match=r"no last pointwise layer \(features.13.pointwise\) found"):
        infer_config({k: v for k, v in _shapes(0.25).items() if not k.startswith("features.13.pointwise")})
    with pytest.raises(WeightsError, match=r"tensors missing \[\], unexpected \['features.14.conv.weight'\]"):
        infer_config(dict(_shapes(0.5), **{"features.14.conv.weight": (8, 8, 1, 1)}))
    with pytest.raises(WeightsError, match=r"tensors missing \['classifier.bias'\], unexpected \[\]"):
        infer_config({k: v for k, v in _shapes(0.5).items() if k != "classifier.bias"})


def test_only_a_whole_mobilenet_is_converted_from_a_model_and_only_its_own_options_change_it():
    from mobilenets.errors import ParameterTypeError
    from mobilenets.weights.layout import Converted

    with pytest.raises(WeightsError, match=r"expected a mobilenets MobileNetV1 model, got Conv2d"):
        Converted.from_model(torch.nn.Conv2d(3, 8, 3))
    backbone = mobilenets.mobilenet_v1(0.25, num_classes=10)
    backbone.prune_intermediate_layers([1])  # keeps the layers up to feature level 1
    with pytest.raises(WeightsError, match=r"this model is a pruned backbone"):
        Converted.from_model(backbone)
    converted = Converted.from_model(mobilenets.mobilenet_v1(0.25, num_classes=10))
    assert converted.model(dropout=0.2).config.dropout == 0.2
    with pytest.raises(ParameterTypeError, match=r"unknown model option\(s\) drop_rate, widht"):
        converted.model(widht=0.5, drop_rate=0.2)


def test_asking_for_the_classes_the_weights_have_keeps_their_classifier_and_another_count_gets_a_new_one():
    """num_classes as a model option: the weights' own count (1000, given as a number parsed from text, as the
    CLI and a config file give it) keeps the stored classifier; 10 gets a fresh 10-class head on the
    same body, for fine-tuning."""
    from mobilenets.weights.layout import Converted

    stored = mobilenets.mobilenet_v1(0.25)  # 1000 classes, ImageNet's labels
    torch.nn.init.normal_(stored.classifier.bias, generator=torch.Generator().manual_seed(0))
    converted = Converted.from_model(stored.eval())
    same = converted.model(num_classes=int("1000"))
    assert torch.equal(same.classifier.weight, stored.classifier.weight)
    assert torch.equal(same.classifier.bias, stored.classifier.bias)
    other = converted.model(num_classes=10)
    assert other.classifier.weight.shape[0] == 10 and not torch.equal(other.classifier.bias, stored.classifier.bias[:10])
    assert torch.equal(other.features[13].pointwise.conv.weight, stored.features[13].pointwise.conv.weight)


def test_checkpoint_mismatch_names_tensor_and_shapes(tmp_path):
    model = mobilenets.mobilenet_v1(0.25)
    sd = model.state_dict()
    sd["classifier.bias"] = torch.zeros(7)
    checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(), "state_dict": sd,
                     "meta": {}}, tmp_path / "c.pt")
    with pytest.raises(WeightsError, match=r"classifier\.bias: file has \(7,\), the config expects \(1000,\)"):
        mobilenets.load(tmp_path / "c.pt")


def test_corrupted_converted_file_is_detected(tmp_path, converted_file):
    data = bytearray(converted_file.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        mobilenets.load(bad)


@pytest.mark.parametrize("kind", ["h5", "text", "foreign-safetensors", "keras3-native"])
def test_unloadable_files_say_what_would_work(tmp_path, keras_file, kind):
    if kind == "h5":
        path, match = keras_file, "mobilenets convert --from keras"
    elif kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        match = "cannot read"
    elif kind == "foreign-safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "x.safetensors"
        save_file({"w": torch.zeros(2)}, str(path))
        match = "without mobilenets metadata"
    else:
        import h5py

        path = tmp_path / "m.weights.h5"
        with h5py.File(path, "w") as f:
            f.create_group("layers/conv2d/vars")
        with pytest.raises(WeightsError, match=r"Keras 3 '\.weights\.h5'"):
            weights.convert("keras", path)
        return
    with pytest.raises((WeightsError, CheckpointError), match=match):
        mobilenets.load(path)


def test_builder_with_weights_keeps_body_and_can_replace_the_head(converted_file):
    base = mobilenets.mobilenet_v1(0.25, weights=converted_file)
    assert base.config.padding == "tf_same" and base.meta.resolution == 128
    tuned = mobilenets.mobilenet_v1(0.25, weights=converted_file, num_classes=10, dropout=0.2)
    assert tuned.config.num_classes == 10 and tuned.config.dropout == 0.2 and tuned.meta.labels is None
    assert torch.equal(tuned.features[13].pointwise.bn.running_var, base.features[13].pointwise.bn.running_var)
    with pytest.raises(WeightsError, match="alpha 0.25 weights, not alpha 0.5"):
        mobilenets.mobilenet_v1(0.5, weights=converted_file)
    with pytest.raises(WeightsError, match="padding='symmetric' conflicts"):
        mobilenets.mobilenet_v1(0.25, weights=converted_file, padding="symmetric")
    # a training setting the model refuses is refused as these weights' error, naming the file and the value
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(converted_file))}: dropout must be in \[0, 1\), got 1.5$"):
        mobilenets.weights.load(converted_file, dropout=1.5)


def test_builder_without_weights_is_the_plain_model():
    model = mobilenets.mobilenet_v1(0.5, num_classes=10)
    assert model.config.alpha == 0.5 and model.config.num_classes == 10 and model.meta.labels is None


# ---------------------------------------------------------------- TF checkpoint reader pieces


def test_crc32c_known_values():
    from mobilenets.formats.sstable import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    data = bytes(range(256)) * 100 + b"tail"  # several 4096-byte chunks and a tail: the chained path
    reg = 0xFFFFFFFF
    for b in data:  # bit by bit, the definition
        reg ^= b
        for _ in range(8):
            reg = (reg >> 1) ^ 0x82F63B78 if reg & 1 else reg >> 1
    assert crc32c(data) == reg ^ 0xFFFFFFFF


def test_snappy_blocks_decode():
    # "abc" as a literal, then a 9-byte copy from 3 back (overlapping its own output)
    assert snappy_decompress(b"\x0c\x08abc\x15\x03") == b"abcabcabcabc"


def test_checkpoint_prefix_forms(tmp_path):
    (tmp_path / "model.ckpt.index").write_bytes(b"")
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"")
    prefix = str(tmp_path / "model.ckpt")
    for form in (prefix, prefix + ".index", prefix + ".data-00000-of-00001", str(tmp_path)):
        assert find_prefix(form) == prefix
    with pytest.raises(FileNotFoundError, match="not a TensorFlow checkpoint"):
        find_prefix(tmp_path / "other")
    with pytest.raises(ValueError, match="not an SSTable"):
        weights.convert("tf-slim", prefix)


# ---------------------------------------------------------------- pretrained: a server on 127.0.0.1


@pytest.fixture()
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    s = Server(folder)
    s.folder = folder
    yield s
    s.close()


def test_pretrained_downloads_verifies_converts_once(server, tmp_path, monkeypatch, capsys):
    src = write_keras2_h5(server.folder / "mobilenet_2_5_128_tf.h5", 0.25, seed=3)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))

    model = mobilenets.mobilenet_v1(alpha=0.25, weights="imagenet", resolution=128)
    assert server.requests == ["/mobilenet_2_5_128_tf.h5"]
    assert "downloading mobilenet_2_5_128_tf.h5" in capsys.readouterr().err
    assert (cache / "mobilenet_2_5_128_tf.h5").read_bytes() == src.read_bytes()
    assert (cache / "mobilenet_2_5_128_tf.safetensors").is_file()
    recorded = json.loads((cache / "sha256.json").read_text())
    assert set(recorded) == {"mobilenet_2_5_128_tf.h5"}
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left
    assert model.meta.resolution == 128 and model.meta.source == "keras:mobilenet_2_5_128_tf.h5"
    assert torch.equal(forward(model, 128), forward(weights.convert("keras", src).model(), 128))

    (cache / "mobilenet_2_5_128_tf.h5").unlink()  # the converted file is enough from now on
    again = mobilenets.mobilenet_v1(alpha=0.25, weights="imagenet", resolution=128)
    assert server.requests == ["/mobilenet_2_5_128_tf.h5"]
    assert torch.equal(forward(again, 128), forward(model, 128))


def test_pretrained_detects_a_changed_download(server, tmp_path, monkeypatch):
    write_keras2_h5(server.folder / "mobilenet_2_5_160_tf.h5", 0.25, seed=1)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))
    weights.pretrained(0.25, 160, progress=False)
    # the file changes on disk and the cached conversion is gone: its recorded sha256 catches it
    (cache / "mobilenet_2_5_160_tf.safetensors").unlink()
    write_keras2_h5(cache / "mobilenet_2_5_160_tf.h5", 0.25, seed=2)
    with pytest.raises(WeightsError, match="first download had"):
        weights.pretrained(0.25, 160, progress=False)


def test_a_pinned_sha256_is_checked_and_nothing_is_recorded(tmp_path):
    """A registry entry that pins a digest: the file must have exactly it (hashlib's, computed here)."""
    import hashlib

    from mobilenets.weights import download

    path = write_keras2_h5(tmp_path / "mobilenet_2_5_128_tf.h5", 0.25)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert download.verify_sha256(path, pinned=digest) == digest
    wrong = digest[::-1]
    with pytest.raises(WeightsError, match=f"released file has {wrong[:12]}"):
        download.verify_sha256(path, pinned=wrong)
    assert not (tmp_path / download.RECORD).exists()  # a pinned digest needs no first-use record


def test_pretrained_rejects_what_is_not_hdf5_and_keeps_nothing(server, tmp_path, monkeypatch):
    (server.folder / "mobilenet_2_5_192_tf.h5").write_text("<html>rate limited</html>")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))
    with pytest.raises(WeightsError, match="not an HDF5 file"):
        weights.pretrained(0.25, 192, progress=False)
    assert list(cache.iterdir()) == []


def test_pretrained_offline_says_which_file_and_where(tmp_path, monkeypatch, server):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)  # serves nothing: 404
    with pytest.raises(WeightsError) as e:
        weights.pretrained(0.5, 160, progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert f"{server.url}mobilenet_5_0_160_tf.h5" in message and str(cache / "mobilenet_5_0_160_tf.h5") in message
    assert list(cache.iterdir()) == []
    server.close()
    server.close = lambda: None
    with pytest.raises(WeightsError, match="download that file yourself and put it at"):
        weights.pretrained(0.5, 160, progress=False)


def test_pretrained_uses_a_file_placed_by_hand(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_keras2_h5(cache / "mobilenet_7_5_128_tf.h5", 0.75)
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", "http://127.0.0.1:9/")  # would fail if it were used
    model = mobilenets.mobilenet_v1(0.75, weights="imagenet", resolution=128)
    assert model.config.alpha == 0.75


def test_pretrained_sizes_are_checked_first():
    with pytest.raises(WeightsError, match=r"alpha in \[0.25, 0.5, 0.75, 1.0\] and resolution in \[224, 192, 160, 128\]"):
        mobilenets.mobilenet_v1(0.35, weights="imagenet")
    with pytest.raises(WeightsError, match="resolution=100"):
        mobilenets.mobilenet_v1(0.5, weights="imagenet", resolution=100)


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("MOBILENETS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_dir() == Path.home() / ".cache" / "mobilenets"
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path


def test_imagenet_labels_ship_with_the_package():
    labels = weights.imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca" and labels[999].startswith("toilet tissue")



def test_a_truncated_keras_file_is_one_line_naming_what_h5py_found(tmp_path, keras_file):
    """A Keras file cut in half: the converter's error is one line ending in h5py's own first line for that file
    (read here with h5py), not a traceback."""
    import h5py

    bad = tmp_path / "mobilenet_0_25_128_tf.h5"
    content = keras_file.read_bytes()
    bad.write_bytes(content[:len(content) // 2])
    with pytest.raises(OSError) as found:
        h5py.File(bad, "r")
    first = str(found.value).splitlines()[0]
    with pytest.raises(WeightsError) as raised:
        weights.convert("keras", bad)
    assert str(raised.value).endswith(f"cannot read {bad} as a Keras HDF5 file: {first}")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("option,message", [("bn_eps", "bn_eps must be in (0, 1)"),
                                            ("padding", "padding must be one of")])
def test_a_files_out_of_range_setting_is_a_weights_error_naming_the_file(option, message):
    """A converter passes the settings it read from the file (a frozen graph's BatchNorm epsilon, its padding) to
    infer_config; a value the model refuses is a WeightsError naming the file and the setting, not a
    traceback from the model's constructor."""
    from mobilenets.weights.layout import infer_config, meta_shapes

    shapes = meta_shapes(mobilenets.mobilenet_v1(0.25, num_classes=10).config)
    with pytest.raises(WeightsError) as raised:
        infer_config(shapes, name="graph.pb", **{option: {"bn_eps": 2.0, "padding": "valid"}[option]})
    assert str(raised.value).startswith(f"graph.pb: {message}")


@pytest.mark.parametrize("first_shape", [(8,), (8, 3), (8, 3, 3)])
def test_a_first_convolution_that_is_not_4d_is_a_weights_error_naming_the_file(first_shape):
    """A (damaged or foreign) file whose first conv weight is not (out, in, k, k): its channels are not read
    from it, and the shapes the file and the model disagree on are named, not an IndexError."""
    from mobilenets.weights.layout import infer_config, meta_shapes

    shapes = meta_shapes(mobilenets.mobilenet_v1(0.25, num_classes=10).config)
    shapes["features.0.conv.weight"] = first_shape
    with pytest.raises(WeightsError, match=r"^graph\.pb: .*features\.0\.conv\.weight"):
        infer_config(shapes, name="graph.pb")


def test_an_archive_of_several_tflite_files_names_the_first_four(tmp_path):
    import io
    import tarfile

    from mobilenets.weights.tflite import from_tflite

    tgz = tmp_path / "six.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        for name in "abcdef":
            info = tarfile.TarInfo(f"{name}.tflite")
            info.size = 4
            t.addfile(info, io.BytesIO(b"TFL3"))
    with pytest.raises(WeightsError) as raised:
        from_tflite(tgz)
    assert "holds 6 .tflite files (['a.tflite', 'b.tflite', 'c.tflite', 'd.tflite']); extract" in str(raised.value)


@pytest.mark.parametrize("config, size", [
    ({"config": {"layers": [{"class_name": "InputLayer", "config": {"batch_shape": [None, 160, 160, 3]}}]}}, 160),
    ({"config": {"layers": [{"class_name": "InputLayer", "config": {"batch_input_shape": [None, 192, 192, 3]}}]}},
     192),
    ({"config": {"layers": [{"class_name": "InputLayer", "config": {"batch_shape": [None]}}]}}, None),
    ({"config": {"layers": [{"class_name": "InputLayer", "config": {"batch_shape": [None, 160, 128, 3]}}]}}, None),
    ({"config": {"layers": "not a list"}}, None), ({"config": {}}, None), ("[1, 2", None)])
def test_a_keras_files_input_size_is_read_from_its_model_config_or_left_unknown(tmp_path, config, size):
    """Keras 3's model.save records the input layer's batch shape (Keras 2 called it batch_input_shape) in the
    file's model_config attribute, written here by h5py; a config that is short, not square, not of that shape
    or not JSON gives no size (the file name or --resolution decides), never an error."""
    import h5py

    from mobilenets.weights import keras

    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.attrs["model_config"] = config if isinstance(config, str) else json.dumps(config)
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert keras._input_size(f) == size
