"""Classifying images: preprocessing from the weights' metadata, any image mode, batching, top-k, CLI output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mobilenets
from mobilenets import checkpoint, cli, weights
from mobilenets.images import IMAGENET, INCEPTION, eval_transform, load_rgb
from mobilenets.predict import predict

from weights_helpers import Server, write_keras2_h5


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    src = write_keras2_h5(folder / "mobilenet_2_5_128_tf.h5", 0.25, seed=5)
    return weights.save(weights.convert("keras", src, resolution=64), folder / "m.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images in every mode a user may have, one in a subfolder, one of them odd-sized."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (70, 90), dtype=np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.tiff")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 200)).save(folder / "deep16.png")
    (folder / "sub").mkdir()
    Image.fromarray(rgb[:40, :33]).save(folder / "sub" / "small.bmp")
    return folder


def expected_probabilities(model, path, resolution, normalization):
    x = eval_transform(load_rgb(path), resolution, normalization)[None]
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0]


def test_folder_in_every_mode_with_preprocessing_from_metadata(weights_file, images):
    model = mobilenets.load(weights_file)
    assert model.meta["resolution"] == 64
    results = list(predict(model, [images], topk=3, batch_size=4))
    assert len(results) == 7
    assert [r.image for r in results] == sorted(r.image for r in results)  # folder order, recursive
    for r in results:
        p = expected_probabilities(model, r.image, 64, INCEPTION)
        values, indices = p.topk(3)
        assert [t["class_index"] for t in r.top] == indices.tolist()
        assert np.allclose([t["probability"] for t in r.top], values.tolist(), atol=1e-6)
        assert [t["label"] for t in r.top] == [model.meta["labels"][i] for i in indices.tolist()]
        probs = [t["probability"] for t in r.top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_batching_does_not_change_results(weights_file, images):
    model = mobilenets.load(weights_file)
    one = list(predict(model, [images], topk=5, batch_size=1))
    many = list(predict(model, [images], topk=5, batch_size=3))
    for a, b in zip(one, many):
        assert a.image == b.image
        assert [t["class_index"] for t in a.top] == [t["class_index"] for t in b.top]
        assert np.allclose([t["probability"] for t in a.top], [t["probability"] for t in b.top], atol=1e-5)


def test_checkpoint_metadata_drives_resolution_normalization_and_labels(tmp_path, images):
    model = mobilenets.mobilenet_v1(0.25, num_classes=3)
    labels = ["cat", "dog", "fish"]
    checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(),
                     "state_dict": model.state_dict(),
                     "meta": {"resolution": 80, "normalization": IMAGENET.to_dict(), "labels": labels, "source": "t"}},
                    tmp_path / "c.pt")
    loaded = mobilenets.load(tmp_path / "c.pt")
    [r] = predict(loaded, [images / "rgb.jpg"], topk=10)
    assert len(r.top) == 3  # top-k is clipped to the number of classes
    p = expected_probabilities(loaded, images / "rgb.jpg", 80, IMAGENET)
    assert np.allclose([t["probability"] for t in r.top], p.sort(descending=True).values.tolist(), atol=1e-6)
    assert {t["label"] for t in r.top} == set(labels)


def test_no_top_weights_cannot_classify(tmp_path, images):
    src = write_keras2_h5(tmp_path / "mobilenet_2_5_128_tf_no_top.h5", 0.25, include_top=False)
    model = weights.convert("keras", src).model()
    with pytest.raises(ValueError, match="no classifier"):
        list(predict(model, [images]))


def test_cli_json_one_object_per_image(weights_file, images, capsys):
    assert cli.main(["predict", str(images / "rgb.jpg"), str(images / "sub"), "--weights", str(weights_file),
                     "--topk", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    objs = [json.loads(line) for line in lines]
    assert [o["image"] for o in objs] == [str(images / "rgb.jpg"), str(images / "sub" / "small.bmp")]
    for o in objs:
        assert set(o) == {"image", "top"} and len(o["top"]) == 2
        assert all(set(t) == {"class_index", "label", "probability"} for t in o["top"])
        assert isinstance(o["top"][0]["class_index"], int) and 0 < o["top"][0]["probability"] <= 1


def test_cli_table_is_readable(weights_file, images, capsys):
    assert cli.main(["predict", str(images / "gray.png"), "--weights", str(weights_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(images / "gray.png") and len(out) == 6  # the image, then the default top 5
    rank, index, percent, *label = out[1].split()
    assert rank == "1" and index.isdigit() and percent.endswith("%") and label


def test_cli_bad_inputs_fail_in_one_line(weights_file, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    for argv, needle in [
        ([str(broken)], "cannot decode image"),
        ([str(tmp_path / "missing.png")], "neither an image file nor a folder"),
        ([str(images / "rgb.jpg"), "--topk", "0"], "integer >= 1"),
    ]:
        assert cli.main(["predict", *argv, "--weights", str(weights_file)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0, err


def test_a_broken_file_in_a_folder_is_skipped_with_a_warning(weights_file, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((images / "rgb.jpg").read_bytes())
    (folder / "b.jpg").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping .*b.jpg"):
        results = list(predict(mobilenets.load(weights_file), [folder]))
    assert [r.image for r in results] == [str(folder / "a.jpg")]


def test_cli_imagenet_weights_from_the_server(tmp_path, images, monkeypatch, capsys):
    served = tmp_path / "served"
    served.mkdir()
    write_keras2_h5(served / "mobilenet_2_5_128_tf.h5", 0.25, seed=9)
    server = Server(served)
    try:
        monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
        monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
        argv = ["predict", str(images / "rgb.jpg"), "--weights", "imagenet", "--alpha", "0.25",
                "--resolution", "128", "--json", "-q"]
        assert cli.main(argv) == 0
        first = json.loads(capsys.readouterr().out)
        assert cli.main(argv) == 0  # the second run uses the cached conversion
        assert json.loads(capsys.readouterr().out) == first
        assert server.requests == ["/mobilenet_2_5_128_tf.h5"]
    finally:
        server.close()
    model = mobilenets.load(tmp_path / "cache" / "mobilenet_2_5_128_tf.safetensors")
    p = expected_probabilities(model, images / "rgb.jpg", 128, INCEPTION)
    assert first["top"][0]["class_index"] == int(p.argmax())
