"""Core ML: .mlpackage export (fp16, fp32, int8 weights), read back and checked, since Core ML cannot run here.

Expected values come from outside the code under test: the packages are read
with coremltools' own reader (spec and MIL program), and compared with the
model's parameters folded here by the BatchNorm formula, rounded by numpy to
fp16, or quantized by the rule written out below; the program's function is
compared with the PyTorch model's logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilenets import deploy, mobilenet_v1, quantize
from mobilenets.benchmark import make_model
from mobilenets.images import IMAGENET
from mobilenets.metadata import Metadata
from mobilenets.labels import imagenet_labels

if importlib.util.find_spec("coremltools") is None:
    pytest.skip("coremltools is not installed (pip install -e '.[coreml]')", allow_module_level=True)

ALPHA, RES = 0.25, 64


@pytest.fixture(scope="module")
def trained():
    """Weights briefly fitted to the built-in digits: logits that depend on the image."""
    return make_model(ALPHA, num_classes=10, steps=40, resolution=RES)


@pytest.fixture(scope="module")
def images():
    batches, _ = deploy.builtin_batches(RES, limit=16)
    return torch.cat(batches)


@pytest.fixture(scope="module")
def calibration():
    batches, _ = deploy.builtin_batches(RES, limit=32)
    return batches


@pytest.fixture(scope="module")
def packages(trained, calibration, tmp_path_factory):
    folder = tmp_path_factory.mktemp("coreml")
    return {p: deploy.export(trained, folder / f"{p}.mlpackage", precision=None if p == "fp16" else p,
                             calibration=calibration, resolution=RES) for p in ("fp16", "fp32", "int8")}


def program(path):
    """(spec, MIL main function) read back by coremltools from the saved package."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return spec, load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir).functions["main"]


def folded_weights(model) -> list[np.ndarray]:
    """w * gamma / sqrt(var + eps) of every convolution (float64), then the classifier's weight."""
    out = []
    for name, m in model.features.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            bn = model.features.get_submodule(name.rsplit(".", 1)[0] + ".bn")
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            out.append((m.weight.double() * scale.view(-1, 1, 1, 1)).detach().numpy())
    return out + [model.classifier.weight.double().detach().numpy()]


def spread_of(reference):
    return float((reference - reference.mean(0)).abs().max())


# ---------------------------------------------------------------- the packages, read by coremltools


def test_fp16_package_is_an_image_classifier_with_the_models_weights(trained, packages):
    path = packages["fp16"]
    assert path.is_dir() and (path / "Manifest.json").is_file()
    spec, main = program(path)
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 7
    image = spec.description.input[0]
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (RES, RES)
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs"]
    assert list(next(op for op in main.operations if op.op_type == "classify").classes.val) == list(range(10))
    convs = [op for op in main.operations if op.op_type == "conv"]
    linear = [op for op in main.operations if op.op_type == "linear"]
    assert len(convs) == 27 and len(linear) == 1
    assert sum(int(op.groups.val) > 1 for op in convs) == 13  # the depthwise layers
    for op, want in zip(convs + linear, folded_weights(trained)):
        stored = op.weight.val
        assert stored.dtype == np.float16
        # fp16 rounding of the exact folded value: within half a unit in the last place (2^-11 relative)
        assert np.all(np.abs(stored.astype(np.float64) - want) <= np.abs(want) * 2.0 ** -11 + 2.0 ** -25)
    metadata = spec.description.metadata.userDefined
    assert metadata["mobilenets.alpha"] == str(ALPHA) and metadata["mobilenets.resolution"] == str(RES)
    assert json.loads(metadata["mobilenets.normalization"]) == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert metadata["com.apple.coreml.model.preview.type"] == "imageClassifier"
    # Core ML's image scaling is the weights' x / 127.5 - 1
    mul = next(op for op in main.operations if op.op_type == "mul")
    add = next(op for op in main.operations if op.op_type == "add")
    assert float(mul.y.val) == pytest.approx(1 / 127.5, rel=1e-7)
    assert np.allclose(np.asarray(add.y.val).reshape(-1), -1.0)


def test_fp32_package_stores_the_folded_weights_exactly(trained, packages):
    _, main = program(packages["fp32"])
    convs = [op for op in main.operations if op.op_type in ("conv", "linear")]
    for op, want in zip(convs, folded_weights(trained)):
        assert op.weight.val.dtype == np.float32
        assert np.allclose(op.weight.val, want, rtol=1e-6, atol=1e-7)


def test_int8_package_holds_per_channel_symmetric_codes(packages):
    _, main = program(packages["int8"])
    dequant = [op for op in main.operations if op.op_type == "constexpr_affine_dequantize"]
    assert len(dequant) == 28  # every convolution and the classifier, nothing else
    for op in dequant:
        q = op.quantized_data.val
        assert q.dtype == np.int8 and int(op.axis.val) == 0 and not np.any(op.zero_point.val)
        assert op.scale.val.shape == (q.shape[0],)
        live = np.asarray(op.scale.val) > 0
        # symmetric, max|w| / 127 per output channel: every live channel reaches +-127
        assert np.all(np.abs(q.reshape(len(q), -1)).max(1)[live] == 127)


# ---------------------------------------------------------------- the check, and the program's function


@pytest.mark.parametrize("precision,cosine", [("fp32", 0.999999), ("fp16", 0.9999), ("int8", 0.99)])
def test_check_reports_what_was_checked_and_that_it_did_not_run(trained, packages, calibration, images, precision,
                                                                 cosine):
    report = deploy.check_exported(trained, packages[precision], calibration=calibration, images=images)
    assert report["executed"] is False and "Apple" in report["why"]
    assert report["precision"] == precision and report["convolutions"] == 27 and report["weight_tensors"] == 28
    assert report["classes"] == 10 and report["resolution"] == RES
    p = report["reference_evaluation"]
    assert p["images"] == len(images) and p["cosine"] >= cosine
    with torch.no_grad():
        reference = trained(images)
    if precision == "fp32":
        assert report["weights_max_abs_diff"] == 0.0
        # the program's function is the model's: differences far below how much logits vary between images
        assert p["max_abs_diff"] <= 1e-4 * spread_of(reference) and p["top1_agreement"] == 1.0
    if precision == "int8":
        assert report["weights"] == "int8-ready" and report["int8_codes_differing"] == 0
        # codes equal: the dequantized weight is off by at most half a step and the fp16 scale's error (2^-10)
        assert report["weights_max_steps"] <= 0.5 + 127 * 2.0 ** -10


def test_int8_ready_weights_need_no_calibration(trained, calibration, tmp_path):
    ready = quantize.to_model(quantize.prepare_int8(trained, calibration), trained)
    path = deploy.export(ready, tmp_path / "q.mlpackage", precision="int8", resolution=RES)
    report = deploy.check_exported(ready, path)
    assert report["precision"] == "int8" and report["weights"] == "int8-ready"
    _, main = program(path)
    # equalized int8-ready weights keep ReLU6's clip per channel (6 times each channel's scale)
    assert sum(op.op_type == "minimum" for op in main.operations) == 27
    with pytest.raises(deploy.DeployError, match="calibration"):
        deploy.export(trained, tmp_path / "p.mlpackage", precision="int8", resolution=RES)


def test_per_channel_std_folds_into_the_first_convolution(tmp_path, images):
    """ImageNet's mean/std: one Core ML scale for all channels, the rest in the first convolution; the
    program's function must stay the model's, zero padding included (TF-SAME pads asymmetrically)."""
    model = mobilenet_v1(ALPHA, num_classes=10, padding="tf_same")
    model.load_state_dict(make_model(ALPHA, num_classes=10, steps=20, resolution=RES).state_dict())
    model.eval().meta = Metadata(normalization=IMAGENET)
    path = deploy.export(model, tmp_path / "imagenet.mlpackage", precision="fp32", resolution=RES)
    _, main = program(path)
    mul = next(op for op in main.operations if op.op_type == "mul")
    assert float(mul.y.val) == pytest.approx(1 / (255 * np.mean(IMAGENET.std)), rel=1e-6)
    report = deploy.check_exported(model, path, images=images)
    with torch.no_grad():
        reference = model(images)
    assert report["reference_evaluation"]["max_abs_diff"] <= 1e-4 * spread_of(reference)


def test_check_fails_on_a_package_of_another_model(trained, packages, tmp_path):
    other = make_model(ALPHA, num_classes=10, steps=0, resolution=RES)
    other.load_state_dict(trained.state_dict())
    with torch.no_grad():
        other.features[1].pointwise.conv.weight[3, 0, 0, 0] += 0.01  # folded layer 2
    with pytest.raises(deploy.DeployError, match=r"layer 2 \(conv\) weight"):
        deploy.check_exported(other, packages["fp16"])
    relabelled = make_model(ALPHA, num_classes=10, steps=0, resolution=RES)
    relabelled.load_state_dict(trained.state_dict())
    relabelled.meta = Metadata(labels=[f"digit {i}" for i in range(10)])
    with pytest.raises(deploy.DeployError, match="class labels"):
        deploy.check_exported(relabelled, packages["fp16"])
    relabelled.meta = Metadata(normalization=IMAGENET)
    with pytest.raises(deploy.DeployError, match="image scaling"):
        deploy.check_exported(relabelled, packages["fp16"])
    with pytest.raises(deploy.DeployError, match="holds fp16 weights, not int8"):
        deploy.check_exported(trained, packages["fp16"], precision="int8")


def test_imagenet_classes_get_imagenet_labels(tmp_path):
    model = mobilenet_v1(ALPHA).eval()  # 1000 classes, no labels of its own
    path = deploy.export(model, tmp_path / "m.mlpackage", resolution=32)
    _, main = program(path)
    assert list(next(op for op in main.operations if op.op_type == "classify").classes.val) == \
        list(imagenet_labels())


def test_a_model_without_classifier_outputs_features(tmp_path):
    model = mobilenet_v1(ALPHA, num_classes=0).eval()
    path = deploy.export(model, tmp_path / "f.mlpackage", precision="fp32", resolution=32)
    report = deploy.check_exported(model, path)
    assert report["outputs"] == ["features"] and report["classes"] == 0 and report["weight_tensors"] == 27


def test_core_ml_is_refused_where_it_cannot_run_or_hold(trained, packages, tmp_path, monkeypatch):
    with pytest.raises(deploy.DeployError, match="runs only on Apple platforms.*check_exported"):
        deploy.load_exported(packages["fp16"])
    with pytest.raises(deploy.DeployError, match="runs only on Apple"):
        deploy.compile(trained, "fp32", backend="coreml", resolution=RES)
    with pytest.raises(deploy.DeployError, match="cannot export bf16 as coreml"):
        deploy.export(trained, tmp_path / "m.mlpackage", precision="bf16", resolution=RES)
    with pytest.raises(deploy.DeployError, match="not an .mlpackage"):
        deploy.check_exported(trained, tmp_path, format="coreml")
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(deploy.DeployError, match=r"pip install 'mobilenets\[coreml\]'"):
        deploy.export(trained, tmp_path / "m.mlpackage", resolution=RES)


# ---------------------------------------------------------------- the command, and a process holding TensorFlow


def run_mobilenets(*args, code=None, **env):
    import mobilenets

    env = {**os.environ, "PYTHONPATH": str(Path(mobilenets.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mobilenets", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_export_command_says_it_checked_and_did_not_run(trained, tmp_path):
    from mobilenets import weights

    saved = weights.save(weights.Converted(trained.state_dict(), trained.config, Metadata(resolution=RES)),
                         tmp_path / "w.safetensors")
    run = run_mobilenets("export", "--weights", str(saved), "--calib-images", "8", "--format", "coreml",
                         "--out", str(tmp_path / "m"))
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == f"wrote {tmp_path / 'm.mlpackage'} (coreml, fp16, {RES}x{RES})"
    assert lines[1].startswith("checked, not run: Core ML runs only on Apple platforms")
    assert "27 convolutions" in lines[1]
    assert lines[2].startswith("its program evaluated op by op in PyTorch, not Core ML") and "8 calibration" in lines[2]
    bad = run_mobilenets("export", "--precision", "bf16", "--format", "coreml", "--out", str(tmp_path / "b"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "fp16, fp32 or int8" in bad.stderr


def test_export_works_in_a_process_that_imported_tensorflow_first(tmp_path):
    """coremltools would import TensorFlow and then triton, which crashes once TensorFlow 2.21 is loaded.
    And coremltools keeps every converted model in a temporary .mlpackage until the process exits."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    code = f"""
import os, tensorflow, torch
from mobilenets import deploy, mobilenet_v1
model = mobilenet_v1(0.25, num_classes=10).eval()
path = deploy.export(model, {str(tmp_path / 'tf.mlpackage')!r}, resolution=32)
print(deploy.check_exported(model, path)["convolutions"])
print(sorted(name for name in os.listdir({str(tmp_path / 'tmp')!r}) if not name.startswith("torchinductor_")))
"""
    (tmp_path / "tmp").mkdir()
    run = run_mobilenets(code=code, TMPDIR=str(tmp_path / "tmp"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-2:] == ["27", "[]"]


# ---------------------------------------------------------------- the released weights


def test_real_weights_package(tmp_path):
    real_data = pytest.importorskip("real_data")
    model = real_data.real_model()
    held = real_data.inception_input(real_data.heldout_crops(8))
    path = deploy.export(model, tmp_path / "mobilenet_v1_1.0_224.mlpackage", resolution=224)
    report = deploy.check_exported(model, path, images=held)
    assert (report["precision"], report["convolutions"], report["classes"]) == ("fp16", 27, 1000)
    p = report["reference_evaluation"]
    # fp16 weights and intermediates: 0.99990 on 64 held-out crops (docs/deploy.md), 0.99988 on these 8
    assert p["top1_agreement"] == 1.0 and p["cosine"] >= 0.9995
    _, main = program(path)
    labels = next(op for op in main.operations if op.op_type == "classify").classes.val
    assert labels[0] == "tench, Tinca tinca" and len(labels) == 1000
