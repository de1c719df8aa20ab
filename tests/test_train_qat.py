"""``train --qat N``: int8-ready weights of the final model, fine-tuned with the labels, checked in ONNX Runtime."""

from __future__ import annotations

import shutil

import pytest
import torch

import cpu
import mobilenets
from mobilenets import cli, data, deploy, quantize, train
from mobilenets.quantize import qat as distillation
from mobilenets.train import qat as train_qat

# one validation digit is 100/359 = 0.28 points: the margins below are counted in digits
VAL_DIGITS = 359
DIGIT = 100 / VAL_DIGITS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_run(out, **overrides):
    """The built-in digits at alpha 0.25, 32 px: a few seconds an epoch on one thread."""
    options = dict(alpha=0.25, resolution=32, epochs=5, batch_size=16, num_workers=0, threads=1, progress=False,
                   plot=False, out=str(out), lr=0.02, lr_step_size=1, lr_gamma=0.85, min_scale=0.5)
    options.update(overrides)
    return train.make_config("paper", **options)


def val_digits(model):
    resolution = model.meta.resolution
    transform = data.EvalTransform(resolution, model.meta.normalization)
    _, val = data.splits(None, resolution, train_transform=transform, eval_transform=transform)
    return torch.stack([val[i][0] for i in range(len(val))]), torch.tensor(val.targets)


def top1(logits, y) -> float:
    return 100 * float((logits.argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    code = cli.main(["train", "--alpha", "0.25", "--resolution", "32", "--epochs", "5", "--batch-size", "16",
                     "--lr", "0.02", "--lr-step-size", "1", "--lr-gamma", "0.85", "--min-scale", "0.5",
                     "--num-workers", "0", "--threads", "1", "--no-progress", "--no-plot", "--qat", "20",
                     "--out", str(out)])
    assert code == 0
    return out


def test_train_qat_writes_int8_weights_whose_accuracy_onnxruntime_confirms(qat_run):
    row = train.read_metrics(qat_run)[-1]
    assert row["epoch"] == 5 and row["int8_qat_steps"] == 20
    model = mobilenets.load(qat_run / train_qat.INT8)
    ready = quantize.from_model(model)
    # the file holds the fine-tuned weights only if they kept the simulated val top-1 (measured: not kept here,
    # 90.25% against post-training 90.53%, since the simulation's biases are on the runtimes' int32 grid)
    assert ready is not None and ready.report.get("qat_steps") == (20 if row["int8_qat_kept"] else None)
    float_model = mobilenets.load(qat_run)  # best.pt: the run's final model
    x, y = val_digits(float_model)
    with torch.no_grad():
        float_top1 = top1(float_model(x), y)
    assert row["int8_float_val_top1"] == pytest.approx(float_top1, abs=1e-4)  # float32 mean
    assert row["int8_float_val_top1"] == max(r["val_top1"] for r in train.read_metrics(qat_run))
    # the int8 graph as a runtime runs it (QDQ ONNX, integer kernels) against what the run reported
    predictor = deploy.compile(model, precision="int8", calibration=[x[:32]], backend="onnxruntime",
                               batch_size=32, resolution=model.meta.resolution)
    runtime_top1 = top1(predictor(x), y)
    # measured: runtime 90.25%, reported (simulated, in batches of 16) 90.53%, float 89.97%; the two int8
    # forms disagree on about 3 of the 359 digits, where rounding at the int8 boundaries goes either way
    if cpu.VNNI:
        assert abs(runtime_top1 - row["int8_val_top1"]) <= 4 * DIGIT
        # the bar for a model trained here: int8 loses at most 0.3 points (one digit) of top-1
        assert float_top1 - runtime_top1 <= 0.3
    else:
        # without VNNI compile rounds the file's full-range weights to 7-bit ([-64, 64], docs/deploy.md), a grid
        # the run's report was not simulated on: the runtime must compute what the simulation on that grid says
        # (ungated, the full-grid report and the 7-bit runtime were 5 digits apart: 88.86% against 87.47%)
        seven_bit = quantize.on_weight_grid(ready, deploy.machine.int8_weight_qmax())
        with torch.no_grad():
            simulated = top1(torch.cat([seven_bit.simulate(x[i:i + 16]) for i in range(0, len(x), 16)]), y)
        assert abs(runtime_top1 - simulated) <= 4 * DIGIT
    assert float_top1 - row["int8_val_top1"] <= 0.3


def test_labels_lift_an_undertrained_models_int8_accuracy(tmp_path, monkeypatch):
    # one epoch leaves the model near 30%: the labels, not the float teacher, are what can lift it
    monkeypatch.setattr(train_qat, "LR", 0.05)
    row = train.train(digits_run(tmp_path / "run", epochs=1, qat=100))
    assert row["int8_qat_kept"] and row["int8_val_top1"] == row["int8_qat_val_top1"]
    # measured: 30.1% -> 46.0% with the labels (the float model: 29.5%)
    assert row["int8_qat_val_top1"] >= row["int8_ptq_val_top1"] + 8


def test_fine_tuning_that_lowers_int8_accuracy_is_not_kept(tmp_path, monkeypatch):
    distill = distillation.distill

    def damaging(folded, *args, **kwargs):
        broken = distill(folded, *args, **{**kwargs, "steps": 1})
        with torch.no_grad():
            broken.classifier.bias[0] += 1000.0  # every image answers 0
        return broken

    monkeypatch.setattr(distillation, "distill", damaging)
    out = tmp_path / "run"
    row = train.train(digits_run(out, epochs=1, qat=3))
    assert not row["int8_qat_kept"] and row["int8_qat_val_top1"] < row["int8_ptq_val_top1"]
    assert row["int8_val_top1"] == row["int8_ptq_val_top1"]
    saved = quantize.from_model(mobilenets.load(out / train_qat.INT8))
    assert float(saved.folded.classifier.bias.abs().max()) < 100  # the post-training weights, not the damaged ones


def test_resume_of_a_finished_run_adds_int8_without_training(tmp_path, qat_run):
    run = tmp_path / "run"
    shutil.copytree(qat_run, run, ignore=shutil.ignore_patterns(".lock", train_qat.INT8))
    before = train.read_metrics(run)
    config, file = train.resume_config(run, qat=0)
    assert config.qat == 0 and config.epochs == 5
    row = train.train(config, resume=file)
    after = train.read_metrics(run)
    assert len(after) == len(before) == 5
    assert after[-1]["val_top1"] == before[-1]["val_top1"] and after[-1]["int8_qat_steps"] == 0
    assert "int8_qat_kept" not in row  # 0 steps: post-training only
    assert quantize.from_model(mobilenets.load(run / train_qat.INT8)).report["steps"] == 0


def test_distill_refuses_labels_that_do_not_match_the_images():
    from mobilenets import mobilenet_v1

    model = mobilenet_v1(alpha=0.25, num_classes=3).eval()
    batches = [torch.randn(4, 3, 32, 32)]
    ready = quantize.prepare_int8(model, batches)
    with pytest.raises(quantize.QuantizeError, match="one class per image: 3 labels for 4 images"):
        distillation.distill(ready.folded, ready.folded, ready.ranges, batches, steps=1,
                             labels=torch.tensor([0, 1, 2]))


def test_qat_steps_must_be_a_count(tmp_path, capsys):
    assert cli.main(["train", "--qat", "-1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilenets: error:") and "--qat: must be an integer >= 0" in err and err.count("\n") == 1
    with pytest.raises(train.ConfigError, match="qat must be >= 0"):
        train.make_config("paper", qat=-2)
