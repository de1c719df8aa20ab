"""A model's metadata, one typed record: what every path reads, what files keep, what peers are told."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import mobilenets
from mobilenets import cli
from mobilenets.images import IMAGENET, eval_transform
from mobilenets.metadata import Metadata
from mobilenets.weights import WeightsError


def photo(size=(301, 207), seed=0) -> Image.Image:
    """Structure at every scale (gradients plus noise), so a wrong resize, crop or normalisation shows."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], -1)
    noise = rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_timms_data_pipeline_built_from_pretrained_cfg_matches_ours():
    """timm reads pretrained_cfg to build its own eval transform: that transform is the oracle for ours."""
    timm_data = pytest.importorskip("timm.data")
    model = mobilenets.mobilenet_v1(0.25, resolution=160)
    model.meta = dataclasses.replace(model.meta, normalization=IMAGENET)  # not the default: a dropped field shows
    cfg = timm_data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 160, 160) and cfg["mean"] == IMAGENET.mean
    theirs = timm_data.create_transform(**cfg)(photo())
    ours = eval_transform(photo(), 160, IMAGENET)
    assert theirs.shape == ours.shape == (3, 160, 160)
    # both resize with antialiasing but round differently: one grey level, divided by the smallest std
    one_level = 1 / 255 / min(IMAGENET.std)
    diff = (theirs - ours).abs()
    assert diff.max() <= one_level + 1e-5 and diff.mean() < 0.1 * one_level


@pytest.mark.parametrize("resolution, output_stride", [(160, None), (224, 16), (200, 8)])
def test_pool_size_is_the_last_feature_maps_size(resolution, output_stride):
    model = mobilenets.mobilenet_v1(0.25, resolution=resolution, output_stride=output_stride).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.zeros(1, 3, resolution, resolution))
    assert tuple(maps.shape[-2:]) == model.pretrained_cfg["pool_size"]


def test_a_new_head_survives_save_and_load(tmp_path):
    """load -> reset_classifier(10) -> save -> load: the old 1000 labels must not follow the new head."""
    model = mobilenets.mobilenet_v1(0.25, num_classes=4, resolution=96)
    model.meta = Metadata(resolution=96, normalization=IMAGENET, labels=["a", "b", "c", "d"], source="test")
    first = mobilenets.load(mobilenets.save(model, tmp_path / "four.safetensors"))
    first.reset_classifier(10)
    assert first.meta.labels is None and first.pretrained_cfg["num_classes"] == 10
    again = mobilenets.load(mobilenets.save(first, tmp_path / "ten.safetensors"))
    assert again.config.num_classes == 10 and again.pretrained_cfg["num_classes"] == 10
    # what the weights were trained with is kept: resolution and normalisation are the body's
    assert again.meta.resolution == 96 and again.meta.normalization == IMAGENET
    # a head of the same size keeps its labels
    first.reset_classifier(4)
    assert first.meta.labels is None  # a fresh head knows no classes, whatever its size


@pytest.mark.parametrize("field, value, words", [
    ("normalization", {"mean": [0.5] * 3, "std": [1e-30] * 3}, "normalization"),
    ("normalization", {"mean": [float("nan"), 0.5, 0.5], "std": [0.5] * 3}, "normalization"),
    ("normalization", {"mean": [1e9] * 3, "std": [0.5] * 3}, "normalization"),
    ("resolution", 10**6, "resolution"),
    ("labels", "cat dog", "labels"),
])
def test_impossible_metadata_is_refused_naming_the_field(field, value, words):
    with pytest.raises(WeightsError, match=words):
        Metadata.from_dict({field: value}, "m.safetensors")


def test_a_file_with_an_impossible_std_is_refused_by_the_cli_in_one_line(tmp_path, capsys):
    """The check sits where every reader passes: a crafted file never reaches preprocessing."""
    import json

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = mobilenets.save(mobilenets.mobilenet_v1(0.25, num_classes=3), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    metadata["normalization"] = json.dumps({"mean": [0.5] * 3, "std": [1e-30] * 3})
    save_file(load_file(str(path)), str(path), metadata=metadata)
    img = tmp_path / "x.png"
    photo().save(img)
    assert cli.main(["predict", "--weights", str(path), str(img)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "normalization" in err[0] and "Traceback" not in err[0]
