"""deploy: BatchNorm folding, every backend's parity with fp32 eager, int8 calibration, auto, export round trips.

Models are tiny (alpha 0.25 at 32 px) so Inductor compiles in seconds; timing is never asserted.  The model
is briefly fitted to the built-in digits (benchmark.make_model): parity on random BatchNorm networks means
little, they amplify any perturbation (or saturate and hide it).
"""

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenets import deploy, mobilenet_v1
from mobilenets.benchmark import make_model

RES = 32


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


@pytest.fixture(scope="module")
def model():
    return make_model(0.25, steps=70, resolution=RES)


@pytest.fixture(scope="module")
def calibration():
    batches, labels = deploy.builtin_batches(RES, limit=32)
    return batches


@pytest.fixture(scope="module")
def images(calibration):
    return torch.cat(calibration)[:16]


@pytest.fixture(scope="module")
def reference(model, images):
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def bf16_kl(model, images, reference):
    """Mean KL of the model cast to bf16 in eager PyTorch (weights, input and every activation rounded): the
    error bf16 itself costs this model, which a runtime's bf16 is held to."""
    import copy

    with torch.no_grad():
        cast = copy.deepcopy(model).to(torch.bfloat16)(images.to(torch.bfloat16)).float()
    return deploy.parity(reference, cast)["mean_kl"]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# ---------------------------------------------------------------- folding


@pytest.mark.parametrize("options", [
    {}, {"padding": "tf_same"}, {"activation": "relu"}, {"num_classes": 0}, {"shallow": True},
    {"output_stride": 16}, {"bn_eps": 1e-5},
])
def test_fold_batchnorm_gives_the_eval_logits(options):
    m = mobilenet_v1(0.25, **options)
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    m.eval()
    x = torch.randn(3, 3, 67, 75, generator=g)  # odd sizes exercise TF SAME's asymmetric padding
    folded = deploy.fold_batchnorm(m)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-4, atol=1e-5)
    assert m.training is False and all(p.requires_grad for p in m.parameters())  # the original is untouched


def test_fold_refuses_other_modules():
    with pytest.raises(TypeError, match="MobileNetV1"):
        deploy.fold_batchnorm(torch.nn.Conv2d(3, 8, 3))


def test_torch_path_runs_onednn_convolutions_with_relu6_fused(model):
    """What the PyTorch path promises: BN gone, weights frozen into prepacked oneDNN convs, ReLU6 a post-op."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: deploy.backend.build("torch", deploy.fold_batchnorm(model), "fp32", [], 1, RES))
    code = "\n".join(codes)
    assert code.count("mkldnn._convolution_pointwise") == 27  # 1 stem + 13 x (depthwise + pointwise)
    assert code.count("'hardtanh', [0.0, 6.0]") == 27
    assert "batch_norm" not in code and "_frozen_param" in code


# ---------------------------------------------------------------- each backend's parity

# Bars set from what was measured on these 16 digits (alpha 0.25, 32 px; AMD EPYC with AVX-512 VNNI/BF16):
#   cosine:  bf16 0.99990 (torch, openvino); int8 0.99931 torch, 0.99928 onnxruntime, 0.99801 openvino
#   mean KL: bf16 0.0035 nats; int8 0.020 torch, 0.012 onnxruntime, 0.066 openvino
#   top-1 agreement: 15 or 16 of 16 on every path
# Margins: cosine bars leave about 2.5x the measured gap to 1 (0.999 for bf16, 0.995 for int8); KL bars about
# 2.5x the worst measured value (0.01 bf16, 0.15 int8); agreement allows one image more than the worst path
# (14 of 16), since another CPU's int8 kernels (AVX2 vs VNNI) may round differently.  fp32 is held to 1e-3 on
# the logits below; its KL bar (1e-6) is that closeness restated, not a measured figure.
# On a CPU without VNNI (AVX2 only: an AMD EPYC without AVX-512 here) int8 is prepared with 7-bit weights, since
# its int8 kernels add u8 x s8 pairs into saturating int16 (docs/deploy.md); measured there on these 16 digits:
# cosine 0.99944 torch, 0.99962 onnxruntime, 0.99920 openvino, 0.99962 litert; mean KL 0.033, 0.012, 0.027, 0.012;
# agreement 15, 15, 14, 15 of 16: inside the bars above, which hold on every CPU.  (With full-range weights the
# same paths measured KL 0.16-0.20 and 12 of 16 there: the bars catch saturation.)
from cpu import BF16 as CPU_BF16  # noqa: E402 (OpenVINO runs bf16 only with bf16 instructions)
MIN_COSINE = {"fp32": 0.999, "bf16": 0.999, "int8": 0.995}
MAX_MEAN_KL = {"fp32": 1e-6, "bf16": 0.01, "int8": 0.15}
# The digits model is trained here, so how much bf16 moves it depends on the CPU that trained it: on a 2-core
# EPYC with AVX-512 BF16 (not the one the bars above were measured on) the model cast to bf16 in eager PyTorch
# itself measured KL 0.0170 (15 of 16 agree), and torch and OpenVINO bf16 0.0196 (1.15x it).  So a runtime's
# bf16 is held to twice the error of that plain cast, or the fixed bar where that is larger: it catches a
# runtime that loses twice what bf16 itself does (fp16 accumulation, a layer run wrong), not the rounding
# every bf16 path shares.
BF16_KL_OVER_CAST = 2.0
MIN_AGREEMENT = 14 / 16
CASES = [
    ("torch", "fp32"), ("torch", "bf16"), ("torch", "int8"),
    ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
    ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
    ("litert", "fp32"), ("litert", "int8"),
]


@pytest.mark.parametrize("backend,precision", CASES)
def test_backend_parity_with_fp32_eager(model, calibration, images, reference, bf16_kl, backend, precision):
    predictor = deploy.compile(model, precision, calibration=calibration, batch_size=4, resolution=RES,
                               backend=backend)
    assert (predictor.backend, predictor.precision, predictor.batch_size) == (backend, precision, 4)
    out = predictor(images)  # 16 images through a batch-4 predictor: four chunks
    assert out.shape == reference.shape and out.dtype == torch.float32
    p = deploy.parity(reference, out)
    assert p["cosine"] >= MIN_COSINE[precision]
    bar = max(MAX_MEAN_KL[precision], BF16_KL_OVER_CAST * bf16_kl) if precision == "bf16" else MAX_MEAN_KL[precision]
    assert p["mean_kl"] <= bar
    assert p["top1_agreement"] >= MIN_AGREEMENT
    if precision == "fp32":
        torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)
    elif backend == "openvino" and precision == "bf16" and not CPU_BF16:
        torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)  # OpenVINO's fp32 fallback
    else:  # really run at lower precision: fp32 paths differ by ~2e-5 here, bf16 by ~0.5 and int8 by 1.0-1.8
        assert float((out - reference).abs().max()) > 0.05


def test_predictor_pads_odd_batches_and_takes_numpy(model, images, reference):
    predictor = deploy.compile(model, "fp32", batch_size=3, resolution=RES, backend="onnxruntime")
    out = predictor(images[:5].numpy())  # 3 + 2 (padded to 3)
    torch.testing.assert_close(out, reference[:5], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(predictor(images[0]), reference[:1], rtol=1e-3, atol=1e-4)  # one (3, H, W) image


def test_predictor_errors_say_what_would_work(model, images):
    predictor = deploy.compile(model, "fp32", batch_size=2, resolution=RES, backend="onnxruntime")
    with pytest.raises(ValueError, match=r"compiled for 32x32.*resolution=96"):
        predictor(torch.zeros(2, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        predictor(torch.zeros(2, 1, 32, 32))
    with pytest.raises(TypeError, match="float"):
        predictor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_bad_arguments_are_refused_before_building(model, calibration):
    from mobilenets.errors import MobilenetsError

    assert issubclass(deploy.DeployError, MobilenetsError)  # the CLI prints these as one line
    with pytest.raises(deploy.DeployError, match="precision must be one of"):
        deploy.compile(model, "fp16")
    with pytest.raises(deploy.DeployError, match="backend must be"):
        deploy.compile(model, backend="tensorrt")
    with pytest.raises(deploy.DeployError, match="no bf16"):
        deploy.compile(model, "bf16", backend="onnxruntime")
    with pytest.raises(deploy.DeployError, match="calibration"):
        deploy.compile(model, "int8", backend="onnxruntime", resolution=RES)
    with pytest.raises(deploy.DeployError, match="batch_size"):
        deploy.compile(model, batch_size=0)
    with pytest.raises(deploy.DeployError, match="resolution must be"):
        deploy.compile(model, resolution=16)
    with pytest.raises(ValueError, match="compiled for 32x32"):
        deploy.compile(model, "int8", calibration=[torch.zeros(2, 3, 64, 64)], resolution=RES, backend="onnxruntime")
    with pytest.raises(deploy.DeployError, match="empty"):
        deploy.compile(model, "int8", calibration=[], resolution=RES, backend="onnxruntime")


def test_calibration_takes_loader_pairs_and_any_batch_size(model, calibration, reference, images):
    pairs = [(b, torch.zeros(len(b), dtype=torch.long)) for b in calibration]  # what a DataLoader yields
    predictor = deploy.compile(model, "int8", calibration=pairs, batch_size=5, resolution=RES, backend="onnxruntime")
    assert cosine(predictor(images), reference) >= MIN_COSINE["int8"]


def test_int8_calibration_matters(model, images, reference):
    """Calibrating on blank images instead of real ones must cost agreement: the activation ranges are used."""
    good = deploy.compile(model, "int8", calibration=[images], resolution=RES, backend="onnxruntime")
    blank = deploy.compile(model, "int8", calibration=[torch.full_like(images, -1.0)], resolution=RES,
                           backend="onnxruntime")
    assert cosine(good(images), reference) > cosine(blank(images), reference)


def test_int8_ready_weights_compile_without_calibration(model, calibration, images, tmp_path, monkeypatch):
    """Weights from mobilenets quantize carry their ranges: compile needs no calibration images and runs none,
    except on the torch backend, whose observers measure ranges (it says so, and which backends do not)."""
    from mobilenets import load, quantize

    ready_model = load(quantize.save(quantize.prepare_int8(model, calibration), model, tmp_path / "r.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated although the weights carry their int8 ranges")

    monkeypatch.setattr(quantize, "prepare_int8", refuse)
    without = deploy.compile(ready_model, "int8", resolution=RES, backend="onnxruntime")
    given = deploy.compile(ready_model, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")
    assert torch.equal(without(images), given(images))  # the model's own ranges either way
    with pytest.raises(deploy.DeployError, match=r"'torch' measures int8 activation ranges on calibration "
                                                 r"images: pass calibration=.*'onnxruntime'"):
        deploy.compile(ready_model, "int8", resolution=RES, backend="torch")
    with pytest.raises(deploy.DeployError, match="int8 needs calibration data"):  # plain int8 has no ranges
        deploy.compile(ready_model, "int8", resolution=RES, backend="onnxruntime", int8="plain")
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    for name in deploy.BACKENDS:  # stubs keep the test quick
        monkeypatch.setattr(deploy.backend.get(name), "build", lambda *a: (lambda x: x))
    chosen = deploy.compile(ready_model, "int8", batch_size=1, resolution=RES)
    assert "onnxruntime" in chosen.timings and "torch" not in chosen.timings
    assert "torch" in deploy.compile(ready_model, "int8", calibration=calibration, batch_size=1,
                                     resolution=RES).timings


def test_int8_preparation_is_cached_per_weights_calibration_and_code(model, calibration, images, tmp_path,
                                                                      monkeypatch):
    """The second compile of the same weights on the same calibration reads the first one's int8 preparation
    (the same logits, bit for bit) instead of preparing again; other weights or images prepare anew, a
    damaged cache file is prepared again, and the cache keeps its newest entries only."""
    from mobilenets import quantize
    from mobilenets.deploy import prepare

    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    first = deploy.compile(model, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")
    real_prepare, prepared = quantize.prepare_int8, []
    monkeypatch.setattr(quantize, "prepare_int8", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    again = deploy.compile(model, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")
    assert not prepared and torch.equal(first(images), again(images))
    assert sorted(f.suffix or f.name for f in (tmp_path / "int8").iterdir()) == [".key", ".safetensors", ".sig"]

    # what the result depends on is in the key: the calibration images, the weights
    deploy.compile(model, "int8", calibration=calibration[:-1], resolution=RES, backend="onnxruntime")
    other = mobilenet_v1(0.25, num_classes=10).eval()
    deploy.compile(other, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")
    assert len(prepared) == 2 and len(list((tmp_path / "int8").glob("*.safetensors"))) == 3
    # read back, it keeps the resolution it was calibrated at, not the one its weights' metadata names
    assert other.meta.resolution != RES
    assert prepare.prepared_int8(other, calibration).resolution == RES
    assert len(prepared) == 2

    # a damaged file is prepared again, to the same result, and mended
    cached = prepare.cache_path(model, calibration)
    cached.write_bytes(cached.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="ignoring the cached int8 preparation"):
        mended = deploy.compile(model, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")
    assert len(prepared) == 3 and torch.equal(first(images), mended(images))
    deploy.compile(model, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")
    assert len(prepared) == 3

    monkeypatch.setattr(prepare, "INT8_CACHE_ENTRIES", 2)
    deploy.compile(model, "int8", calibration=calibration[1:], resolution=RES, backend="onnxruntime")
    deploy.compile(model, "int8", calibration=calibration, resolution=RES, backend="onnxruntime")  # used again
    deploy.compile(model, "int8", calibration=calibration[2:], resolution=RES, backend="onnxruntime")
    assert len(prepared) == 5  # the least recently used went, not the oldest written:
    assert len(list((tmp_path / "int8").glob("*.safetensors"))) == 2 and cached.is_file()
    assert len(list((tmp_path / "int8").glob("*.sig"))) == 2


def test_int8_is_prepared_once_on_every_calibration_image_whatever_the_jobs_batch_size(model, calibration, tmp_path,
                                                                                          monkeypatch):
    """The 32 calibration images given are what the int8 weights are prepared on, for a job of batch 24 (which
    once kept 24 of them) as for batch 16, which then reads that one preparation instead of making its own."""
    from mobilenets import quantize

    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    real_prepare, rows = quantize.prepare_int8, []
    monkeypatch.setattr(quantize, "prepare_int8",
                        lambda m, batches, **k: rows.append(sum(len(b) for b in batches)) or real_prepare(m, batches, **k))
    heard = []
    for batch_size in (24, 16):
        deploy.compile(model, "int8", calibration=calibration, batch_size=batch_size, resolution=RES,
                       backend="onnxruntime", log=heard.append)
    assert sum(len(b) for b in calibration) == 32 and rows == [32]
    assert any("preparing the weights on 32 calibration images" in line for line in heard)


OUT_OF_ORDER = """
import gc, os, signal, sys, warnings
warnings.simplefilter("ignore")
import torch
from mobilenets import deploy, mobilenet_v1
model = mobilenet_v1(0.25, num_classes=10).eval()
heard = []
signal.signal(signal.SIGUSR1, lambda *a: heard.append(1))  # Python handlers run on the signal stack
for _ in range(4):
    first = deploy.compile(model, "fp32", batch_size=2, resolution=32, backend="openvino")
    second = deploy.compile(model, "fp32", batch_size=2, resolution=32, backend="openvino")
    first(torch.zeros(2, 3, 32, 32)), second(torch.zeros(2, 3, 32, 32))
    del first; gc.collect()  # destroyed out of order: each puts back the stack it found
    del second; gc.collect()
    filler = [bytearray(1 << 16) for _ in range(64)]  # the freed buffers get reused
    os.kill(os.getpid(), signal.SIGUSR1)
print(len(heard))
"""


def test_openvino_models_destroyed_out_of_order_leave_signals_deliverable():
    """OpenVINO's CPU plugin leaves the thread on a freed signal stack when its models are destroyed out of
    order; without own_signal_stack the next handled signal killed the process (SIGSEGV), as it killed the
    test suite after a few hundred compiles."""
    done = subprocess.run([sys.executable, "-c", OUT_OF_ORDER], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "4", (done.returncode, done.stderr[-1000:])


# ---------------------------------------------------------------- auto


def test_auto_measures_once_then_reuses_its_choice(model, images, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    monkeypatch.setattr(deploy.auto.cores, "busy_cores", lambda *a: 0.0)  # a quiet machine: the choice is final
    first = deploy.compile(model, "fp32", batch_size=2, resolution=RES)
    assert first.backend in deploy.available_backends()
    assert set(first.timings) == {"torch", "onnxruntime", "openvino", "litert"}  # every candidate was timed
    assert first.backend == min(first.timings, key=first.timings.get)
    cache = json.loads((tmp_path / "auto-backend.json").read_text())
    assert [v["backend"] for v in cache.values()] == [first.backend]

    # a second compile builds only the cached winner: prove it by making the others fail to build
    def boom(*a, **k):
        raise AssertionError("auto rebuilt a candidate although its choice was cached")

    for name in deploy.BACKENDS:
        if name != first.backend:
            monkeypatch.setattr(deploy.backend.get(name), "build", boom)
    second = deploy.compile(model, "fp32", batch_size=2, resolution=RES)
    assert second.backend == first.backend and second.timings == first.timings
    assert cosine(second(images), reference) >= 0.999


def test_auto_measures_again_once_the_machine_is_quiet(model, tmp_path, monkeypatch):
    """A choice measured while other work kept a core busy serves while it stays busy, and is measured again
    when the machine is quiet; a choice measured quiet is never measured again."""
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    built = []
    for name in deploy.BACKENDS:  # stubs keep the test quick; each build is counted
        monkeypatch.setattr(deploy.backend.get(name), "build",
                            lambda *a, name=name: built.append(name) or (lambda x: x))
    busy = [1.0]
    monkeypatch.setattr(deploy.auto.cores, "busy_cores", lambda *a: busy[0])
    deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    entry, = json.loads((tmp_path / "auto-backend.json").read_text()).values()
    assert entry["busy_cores"] == 1.0 and len(built) == 4
    deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    assert len(built) == 5  # still busy: the provisional winner alone
    busy[0] = 0.1
    deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    assert len(built) == 9  # quiet: every candidate measured again
    entry, = json.loads((tmp_path / "auto-backend.json").read_text()).values()
    assert entry["busy_cores"] == 0.1

    def unasked(*a):
        raise AssertionError("a choice measured on a quiet machine was checked again")

    monkeypatch.setattr(deploy.auto.cores, "busy_cores", unasked)
    deploy.compile(model, "fp32", batch_size=1, resolution=RES)
    assert len(built) == 10


def test_auto_never_offers_onnxruntime_for_bf16(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    for name in ("torch", "openvino"):  # stubs keep the test quick
        monkeypatch.setattr(deploy.backend.get(name), "build", lambda *a: (lambda x: x))
    p = deploy.compile(model, "bf16", batch_size=1, resolution=RES)
    assert set(p.timings) == {"torch", "openvino"}


CPUINFO = """processor\t: 0
model name\t: Test CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2 avx2
"""


@pytest.mark.parametrize("extra,native", [
    ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True), ("avx512f avx512bw", False), ("", False),
])
def test_cpu_feature_detection_reads_proc_cpuinfo(tmp_path, monkeypatch, extra, native):
    """bf16 counts as native only with AVX-512 BF16 or AMX BF16 in the first CPU's flags line."""
    from mobilenets.deploy import machine

    fake = tmp_path / "cpuinfo"
    fake.write_text(CPUINFO.format(extra=extra))
    monkeypatch.setattr(machine, "Path", lambda _: fake)
    assert deploy.cpu_flags() == {"fpu", "sse2", "avx2", *extra.split()}
    assert deploy.cpu_name() == "Test CPU @ 2.00GHz"
    assert deploy.bf16_supported() is native


@pytest.mark.parametrize("arch,extra,qmax", [
    ("x86_64", "", 64), ("x86_64", "avx512f avx512bw", 64), ("x86_64", "avx512f avx512_vnni", 127),
    ("x86_64", "avx_vnni", 127), ("x86_64", "amx_tile amx_int8", 127), ("aarch64", "", 127),
])
def test_int8_weight_grid_follows_the_cpus_int8_dot_product(tmp_path, monkeypatch, arch, extra, qmax):
    """x86 without VNNI adds each pair of u8 x s8 products into a saturating int16 (vpmaddubsw): weights on
    [-64, 64] keep every pair inside it, full-range ones do not; VNNI and AMX add into int32, ARM widens first."""
    from mobilenets.deploy import machine

    assert 2 * 255 * 64 <= 2 ** 15 - 1 < 2 * 255 * 127  # the two grids against int16, written out
    fake = tmp_path / "cpuinfo"
    fake.write_text(CPUINFO.format(extra=extra))
    monkeypatch.setattr(machine, "Path", lambda _: fake)
    monkeypatch.setattr(machine.platform, "machine", lambda: arch)
    assert machine.int8_weight_qmax() == qmax
    assert machine.int8_saturates() is (qmax == 64)


def _weight_ints(path) -> list:
    """The int8 weight tensors of one of our QDQ ONNX files, and its metadata."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith(".weight.q")], \
        {p.key: p.value for p in m.metadata_props}


def test_int8_built_here_is_7_bit_where_the_cpu_saturates_and_exports_stay_8_bit(model, calibration, images,
                                                                                 tmp_path, monkeypatch):
    from mobilenets import load, quantize
    from mobilenets.deploy import machine, prepare

    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "int8_saturates", lambda: True)  # an AVX2-only x86 CPU, wherever this runs
    here = prepare.folded_for(model, "int8", calibration).int8_ready
    assert here.weight_qmax == 64 and here.report["weight_qmax"] == 64
    weights, props = _weight_ints(quantize.to_qdq_onnx(here, tmp_path / "here.onnx", resolution=RES))
    # every output channel's largest weight is on +-64 (none beyond): the grid the simulation rounds to
    assert all(int(abs(w).reshape(len(w), -1).max(1).max()) == 64 for w in weights)
    assert props["mobilenets.int8_weight_qmax"] == "64"
    # an export is for other machines: the full grid, and the file says what it needs on x86
    weights, props = _weight_ints(deploy.export(model, tmp_path / "m.onnx", precision="int8",
                                                calibration=calibration, resolution=RES))
    assert max(int(abs(w).max()) for w in weights) == 127 and props["mobilenets.int8_weight_qmax"] == "127"
    assert "VNNI" in props["mobilenets.int8_weights"] and "weight_qmax=64" in props["mobilenets.int8_weights"]
    # a full-range file from mobilenets quantize is rounded to the 7-bit grid when built here, with a warning
    # saying what would work instead
    full = load(quantize.save(quantize.prepare_int8(model, calibration), model, tmp_path / "full.safetensors"))
    with pytest.warns(UserWarning, match=r"no VNNI.*prepare_int8\(weight_qmax=64\)"):
        rounded = prepare.folded_for(full, "int8", calibration).int8_ready
    assert rounded.weight_qmax == 64
    with torch.no_grad():
        assert torch.equal(rounded.simulate(images), quantize.on_weight_grid(quantize.from_model(full), 64)
                           .simulate(images))
    assert prepare.folded_for(full, "int8", [], here=False).int8_ready.weight_qmax == 127
    # a 7-bit file is read back 7-bit (version 2: a reader of version 1 would put it on the full grid)
    seven = load(quantize.save(here, model, tmp_path / "seven.safetensors"))
    assert seven.meta.int8["version"] == 2 and quantize.from_model(seven).weight_qmax == 64
    with torch.no_grad():  # within a logit step (measured: a few logits one step apart, float rounding of the
        # equalization undone and redone on the way through the file)
        step = quantize.sim.act_qparams(*here.ranges["logits"])[0]
        assert float((quantize.from_model(seven).simulate(images) - here.simulate(images)).abs().max()) <= 1.01 * step


def test_cpu_flags_of_this_machine_are_its_first_flags_line():
    lines = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")] \
        if Path("/proc/cpuinfo").is_file() else []
    assert deploy.cpu_flags() == (set(lines[0].split(":", 1)[1].split()) if lines else set())


# ---------------------------------------------------------------- export


SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt", "exported-program": ".pt2",
            "tflite": ".tflite", "executorch": ".pte", "coreml": ".mlpackage"}
EXPORTS = [(f, p) for f in deploy.EXPORT_FORMATS for p in deploy.PRECISIONS
           if (f, p) not in {("onnx", "bf16"), ("torchscript", "int8"), ("tflite", "bf16"), }
           # .pte files: tests/test_executorch.py (each lowering takes 10-20 s); Core ML does not run here
           # (tests/test_coreml.py checks its packages)
           and f not in ("executorch", "coreml")]


@pytest.mark.parametrize("fmt,precision", EXPORTS)
def test_export_reloads_with_parity(model, calibration, images, reference, tmp_path, fmt, precision):
    path = deploy.export(model, tmp_path / "model", fmt, precision=precision, calibration=calibration,
                         resolution=RES)
    assert path.is_file() and path.suffix == SUFFIXES[fmt]
    run = deploy.load_exported(path)
    out = run(images[:3])  # a batch size not used for export or calibration: the batch is dynamic
    p = deploy.parity(reference[:3], out)
    assert p["cosine"] >= MIN_COSINE[precision]
    if precision == "fp32":
        assert p["max_abs_diff"] < 1e-3


def test_openvino_export_keeps_its_precision(model, tmp_path):
    """OpenVINO runs float IR in bf16 on AMX unless told: an fp32 export must reload as fp32."""
    import openvino as ov

    path = deploy.export(model, tmp_path / "m.xml", "openvino", precision="fp32", resolution=RES)
    assert ov.Core().read_model(str(path)).get_rt_info(
        ["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "f32"


@pytest.mark.parametrize("fmt,precision,match", [
    ("onnx", "bf16", "no bf16"), ("torchscript", "int8", "TorchScript"), ("tflite", "bf16", "fp32 or int8"),
    ("coreml", "bf16", "fp16, fp32 or int8"), ("onnx", "fp16", "onnx files hold fp32 or int8; export fp16 as coreml"),
    ("webnn", "fp32", "format must be"),
])
def test_export_refuses_what_the_format_cannot_hold(model, tmp_path, fmt, precision, match):
    with pytest.raises(deploy.DeployError, match=match):
        deploy.export(model, tmp_path / "m", fmt, precision=precision, resolution=RES)


def test_load_exported_needs_a_known_format(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(deploy.DeployError, match="cannot tell the format"):
        deploy.load_exported(tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError):
        deploy.load_exported(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- calibration data


def test_image_batches_read_a_folder_and_skip_broken_files(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        batches, paths = deploy.image_batches(tmp_path, 32, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert len(paths) == 5


def test_builtin_calibration_is_real_labelled_images():
    batches, labels = deploy.builtin_batches(32, limit=20)
    x = torch.cat(batches)
    assert x.shape == (20, 3, 32, 32) and sorted(set(labels)) == list(range(10))
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.1


def test_rebatch_repeats_or_trims_rows():
    rows = [torch.arange(3.0).view(3, 1, 1, 1)]
    assert [b.shape[0] for b in deploy.rebatch(rows, 5)] == [5]
    assert [b.shape[0] for b in deploy.rebatch(rows * 3, 4)] == [4, 4]


def test_parity_reports_accuracy_with_labels():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = deploy.parity(ref, torch.tensor([[1.0, 0.1], [0.2, 0.1]]), labels=[0, 1])
    assert p["top1_agreement"] == 0.5 and p["reference_accuracy"] == 1.0 and p["accuracy"] == 0.5


def test_parity_mean_kl_is_kl_of_the_softmaxes_in_nats():
    ref = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    test = np.array([[1.5, 1.0, -0.5], [0.3, -0.2, 2.0]])

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(ref), softmax(test)
    expected = np.mean(np.sum(p * np.log(p / q), axis=1))  # KL(p || q), natural log: nats
    got = deploy.parity(torch.tensor(ref, dtype=torch.float32), torch.tensor(test, dtype=torch.float32))
    assert got["mean_kl"] == pytest.approx(expected, rel=1e-5)
    assert got["mean_kl"] != pytest.approx(np.mean(np.sum(q * np.log(q / p), axis=1)), rel=1e-3)  # not KL(q || p)
    assert got["cosine"] == pytest.approx(float(ref.ravel() @ test.ravel() / np.linalg.norm(ref) / np.linalg.norm(test)),
                                          rel=1e-6)
    assert deploy.parity(torch.tensor(ref), torch.tensor(ref))["mean_kl"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- temporary files


# what third-party runtimes keep in the temp folder on purpose, across calls: Inductor's compile cache
# (torchinductor_<user>, with its precompiled header) and ONNX Runtime's session id file
THIRD_PARTY_TEMP = (".ses",)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith("torchinductor_") and p.name not in THIRD_PARTY_TEMP)


# Each check runs in a child process whose TMPDIR is a fresh folder: pointing this process's temp folder
# somewhere that is deleted afterwards leaves runtimes (Inductor's cache, OpenVINO, ONNX Runtime) with paths into
# a removed folder, and this test process crashed (SIGSEGV) a few tests later.
TEMP_CHECK = """
import json, sys, tempfile, warnings
from pathlib import Path
import torch
warnings.simplefilter("ignore")
from mobilenets import deploy
from mobilenets.benchmark import make_model
case, out = sys.argv[1], Path(sys.argv[2])
model = make_model(0.25, steps=70, resolution=32)
calibration, _ = deploy.builtin_batches(32, limit=32)
images = torch.cat(calibration)[:16]
with torch.no_grad():
    reference = model(images)
if case == "auto+export":
    predictors = [deploy.compile(model, "fp32", batch_size=2, resolution=32)]
    deploy.export(model, out / "m.onnx", precision="int8", calibration=calibration, resolution=32)
else:
    predictors = [deploy.compile(model, p, calibration=calibration, batch_size=4, resolution=32, backend=case)
                  for p in ("fp32", "int8") if deploy.backend_supports(case, p)]
temp = Path(tempfile.gettempdir())
left = sorted(p.name for p in temp.iterdir())
cos = {p.precision: float(torch.nn.functional.cosine_similarity(p(images).flatten(), reference.flatten(), dim=0))
       for p in predictors}
print(json.dumps({"left": left, "cosine": cos}))
"""


def run_temp_check(case: str, tmp_path: Path) -> dict:
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    env = {**os.environ, "TMPDIR": str(folder), "MOBILENETS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", TEMP_CHECK, case, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["left"] = [n for n in result["left"] if not n.startswith("torchinductor_") and n not in THIRD_PARTY_TEMP]
    return result


@pytest.mark.parametrize("backend", deploy.BACKENDS)
def test_compile_leaves_no_temporary_files(backend, tmp_path):
    if not deploy.backend.get(backend).available():
        pytest.skip(f"{backend} is not installed")
    result = run_temp_check(backend, tmp_path)
    assert result["left"] == []
    for precision, cos in result["cosine"].items():  # what the predictors need was kept in memory
        assert cos >= MIN_COSINE[precision], (precision, cos)


def test_auto_and_export_leave_no_temporary_files(tmp_path):
    result = run_temp_check("auto+export", tmp_path)
    assert result["left"] == []
    assert (tmp_path / "m.onnx").is_file() and result["cosine"]["fp32"] >= 0.999


# ---------------------------------------------------------------- export file names


def test_export_format_follows_the_suffix(model, images, reference, tmp_path):
    path = deploy.export(model, tmp_path / "m.xml", resolution=RES)
    assert path == tmp_path / "m.xml" and (tmp_path / "m.bin").is_file()
    assert path.read_text().lstrip().startswith("<?xml")  # an OpenVINO IR, not ONNX bytes under an .xml name
    assert cosine(deploy.load_exported(path)(images[:2]), reference[:2]) >= 0.999
    assert deploy.export(model, tmp_path / "m.pt2", resolution=RES).suffix == ".pt2"
    assert deploy.export(model, tmp_path / "m", resolution=RES) == tmp_path / "m.onnx"


@pytest.mark.parametrize("name,fmt,match", [
    ("x.onnx", "openvino", r"x\.xml"), ("x.xml", "onnx", r"x\.onnx"), ("x.pt", "exported-program", r"x\.pt2"),
    ("model-0.25", "onnx", r"model-0\.25\.onnx"), ("x.h5", None, r"\.onnx \(onnx\)"),
])
def test_export_refuses_a_suffix_that_contradicts_the_format(model, tmp_path, name, fmt, match):
    with pytest.raises(deploy.DeployError, match=match):
        deploy.export(model, tmp_path / name, fmt, resolution=RES)
    assert list(tmp_path.iterdir()) == []


def test_export_command_refuses_a_contradicting_suffix_in_one_line(tmp_path):
    import mobilenets

    env = {**os.environ, "PYTHONPATH": str(Path(mobilenets.__file__).parents[1])}  # this checkout's code
    bad = subprocess.run([sys.executable, "-m", "mobilenets", "export", "--alpha", "0.25", "--resolution", "32",
                          "--format", "openvino", "--out", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "x.xml" in bad.stderr and not (tmp_path / "x.onnx").exists()


def test_export_command_takes_the_format_from_the_suffix(tmp_path, capsys):
    from mobilenets import cli

    code = cli.main(["export", "--alpha", "0.25", "--resolution", "32", "--calib-images", "8",
                     "--out", str(tmp_path / "m.xml"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "openvino" and report["path"] == str(tmp_path / "m.xml")
    assert (tmp_path / "m.xml").read_text().lstrip().startswith("<?xml") and (tmp_path / "m.bin").is_file()
    assert report["mean_kl"] < 1e-6 and report["top1_agreement"] == 1.0


# ---------------------------------------------------------------- int8 really is quantized


def test_onnx_int8_has_qdq_around_every_convolution(model, calibration, tmp_path):
    import onnx

    graph = onnx.load(str(deploy.export(model, tmp_path / "m.onnx", precision="int8", calibration=calibration,
                                        resolution=RES))).graph
    producer = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    # 1 stem + 13 x (depthwise + pointwise) + the classifier, which our QDQ graph runs as a quantized 1x1 conv
    assert len(convs) == 28
    for conv in convs:  # activation and weight both come out of a DequantizeLinear fed by a QuantizeLinear
        for name in conv.input[:2]:
            dq = producer.get(name)
            assert dq is not None and dq.op_type == "DequantizeLinear", conv.name
        assert producer[producer[conv.input[0]].input[0]].op_type == "QuantizeLinear", conv.name


def test_openvino_int8_runs_int8_convolutions(model, calibration, tmp_path):
    import openvino as ov

    ir = ov.Core().read_model(str(deploy.export(model, tmp_path / "m.xml", precision="int8", calibration=calibration,
                                                resolution=RES)))
    convs = [op for op in ir.get_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")]
    assert len(convs) == 28  # 27 + the classifier as a 1x1 conv (our QDQ graph)
    for conv in convs:  # quantized input: a FakeQuantize, or the Multiply of the QDQ graph's DequantizeLinear
        assert conv.input_value(0).get_node().get_type_name() in {"FakeQuantize", "Multiply"}, conv.get_friendly_name()
    # what the CPU plugin actually runs, on the path compile takes by default: every convolution in u8/i8, not f32
    from mobilenets.deploy.prepare import folded_for

    batches = deploy.rebatch(calibration, 4)
    run = deploy.backend.build("openvino", folded_for(model, "int8", batches), "int8", batches, 4, RES)
    runtime = run.compiled_model.get_runtime_model()
    precisions = [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert len(precisions) >= 27 and set(precisions) <= {"u8", "i8"}, precisions


def test_pt2e_int8_quantizes_every_convolution(model, calibration, tmp_path):
    path = deploy.export(model, tmp_path / "m.pt2", precision="int8", calibration=calibration, resolution=RES)
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    graph = torch.export.load(str(path)).graph
    convs = [n for n in graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert len(convs) == 27
    for conv in convs:
        x, w = conv.args[0], conv.args[1]
        assert "dequantize_per_tensor" in str(x.target), conv
        assert "dequantize_per_channel" in str(w.target), conv
        assert "quantize_per_tensor" in str(x.args[0].target), conv


def test_torch_int8_runs_onednn_int8_convolutions(model, calibration):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    batches = deploy.rebatch(calibration, 4)
    _, codes = run_and_get_code(lambda: deploy.backend.build("torch", deploy.fold_batchnorm(model), "int8", batches,
                                                             4, RES))
    code = "\n".join(codes)
    assert code.count("onednn.qconv_pointwise") == 27 and "mkldnn._convolution_pointwise" not in code


def test_onnxruntime_threads_sleep_when_the_process_asks_for_passive_waiting(model, tmp_path, monkeypatch):
    """Spinning between operators took the cores predict's decoding workers need; a process that asked
    OpenMP to wait passively (the CLI does) gets an ONNX Runtime pool that does the same."""
    pytest.importorskip("onnxruntime")
    from mobilenets.folding import fold_batchnorm
    from mobilenets.deploy.onnxruntime import export_onnx, ort_session

    path = export_onnx(fold_batchnorm(model), tmp_path / "m.onnx", resolution=64, batch_size=1)
    key = "session.intra_op.allow_spinning"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert ort_session(path).get_session_options().get_session_config_entry(key) == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(Exception, match="does not have configuration"):  # ONNX Runtime's default: spin
        ort_session(path).get_session_options().get_session_config_entry(key)


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """The uint8 pixels the digits were normalised from (x = p / 127.5 - 1), recovered exactly."""
    pixels = ((x + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(images_module.to_tensor(pixels), x)
    return pixels


import mobilenets.images as images_module  # noqa: E402


@pytest.mark.parametrize("backend,precision", CASES)
def test_pixels_and_streams_answer_as_the_float_input(model, calibration, images, reference, bf16_kl, backend,
                                                      precision):
    """uint8 pixels (normalised in OpenVINO's graph, by images.to_tensor elsewhere) and a stream of batches of
    other sizes than the compiled one (3 + 9 + 4 through batch 4: a short chunk padded, a long one split) give
    the float input's answers, in order, within the same bars."""
    predictor = deploy.compile(model, precision, calibration=calibration, batch_size=4, resolution=RES,
                               backend=backend)
    pixels = as_pixels(images)
    one = predictor.pixels(pixels, images_module.INCEPTION)
    streamed = list(predictor.stream([pixels[:3], pixels[3:12], pixels[12:]], images_module.INCEPTION))
    assert [len(s) for s in streamed] == [3, 9, 4]
    floats = list(predictor.stream([images[:5], images[5:]]))  # float input streams too
    assert [len(s) for s in floats] == [5, 11]
    bar = max(MAX_MEAN_KL[precision], BF16_KL_OVER_CAST * bf16_kl) if precision == "bf16" else MAX_MEAN_KL[precision]
    for out in (one, torch.cat(streamed), torch.cat(floats)):
        p = deploy.parity(reference, out)
        assert p["cosine"] >= MIN_COSINE[precision] and p["mean_kl"] <= bar and p["top1_agreement"] >= MIN_AGREEMENT
        if precision == "fp32":
            torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)
    # a stream is the same graph as one batch at a time, on other threads
    torch.testing.assert_close(torch.cat(streamed), one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_pixels_normalise_each_channel_as_to_tensor(model, images, backend):
    """ImageNet's mean and std differ per channel: a channel's constants applied to another, or mean and std
    swapped, move the logits by far more than float rounding (2e-5 here)."""
    predictor = deploy.compile(model, "fp32", batch_size=4, resolution=RES, backend=backend)
    pixels = as_pixels(images)
    with torch.no_grad():
        expected = model(images_module.to_tensor(pixels, images_module.IMAGENET))
    torch.testing.assert_close(predictor.pixels(pixels, images_module.IMAGENET), expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.cat(list(predictor.stream([pixels[:7], pixels[7:]], images_module.IMAGENET))),
                               expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(TypeError, match="uint8 pixels need a normalization"):
        next(predictor.stream([pixels]))
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        predictor.pixels(images, images_module.IMAGENET)


class _Watched:
    """An OpenVINO object whose infer requests count how many are started and not yet waited for."""

    def __init__(self, inner, counts):
        self._inner, self._counts = inner, counts

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def create_infer_request(self):
        return _Watched(self._inner.create_infer_request(), self._counts)

    def start_async(self, *args, **kwargs):
        self._counts["now"] += 1
        self._counts["most"] = max(self._counts["most"], self._counts["now"])
        return self._inner.start_async(*args, **kwargs)

    def wait(self):
        self._counts["now"] -= 1
        return self._inner.wait()


def test_openvino_streams_as_many_batches_at_once_as_openvino_asks(model, images, monkeypatch):
    """``Predictor.stream`` hands OpenVINO the next batches while it runs one: as many at once as OpenVINO says
    a graph compiled for throughput wants (its OPTIMAL_NUMBER_OF_INFER_REQUESTS: one per stream, 2 on 2 cores),
    never more.  A single call runs on a graph compiled for latency, built for the predictor's batch (1 by
    default), which is what ``compiled_model`` shows."""
    from mobilenets.deploy import openvino as ov_backend

    real, compiled, counts = ov_backend.openvino_compile, [], {"now": 0, "most": 0}

    def watched(graph, *, precision, throughput):
        c = real(graph, precision=precision, throughput=throughput)
        compiled.append((throughput, c.get_property("PERFORMANCE_HINT"), c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return _Watched(c, counts)

    monkeypatch.setattr(ov_backend, "openvino_compile", watched)
    predictor = deploy.compile(model, "fp32", resolution=RES, backend="openvino")
    assert predictor.batch_size == 1
    out = list(predictor.stream([images[k:k + 1] for k in range(8)]))
    (throughput, hint, wanted), = compiled
    assert throughput and str(hint) == "THROUGHPUT"
    assert counts["most"] == wanted and counts["now"] == 0
    if len(os.sched_getaffinity(0)) >= 2:
        assert wanted >= 2  # else this test could not tell one at a time from several
    torch.testing.assert_close(torch.cat(out), predictor(images[:8]), rtol=1e-5, atol=1e-5)
    runs = predictor._run.compiled_model  # the graph single calls run
    assert str(runs.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert list(runs.input(0).get_partial_shape().to_shape()) == [1, 3, RES, RES]
    assert [c[0] for c in compiled] == [True, False]


def test_openvino_int8_of_its_own_without_nncf_says_what_would_work(model, calibration, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))  # nothing built before: the build itself runs
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError, as where it is not installed
    with pytest.raises(deploy.DeployError, match=r"int8 on OpenVINO needs NNCF \(pip install nncf\); or use backend"):
        deploy.compile(model, "int8", calibration=calibration, resolution=RES, backend="openvino", int8="plain")
