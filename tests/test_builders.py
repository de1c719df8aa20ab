"""The public API: the registry of released weights, transforms, pretrained_cfg for timm, save/load, torch.hub."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mobilenets
from mobilenets import cli, paper, weights
from mobilenets.images import IMAGENET
from mobilenets.metadata import Metadata
from mobilenets.weights import WEIGHTS, WeightsError, registry

from imagefolders import CLASSES, make_split
from weights_helpers import write_keras2_h5

REPO = Path(__file__).resolve().parents[1]


def forward(model, resolution=64, seed=0):
    x = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def converted_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv")
    src = write_keras2_h5(folder / "mobilenet_2_5_128_tf.h5", 0.25)
    return weights.save(weights.convert("keras", src), folder / "m.safetensors")


# ---------------------------------------------------------------- the registry


def test_registry_holds_the_16_released_models_with_the_published_accuracy():
    assert sorted(WEIGHTS) == sorted((a, r) for a in (1.0, 0.75, 0.5, 0.25) for r in (224, 192, 160, 128))
    # TF-slim 2018 release notes: corners of the grid
    assert (WEIGHTS[1.0, 224].top1, WEIGHTS[1.0, 224].top1_int8) == (70.9, 69.7)
    assert (WEIGHTS[0.25, 128].top1, WEIGHTS[0.25, 128].top1_int8) == (41.5, 39.9)
    entry = WEIGHTS[0.75, 160]
    assert entry.keras_file == "mobilenet_7_5_160_tf.h5"
    assert entry.url == "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/mobilenet_7_5_160_tf.h5"
    assert entry.crop_pct == 0.875 and entry.interpolation == "bilinear" and len(entry.labels) == 1000
    with pytest.raises(WeightsError, match="resolution=100"):
        registry.get(1.0, 100)


def test_docs_and_paper_grid_agree_with_the_registry():
    text = (REPO / "docs" / "published.md").read_text()
    rows = re.findall(r"^\| (?:1\.0 float / int8|0\.75|0\.5|0\.25) \|(.*)\|$", text, flags=re.M)
    assert len(rows) == 4  # zip below must not silently drop a row
    compared = 0
    for alpha, row in zip((1.0, 0.75, 0.5, 0.25), rows):
        cells = [tuple(float(x) for x in c.split("/")) for c in row.split("|")]
        assert cells == [(WEIGHTS[alpha, r].top1, WEIGHTS[alpha, r].top1_int8) for r in (224, 192, 160, 128)]
        compared += len(cells)
    assert compared == 16  # every published cell, float and int8
    for row in paper.grid():
        assert (row["top1"], row["top1_int8"]) == registry.published_top1()[row["alpha"], row["resolution"]]


def test_transforms_are_the_inception_eval_preprocessing():
    """Against torchvision: resize the short side to 128/0.875 = 146 (bilinear), centre crop 128, x/127.5 - 1.

    The 200x400 image resizes to exactly 146x292 with even margins, so both round the same way.
    """
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (400, 200, 3), dtype=np.uint8))
    ours = WEIGHTS[0.5, 128].transforms()(image)
    reference = v2.Compose([v2.Resize(146, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(128),
                            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.5] * 3)])(image)
    assert ours.shape == (3, 128, 128)
    # our resize is PyTorch's uint8 kernel, PIL's filter to within one grey level (8-bit rounding; 2/255 here)
    diff = (ours - reference).abs()
    assert float(diff.max()) <= 2 / 255 + 1e-6 and float((diff > 1e-6).float().mean()) < 0.01


def test_timm_data_config_sees_our_preprocessing(converted_file):
    from timm.data import resolve_data_config

    for model, size in ((mobilenets.load(converted_file), 128), (mobilenets.mobilenet_v1(0.25, resolution=96), 96)):
        config = resolve_data_config(model=model)
        assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)  # not ImageNet's
        assert config["input_size"] == (3, size, size)
        assert config["crop_pct"] == 0.875 and config["interpolation"] == "bilinear"
    assert WEIGHTS[1.0, 192].pretrained_cfg["input_size"] == (3, 192, 192)


# ---------------------------------------------------------------- save / load round trips


@pytest.mark.parametrize("kind", ["converted", "fine-tuned", "ablation"])
def test_save_and_load_round_trip_any_model(tmp_path, converted_file, kind):
    if kind == "converted":
        model = mobilenets.load(converted_file)
    elif kind == "fine-tuned":
        model = mobilenets.mobilenet_v1(0.25, weights=converted_file, num_classes=3)
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
        model.meta = Metadata(resolution=96, normalization=IMAGENET, labels=CLASSES, source="test")
    else:
        model = mobilenets.mobilenet_v1(0.5, num_classes=7, shallow=True, output_stride=16, padding="tf_same")
    path = mobilenets.save(model, tmp_path / "m.safetensors")
    loaded = mobilenets.load(path)
    assert loaded.config == model.config and loaded.meta.labels == model.meta.labels
    assert loaded.meta.resolution == model.meta.resolution
    assert loaded.meta.normalization == model.meta.normalization
    assert loaded.pretrained_cfg["num_classes"] == model.config.num_classes
    assert torch.equal(forward(loaded), forward(model))


def test_plain_state_dict_files_load_weights_only(tmp_path):
    model = mobilenets.mobilenet_v1(0.25, num_classes=5, padding="tf_same")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = mobilenets.load(tmp_path / "sd.pt", padding="tf_same")  # a bare state dict does not record padding
    assert loaded.config.num_classes == 5 and torch.equal(forward(loaded), forward(model))


def test_run_folders_resolve_to_best_then_last(tmp_path):
    from mobilenets import checkpoint

    model = mobilenets.mobilenet_v1(0.25, num_classes=4)
    run = tmp_path / "run"
    obj = {"format": "mobilenets", "version": 1, "config": model.config.to_dict(), "state_dict": model.state_dict(),
           "meta": {"resolution": 64}}
    checkpoint.save(obj, run / "last.pt")
    assert weights.resolve(run) == run / "last.pt"
    checkpoint.save(obj, run / "best.pt")
    assert weights.resolve(run) == run / "best.pt"
    assert mobilenets.load(run).meta.resolution == 64
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.resolve(tmp_path / "nope.pt")


def test_evaluate_accepts_converts_output(tmp_path, capsys):
    model = mobilenets.mobilenet_v1(0.25, num_classes=3)
    model.meta = Metadata(labels=CLASSES, resolution=32)
    path = mobilenets.save(model, tmp_path / "m.safetensors")
    root = make_split(tmp_path / "val", 2, 0)
    assert cli.main(["evaluate", "--checkpoint", str(path), "--data", str(root), "--json", "-j", "0"]) == 0
    assert '"images": 6' in capsys.readouterr().out


def test_torch_hub_loads_the_builder_from_this_checkout(converted_file):
    model = torch.hub.load(str(REPO), "mobilenet_v1", source="local", alpha=0.25, num_classes=10)
    assert model.config.num_classes == 10 and model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    same = torch.hub.load(str(REPO), "mobilenet_v1", source="local", alpha=0.25, weights=str(converted_file))
    assert torch.equal(forward(same), forward(mobilenets.load(converted_file)))
