"""ExecuTorch .pte files: written, read back (XNNPACK holds every convolution; int8 ones carry our ranges) and run
by ExecuTorch's runtime, on a small model and on the real 1.0-224 weights."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch.runtime", reason="executorch is not installed (pip install -e '.[test]')")

import mobilenets  # noqa: E402
from mobilenets import deploy, quantize  # noqa: E402
from mobilenets.benchmark import make_model  # noqa: E402
from mobilenets.cli import main  # noqa: E402
from mobilenets.deploy import executorch  # noqa: E402
from mobilenets.quantize import sim  # noqa: E402
from mobilenets.images import Normalization  # noqa: E402
from mobilenets.metadata import Metadata  # noqa: E402

RES = 64
LAYERS = 28  # 27 convolutions and the classifier
INT8 = [("qint8", "qcint8", "qint8")] * LAYERS  # (input, filter, output): per-channel int8 weights, int8 tensors
FLATC_DIGITS = 1e-6  # flatc prints a float to 6 decimals


@pytest.fixture(scope="module")
def small():
    model = make_model(0.25, num_classes=10, resolution=RES)
    batches = deploy.builtin_batches(RES, limit=24)[0]
    x = torch.cat(batches)
    with torch.no_grad():
        reference = model(x)
    return model, batches, x, reference


@pytest.fixture(scope="module")
def small_fp32(small, tmp_path_factory):
    return deploy.export(small[0], tmp_path_factory.mktemp("pte") / "m.pte", resolution=RES)


def weighted_types(summary: dict) -> list[tuple[str, str, str]]:
    return [(n["input"], n["filter"], n["output"]) for n in summary["weighted"]]


def assert_all_in_xnnpack(summary: dict) -> None:
    """Every layer with weights runs inside XNNPACK; outside it only shape bookkeeping remains."""
    assert set(summary["delegates"]) == {"XnnpackBackend"}, summary["delegates"]
    assert set(summary["operators"]) <= {"aten::sym_size", "executorch_prim::et_view"}, summary["operators"]
    kinds = summary["xnnpack_nodes"]
    assert kinds["XNNConv2d"] == 14 and kinds["XNNDepthwiseConv2d"] == 13 and kinds["XNNFullyConnected"] == 1, kinds


def assert_our_ranges(summary: dict, ranges: dict) -> None:
    """Each convolution's and the classifier's int8 output has the scale and zero point our range gives."""
    keys = [f"features.{i}" for i in range(LAYERS - 1)] + ["logits"]
    for node, key in zip(summary["weighted"], keys, strict=True):
        scale, zero_point = sim.act_qparams(*ranges[key])
        assert node["zero_point"] == zero_point - 128, (key, node)  # our uint8 grid, shifted to int8
        assert abs(node["scale"] - scale) <= FLATC_DIGITS, (key, node, scale)


def test_small_model_fp32_runs_in_xnnpack(small, small_fp32):
    model, _, x, reference = small
    summary = executorch.program_summary(small_fp32.read_bytes())
    assert_all_in_xnnpack(summary)
    assert weighted_types(summary) == [("fp32", "fp32", "fp32")] * LAYERS
    out = deploy.load_exported(small_fp32)(x)  # 24 images: more than the program's planned batch, so chunks
    spread = float((reference - reference.mean(0)).abs().max())
    # measured 2e-5 of a spread of 2-3: float reassociation only
    assert spread > 0.1 and float((out - reference).abs().max()) <= 1e-4 * spread


def test_the_file_tells_an_app_its_input_and_labels(small, small_fp32, tmp_path):
    """Resolution, normalization and labels ride in the program as ExecuTorch's constant methods."""
    model = small[0]
    constants = executorch.read_constants(small_fp32.read_bytes())
    # a model without names or normalization of its own: classes 0..9, TF-slim's x / 127.5 - 1
    assert constants["resolution"] == RES and constants["labels"] == [str(i) for i in range(10)]
    assert constants["mean"] == constants["std"] == [0.5, 0.5, 0.5]
    described = json.loads(constants["mobilenets"])
    assert (described["alpha"], described["num_classes"], described["precision"]) == (0.25, 10, "fp32")
    named = copy.deepcopy(model)
    names = [f"digit {i}" for i in range(10)]
    named.meta = Metadata(labels=names, normalization=Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    constants = executorch.read_constants(deploy.export(named, tmp_path / "n.pte", resolution=RES).read_bytes())
    assert constants["labels"] == names
    assert constants["mean"] == pytest.approx([0.485, 0.456, 0.406]) and constants["std"] == pytest.approx(
        [0.229, 0.224, 0.225])
    # the program still runs one image a call, all of it in XNNPACK
    assert_all_in_xnnpack(executorch.program_summary(small_fp32.read_bytes()))


def test_a_runner_outlives_the_bytes_it_was_given(small, small_fp32, tmp_path):
    """ExecuTorch's Method does not keep its Program alive; a runner that kept only the method read freed memory.

    In a fresh process that crashed at once (freed large blocks go back to the system); in a long one it could run
    on stale memory, so this runs where the crash shows."""
    _, _, x, reference = small
    torch.save({"x": x[:8], "reference": reference[:8]}, tmp_path / "io.pt")
    script = ("import sys, torch\n"
              "from mobilenets.deploy.executorch import runner\n"
              "run = runner(open(sys.argv[1], 'rb').read())\n"
              "io = torch.load(sys.argv[2])\n"
              "print(max(float((run(io['x'][:n]) - io['reference'][:n]).abs().max()) for n in range(1, 9)))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(mobilenets.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(small_fp32), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-1500:])
    assert float(done.stdout.split()[-1]) <= 1e-3


def test_small_model_int8_export_command(small, tmp_path, capsys):
    """The command on int8-ready weights: the file runs them with their ranges, and it prints its parity."""
    model, batches, x, _ = small
    ready = quantize.prepare_int8(model, batches)
    weights = quantize.save(ready, model, tmp_path / "ready.safetensors")
    out = tmp_path / "q.pte"
    code = main(["export", "--weights", str(weights), "--resolution", str(RES), "--format", "executorch",
                 "--precision", "int8", "--calib-images", "24", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["format"] == "executorch" and report["precision"] == "int8"
    summary = executorch.program_summary(out.read_bytes())
    assert_all_in_xnnpack(summary)
    assert weighted_types(summary) == INT8
    assert_our_ranges(summary, ready.ranges)
    logits = deploy.load_exported(out)(x)
    # the int8 arithmetic we meant, int32 biases included (measured cosine 0.99990-0.99994, at most 4 logit steps
    # apart; 0.9987-0.9993 while the simulation kept float biases): why, in the TF-padding test below
    assert deploy.parity(ready.simulate(x), logits)["cosine"] >= 0.9995
    # what the command printed is the file run by ExecuTorch on the same images, against the weights it was given
    with torch.no_grad():
        given = mobilenets.load(weights)(x)
    assert report["images"] == len(x)
    assert report["mean_kl"] == pytest.approx(deploy.parity(given, logits)["mean_kl"], rel=1e-5)


def test_tf_padding_stays_int8_inside_the_convolutions(small, tmp_path, monkeypatch):
    """TF's SAME padding (the released weights') pads int8 next to its convolution, not in float between them.

    XNNPACK's quantizer alone gives each pad a dequantize before and a quantize after (2 conversions per
    stride-2 layer on the largest tensors: 2.5 against 2.1 ms at 1.0-224, benchmarks/edge_runtimes.py); the file
    must convert only its float input and its float logits, and compute exactly what that file computed."""
    import dataclasses

    model, batches, x, _ = small
    tf_model = type(model)(dataclasses.replace(model.config, padding="tf_same")).eval()
    tf_model.load_state_dict(model.state_dict())
    ready = quantize.prepare_int8(tf_model, batches)
    with_pads = quantize.to_model(ready, tf_model)
    path = deploy.export(with_pads, tmp_path / "q.pte", precision="int8", calibration=batches, resolution=RES)
    summary = executorch.program_summary(path.read_bytes())
    assert_all_in_xnnpack(summary)
    assert weighted_types(summary) == INT8
    kinds = summary["xnnpack_nodes"]
    assert kinds["XNNStaticConstantPad"] == 5 and kinds["XNNConvert"] == 2, kinds  # 1 + 4 stride-2 depthwise
    logits = deploy.load_exported(path)(x)
    # the int8 arithmetic we meant.  Each layer fed XNNPACK's own int8 input gives what XNNPACK gives when
    # computed as int8 x int8 summed exactly, plus the bias rounded to int32 at input x weight scale (as
    # ExecuTorch writes it), requantized in fp32, half to even: bit for bit, all 27 layers.  The simulation
    # (float32 sums) differs only where a value lies within 2e-5 of a step of a rounding tie: 7 of 2.5M
    # values; the pool and the logits are exact.  27 layers amplify those flips to at most 4 logit steps:
    # measured cosine 0.99984-0.99985 (torch at 1 and 2 threads).  While the simulation kept float biases it
    # missed up to half an accumulator step (<= 0.008 output steps), which flipped 0.03-0.2% of each layer's
    # values, 10 logit steps by the end: cosine 0.9961 (0.9986 at 1 thread), where this bound failed
    assert deploy.parity(ready.simulate(x), logits)["cosine"] >= 0.9995
    # and nothing changes when the pads run in float between a dequantize and a quantize (the plain flow)
    monkeypatch.setattr(executorch, "_quantize_before_pads", lambda prepared: None)
    float_pads = deploy.export(with_pads, tmp_path / "f.pte", precision="int8", calibration=batches, resolution=RES)
    assert executorch.program_summary(float_pads.read_bytes())["xnnpack_nodes"]["XNNConvert"] == 10
    assert torch.equal(deploy.load_exported(float_pads)(x), logits)


def test_small_model_plain_int8_is_xnnpacks_own_calibration(small, tmp_path):
    model, batches, x, reference = small
    path = deploy.export(model, tmp_path / "p.pte", precision="int8", calibration=batches, resolution=RES,
                         int8="plain")
    summary = executorch.program_summary(path.read_bytes())
    assert_all_in_xnnpack(summary)
    assert weighted_types(summary) == INT8
    # XNNPACK's quantizer observes each convolution before its ReLU6, which then runs as a clamp of its own
    assert summary["xnnpack_nodes"]["XNNClamp"] == LAYERS - 1
    assert min(n["zero_point"] for n in summary["weighted"][:-1]) > -128  # pre-activation ranges hold negatives
    assert deploy.parity(reference, deploy.load_exported(path)(x))["cosine"] >= 0.95  # measured 0.977-0.991


def test_real_weights_fp32_and_int8(tmp_path):
    real_data = pytest.importorskip("real_data")
    model = real_data.real_model()
    calib = list(real_data.inception_input(real_data.calibration_crops(32)).split(16))
    x = real_data.inception_input(real_data.heldout_crops(64))
    with torch.no_grad():
        reference = model(x)
    fp32 = deploy.export(model, tmp_path / "f.pte")
    assert_all_in_xnnpack(executorch.program_summary(fp32.read_bytes()))
    p = deploy.parity(reference, deploy.load_exported(fp32)(x))
    # measured max diff 8e-5 on logits up to ~20: a 25x margin
    assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] <= 1e-4 * float(reference.abs().max()), p

    ready = quantize.prepare_int8(model, calib)
    int8 = deploy.export(quantize.to_model(ready, model), tmp_path / "q.pte", precision="int8", calibration=calib)
    summary = executorch.program_summary(int8.read_bytes())
    assert_all_in_xnnpack(summary)
    assert weighted_types(summary) == INT8
    assert_our_ranges(summary, ready.ranges)
    assert summary["xnnpack_nodes"]["XNNConvert"] == 2  # float in, float out: TF's pads stay int8
    assert int8.stat().st_size < 0.3 * fp32.stat().st_size  # int8 weights: a quarter of the float file
    measured = deploy.parity(reference, deploy.load_exported(int8)(x))
    # measured on these crops: 95.3% agreement, mean KL 0.0138 nats (XNNPACK's own calibration: ~71%, ~0.45)
    assert measured["top1_agreement"] >= 0.90 and measured["mean_kl"] <= 0.025, measured


def test_a_convolution_outside_xnnpack_is_refused(small_fp32):
    summary = executorch.program_summary(small_fp32.read_bytes())
    executorch.check_delegated(summary, LAYERS, "fp32")
    with pytest.raises(deploy.DeployError, match="1 of 28 weighted layers outside XNNPACK"):
        executorch.check_delegated({**summary, "operators": summary["operators"] + ["aten::convolution.out"],
                                    "weighted": summary["weighted"][1:]}, LAYERS, "fp32")
    with pytest.raises(deploy.DeployError, match="28 of 28 weighted layers outside XNNPACK int8"):
        executorch.check_delegated(summary, LAYERS, "int8")  # float convolutions in a file called int8


def test_refusals_are_one_line(tmp_path, small):
    model = small[0]
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(deploy.DeployError, match="ExecuTorch cannot load"):
        deploy.load_exported(bad)
    with pytest.raises(deploy.DeployError, match="not an ExecuTorch program"):
        executorch.program_summary(bad.read_bytes())
    with pytest.raises(deploy.DeployError, match="cannot export bf16 as executorch"):
        deploy.export(model, tmp_path / "m.pte", precision="bf16")
    with pytest.raises(deploy.DeployError, match="run fp32 or int8"):
        deploy.compile(model, "bf16", batch_size=2, resolution=RES, backend="executorch")


def test_compile_builds_it_when_named_and_auto_leaves_it_out(small, monkeypatch, tmp_path):
    """Named, it is an in-process backend at a fixed batch; auto does not spend its lowering time on it."""
    model, _, x, reference = small
    predictor = deploy.compile(model, "fp32", batch_size=4, resolution=RES, backend="executorch")
    assert predictor.backend == "executorch"
    summary = executorch.program_summary(executorch.pte_bytes(deploy.fold_batchnorm(model), "fp32", [], RES, 4))
    assert summary["delegates"] == ["XnnpackBackend"] and len(summary["weighted"]) == LAYERS
    with torch.no_grad():
        assert deploy.parity(reference, torch.cat([predictor(b) for b in x.split(4)]))["top1_agreement"] == 1.0
    # an exported file holds one image a call, as apps run it (a dynamic batch cost 2-4%: benchmarks/edge_runtimes.py)
    assert executorch.runner(deploy.export(model, tmp_path / "m.pte", resolution=RES).read_bytes()).limit == 1
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    # nor its import: ExecuTorch's runtime took 5 of predict's 5.4 s of setup before auto skipped it
    asked = []
    monkeypatch.setattr(type(deploy.backend.get("executorch")), "available", lambda self: asked.append(1) or True)
    assert "executorch" not in deploy.compile(model, "fp32", batch_size=4, resolution=RES).timings
    assert not asked
