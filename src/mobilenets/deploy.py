"""Fast CPU inference: BatchNorm folding, compiled PyTorch, int8, export, and the optional runtimes.

``compile(model, precision, calibration, batch_size, resolution, backend)``
returns a :class:`Predictor`: call it with a preprocessed ``(N, 3, H, W)``
float tensor or array and it returns ``(N, classes)`` float32 logits.

Backends:

- ``"torch"``: BatchNorm folded into the convolutions (conv + bias + ReLU6
  per layer), channels_last, Inductor with freezing so the convolutions become
  oneDNN primitives with prepacked weights and the clamp fused as a post-op.
  ``bf16`` runs the same graph in bfloat16 (AMX / avx512_bf16 tiles where the
  CPU has them); ``int8`` is PT2E post-training quantization
  (``X86InductorQuantizer``: per-channel symmetric int8 weights, per-tensor
  uint8 activations observed on the calibration batches) lowered by Inductor
  to oneDNN int8 convolutions.
- ``"onnxruntime"`` (extra ``deploy``): the folded graph exported to ONNX;
  ``int8`` is ONNX Runtime's static QDQ quantization with per-channel weights.
  ONNX Runtime has no bf16 CPU kernels.
- ``"openvino"`` (extra ``deploy``): the folded graph converted by OpenVINO;
  ``bf16`` is its inference-precision hint, ``int8`` is NNCF post-training
  quantization on the same calibration batches.
- ``"auto"``: builds every backend available for the precision, times each
  once at the requested batch and resolution (five interleaved rounds; the
  lower quartile of the call times), keeps the fastest, and caches
  that choice (keyed by CPU, library versions and model shape) in
  ``$MOBILENETS_CACHE`` (default ``~/.cache/mobilenets``), so later calls
  build only the winner.

A predictor is built for one batch size and one resolution: other batch sizes
are run in chunks of ``batch_size`` (the last one padded), so a compiled
graph never recompiles; other resolutions are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write
from .model import ConvBNAct, MobileNetV1

PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("torch", "onnxruntime", "openvino")
EXPORT_FORMATS = ("onnx", "openvino", "torchscript", "exported-program")
DEFAULT_RESOLUTION = 224


class DeployError(ValueError):
    """A request this machine or backend cannot serve; the message says what would work."""


# ---------------------------------------------------------------- machine


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_supported() -> bool:
    """True when the CPU computes bfloat16 natively (AMX tiles or AVX-512 BF16); elsewhere bf16 is emulated and slow."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cache_dir() -> Path:
    """Where measured choices and benchmarks are cached: $MOBILENETS_CACHE, default ~/.cache/mobilenets."""
    return Path(os.environ.get("MOBILENETS_CACHE") or Path.home() / ".cache" / "mobilenets")


def available_backends() -> list[str]:
    """The backends importable here, torch first."""
    found = ["torch"]
    for name, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def backend_supports(backend: str, precision: str) -> bool:
    return not (backend == "onnxruntime" and precision == "bf16")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DeployError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_backend(backend: str, precision: str) -> None:
    if backend not in (*BACKENDS, "auto"):
        raise DeployError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return
    if backend not in available_backends():
        raise DeployError(f"backend {backend!r} is not installed; pip install 'mobilenets[deploy]' "
                          f"(or pip install {backend}), or use one of {available_backends()}")
    if not backend_supports(backend, precision):
        raise DeployError("onnxruntime has no bf16 CPU kernels; for bf16 use backend 'torch' or 'openvino'")


# ---------------------------------------------------------------- folding


class FoldedConv(nn.Module):
    """A convolution with BatchNorm folded into its weight and bias, then the activation (ReLU6 as a clamp)."""

    def __init__(self, conv: nn.Conv2d, tf_pad: bool, clamp_max: float | None):
        super().__init__()
        self.conv = conv
        self.tf_pad = tf_pad
        self.clamp_max = clamp_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_pad:
            k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
            ih, iw = x.shape[-2], x.shape[-1]
            ph = max((-(-ih // s) - 1) * s + (k - 1) * d + 1 - ih, 0)
            pw = max((-(-iw // s) - 1) * s + (k - 1) * d + 1 - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        x = self.conv(x)
        # hardtanh(0, 6) is what oneDNN, ONNX (Clip) and OpenVINO all fuse into the conv as a post-op
        return F.hardtanh(x, 0.0, self.clamp_max) if self.clamp_max is not None else F.relu(x)


class FoldedMobileNet(nn.Module):
    """Inference-only MobileNet v1: BatchNorm folded into each convolution, no dropout. Same logits as eval()."""

    def __init__(self, layers: list[FoldedConv], classifier: nn.Module):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps) (+ conv bias through the same scale)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach() * scale.view(-1, 1, 1, 1))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def fold_batchnorm(model: MobileNetV1) -> FoldedMobileNet:
    """A float32 inference copy of ``model`` with every BatchNorm folded into the convolution before it."""
    if not isinstance(model, MobileNetV1):
        raise TypeError(f"expected a mobilenets MobileNetV1 (mobilenets.mobilenet_v1 or mobilenets.load), "
                        f"got {type(model).__name__}")
    if model.config.activation not in ("relu6", "relu"):
        raise DeployError(f"cannot fuse activation {model.config.activation!r}")
    clamp = 6.0 if model.config.activation == "relu6" else None
    layers = []
    for m in model.features.modules():
        if isinstance(m, ConvBNAct):
            layers.append(FoldedConv(fold_conv_bn(m.conv, m.bn), m.tf_pad, clamp))
    classifier = copy.deepcopy(model.classifier)
    folded = FoldedMobileNet(layers, classifier).float().eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


# ---------------------------------------------------------------- calibration


def calibration_batches(calibration, resolution: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Normalise ``calibration`` (an iterable of (N,3,H,W) tensors/arrays, or (x, y) pairs) to float32 tensors."""
    if calibration is None:
        raise DeployError("int8 needs calibration data: pass calibration= an iterable of (N, 3, H, W) batches "
                          "of preprocessed images (mobilenets.deploy.image_batches(folder, resolution) reads a folder)")
    out = []
    for batch in calibration:
        if isinstance(batch, (tuple, list)) and batch and not isinstance(batch, torch.Tensor):
            batch = batch[0]  # (images, labels) from a DataLoader
        x = _as_tensor(batch)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        _check_shape(x, resolution)
        out.append(x)
    if not out:
        raise DeployError("calibration data is empty; int8 needs at least one batch of images")
    return out


def image_batches(directory, resolution: int, *, normalization=None, batch_size: int = 8,
                  limit: int | None = 256) -> tuple[list[torch.Tensor], list]:
    """Read up to ``limit`` images below ``directory`` with the evaluation preprocessing.

    Returns (batches, paths).  Unreadable files are skipped with a warning.
    """
    from . import images

    normalization = normalization or images.INCEPTION
    tensors, paths = [], []
    for path in images.list_images(directory):
        try:
            tensors.append(images.eval_transform(images.load_rgb(path), resolution, normalization))
            paths.append(path)
        except images.ImageError as e:
            images.warn_skipped(path, e)
        if limit and len(tensors) >= limit:
            break
    if not tensors:
        raise DeployError(f"no decodable images in {directory}")
    x = torch.stack(tensors)
    return list(x.split(batch_size)), paths


def builtin_batches(resolution: int, *, normalization=None, batch_size: int = 8,
                    limit: int = 64) -> tuple[list[torch.Tensor], list[int]]:
    """The built-in calibration set: ``limit`` held-out images of the built-in digits (data.Digits "val").

    Returns (batches, labels), classes spread evenly.  Real scans rather than
    noise, so activation ranges are those of natural inputs; for ImageNet
    models calibrate on your own images.
    """
    from . import images

    x, labels = _builtin(int(resolution), normalization or images.INCEPTION, int(limit))
    return list(x.split(batch_size)), list(labels)


@functools.lru_cache(maxsize=8)
def _builtin(resolution: int, normalization, limit: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    from . import data

    digits = data.Digits("val", resolution, data.EvalTransform(resolution, normalization))
    # round-robin over the ten digits so a short calibration set still sees every class
    by_class = [[i for i, t in enumerate(digits.targets) if t == c] for c in range(10)]
    order = [i for group in zip(*by_class) for i in group][:limit]
    return torch.stack([digits[i][0] for i in order]), tuple(digits.targets[i] for i in order)


def rebatch(batches: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The same calibration rows in batches of exactly ``batch_size`` (static-shape graphs take no other size).

    Rows are repeated when there are fewer than ``batch_size``; a short tail is dropped when there are more.
    """
    rows = torch.cat(batches)
    if len(rows) < batch_size:
        rows = rows.repeat(-(-batch_size // len(rows)), 1, 1, 1)[:batch_size]
    return list(rows[: len(rows) - len(rows) % batch_size].split(batch_size))


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array of shape (N, 3, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected preprocessed float input, got {x.dtype}; use mobilenets.images.eval_transform")
    return x.float()


def _check_shape(x: torch.Tensor, resolution: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected input of shape (N, 3, {resolution}, {resolution}), got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"this predictor was compiled for {resolution}x{resolution} input, got "
                         f"{x.shape[-2]}x{x.shape[-1]}; compile another with resolution={x.shape[-1]}")


# ---------------------------------------------------------------- predictor


class Predictor:
    """Runs one compiled model on ``(N, 3, H, W)`` preprocessed input and returns float32 logits.

    Attributes a caller can rely on: ``backend``, ``precision``, ``batch_size``,
    ``resolution``, ``timings`` (ms per batch of each backend ``auto`` tried,
    else empty).
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], *, backend: str, precision: str,
                 batch_size: int, resolution: int, detail: str = ""):
        self._run = run
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.resolution = resolution
        self.detail = detail
        self.timings: dict[str, float] = {}

    def __repr__(self) -> str:
        return (f"Predictor(backend={self.backend!r}, precision={self.precision!r}, "
                f"batch_size={self.batch_size}, resolution={self.resolution})")

    def __call__(self, x) -> torch.Tensor:
        x = _as_tensor(x)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        _check_shape(x, self.resolution)
        n, b = x.shape[0], self.batch_size
        if n == b:
            return self._run(x)
        outputs = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            if chunk.shape[0] < b:  # pad rather than recompile for a new shape
                chunk = torch.cat([chunk, chunk.new_zeros((b - chunk.shape[0], *chunk.shape[1:]))])
            outputs.append(self._run(chunk)[: min(b, n - start)])
        return torch.cat(outputs)


def _example(batch_size: int, resolution: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- torch backend


def _inductor_compile(module: nn.Module, example: torch.Tensor, dtype: torch.dtype):
    """torch.compile with Inductor and freezing (weights become constants: prepacked oneDNN convs)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, backend="inductor", dynamic=False, fullgraph=True)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(example.to(dtype).contiguous(memory_format=torch.channels_last))  # compile now, not on first use
    return compiled


def quantize_pt2e(folded: FoldedMobileNet, batches: list[torch.Tensor], *, dynamic_batch: bool = False) -> nn.Module:
    """PT2E post-training int8 with X86InductorQuantizer: per-channel weights, activations observed on ``batches``."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError:
        try:  # older PyTorch shipped PT2E in torch.ao
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer, get_default_x86_inductor_quantization_config)
        except ImportError:
            raise DeployError("int8 on the torch backend needs torchao (pip install 'mobilenets[deploy]' "
                              "or pip install torchao); or use backend 'onnxruntime' or 'openvino'") from None
    example = batches[0].contiguous(memory_format=torch.channels_last)
    shapes = ({0: _batch_dim()},) if dynamic_batch else None
    exported = torch.export.export(folded, (example,), dynamic_shapes=shapes).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x.contiguous(memory_format=torch.channels_last))
    return convert_pt2e(prepared)


def _build_torch(folded: FoldedMobileNet, precision: str, batches, batch_size: int, resolution: int):
    example = _example(batch_size, resolution)
    if precision == "int8":
        module = quantize_pt2e(folded, batches)
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        module = copy.deepcopy(folded).to(dtype).to(memory_format=torch.channels_last)
    compiled = _inductor_compile(module, example, dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compiled(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()

    return run, "Inductor, freezing, channels_last" + (", PT2E X86InductorQuantizer" if precision == "int8" else "")


# ---------------------------------------------------------------- ONNX / ONNX Runtime


def export_onnx(folded: nn.Module, path, *, resolution: int, batch_size: int | None = None) -> Path:
    """Write the folded float graph as ONNX; ``batch_size=None`` makes the batch dimension dynamic."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(batch_size or 2, resolution)
    dynamic = None if batch_size else {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(_devnull()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(folded, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=dynamic, optimize=True, verbose=False)
    # one self-contained file: MobileNets are small enough, and a single file is simpler to deploy
    onnx.save_model(program.model_proto, str(path), save_as_external_data=False)
    return path


def _devnull():
    return open(os.devnull, "w")


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over our batches."""

    def __init__(self, name: str, batches):
        self._it = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self._it, None)


def quantize_onnx(float_path, out_path, batches: list[torch.Tensor]) -> Path:
    """Static QDQ int8: per-channel int8 weights, uint8 activations from min/max over ``batches``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(_devnull()):
            quantize_static(str(pre), str(out_path), _Reader("x", batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    return out_path


def ort_session(path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _build_onnxruntime(folded, precision: str, batches, batch_size: int, resolution: int, workdir: Path):
    path = export_onnx(folded, workdir / "model.onnx", resolution=resolution, batch_size=batch_size)
    if precision == "int8":
        path = quantize_onnx(path, workdir / "model.int8.onnx", batches)
    session = ort_session(path)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run, "ONNX Runtime CPU" + (", static QDQ int8 per-channel" if precision == "int8" else "")


# ---------------------------------------------------------------- OpenVINO


def openvino_model(folded, precision: str, batches, *, resolution: int, batch_size: int | None):
    """Convert the folded model to an ov.Model; int8 through NNCF on ``batches``; bf16 recorded as a runtime hint."""
    import openvino as ov

    example = _example(batch_size or 1, resolution)
    shape = [batch_size or -1, 3, resolution, resolution]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(folded, example_input=example, input=[ov.PartialShape(shape)])
    if precision == "int8":
        try:
            import nncf
        except ImportError:
            raise DeployError("int8 on OpenVINO needs NNCF (pip install nncf); or use backend 'torch'") from None
        import logging

        logging.getLogger("nncf").setLevel(logging.ERROR)
        # a static-shape model takes calibration rows in its own batch size
        data = [b.numpy() for b in (rebatch(batches, batch_size) if batch_size else batches)]
        with contextlib.redirect_stdout(_devnull()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = nncf.quantize(model, nncf.Dataset(data), subset_size=sum(len(d) for d in data))
    precision_hint = {"fp32": "f32", "bf16": "bf16"}.get(precision)
    if precision_hint:
        # travels with a saved IR: compile_model applies runtime_options from rt_info
        model.set_rt_info(precision_hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    return model


def openvino_compile(model, *, precision: str, throughput: bool = False):
    import openvino as ov

    config = {"PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY"}
    if precision in ("fp32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
    return ov.Core().compile_model(model, "CPU", config)


def _build_openvino(folded, precision: str, batches, batch_size: int, resolution: int):
    model = openvino_model(folded, precision, batches, resolution=resolution, batch_size=batch_size)
    compiled = openvino_compile(model, precision=precision)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.numpy()}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run, "OpenVINO CPU" + (", NNCF int8" if precision == "int8" else "")


# ---------------------------------------------------------------- compile


def _build(backend: str, folded, precision: str, batches, batch_size: int, resolution: int, workdir: Path):
    if backend == "torch":
        return _build_torch(folded, precision, batches, batch_size, resolution)
    if backend == "onnxruntime":
        return _build_onnxruntime(folded, precision, batches, batch_size, resolution, workdir)
    return _build_openvino(folded, precision, batches, batch_size, resolution)


def time_run(run: Callable, x: torch.Tensor, *, warmup: int = 3, min_time: float = 0.5,
             min_iters: int = 5, max_iters: int = 1000) -> list[float]:
    """Per-call wall times in ms after ``warmup`` calls: at least ``min_iters`` and ``min_time`` seconds."""
    for _ in range(warmup):
        run(x)
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved(runs: dict[str, Callable], x, *, warmup: int = 3, rounds: int = 5, min_time: float = 0.4,
                min_iters: int = 3) -> dict[str, list[float]]:
    """Per-call ms of each candidate, timed in ``rounds`` alternating rounds of >= ``min_time`` s each.

    Alternating spreads load from other processes over every candidate alike,
    so their ratio holds on a shared CPU where one long block each would not.
    """
    for run in runs.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] += time_run(run, x, warmup=0, min_time=min_time, min_iters=min_iters)
    return times


def _auto_key(model: MobileNetV1, precision: str, batch_size: int, resolution: int, candidates) -> str:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "onnxruntime", "openvino", "nncf", "torchao"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    key = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "versions": versions,
           "config": model.config.to_dict(), "precision": precision, "batch_size": batch_size,
           "resolution": resolution, "candidates": list(candidates)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _auto_cache() -> Path:
    return cache_dir() / "auto-backend.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compile(model: MobileNetV1, precision: str = "fp32", calibration: Iterable | None = None,
            batch_size: int = 1, resolution: int | None = None, backend: str = "auto") -> Predictor:
    """An optimised predictor for ``model``: ``predictor(x)`` takes (N, 3, H, W) preprocessed input, returns logits.

    ``precision``: "fp32", "bf16" (fast on CPUs with AMX or AVX-512 BF16) or
    "int8" (needs ``calibration``: an iterable of (N, 3, H, W) batches, or
    (images, labels) pairs, preprocessed like real inputs).  ``batch_size`` and
    ``resolution`` (default 224) fix the compiled shape.  ``backend``: "auto"
    (measure the available backends once, cache the fastest), "torch",
    "onnxruntime" or "openvino".
    """
    _check_precision(precision)
    _check_backend(backend, precision)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DeployError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    from .architecture import MIN_RESOLUTION

    resolution = DEFAULT_RESOLUTION if resolution is None else resolution
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise DeployError(f"resolution must be an integer >= {MIN_RESOLUTION} such as 224, 192, 160, 128, "
                          f"got {resolution!r}")
    folded = fold_batchnorm(model)
    batches = rebatch(calibration_batches(calibration, resolution), batch_size) if precision == "int8" else []
    if precision == "bf16" and not bf16_supported():
        warnings.warn("this CPU has neither AMX nor AVX-512 BF16: bf16 is emulated and slower than fp32", stacklevel=2)

    workdir = Path(tempfile.mkdtemp(prefix="mobilenets-deploy-"))
    if backend != "auto":
        run, detail = _build(backend, folded, precision, batches, batch_size, resolution, workdir)
        return Predictor(run, backend=backend, precision=precision, batch_size=batch_size,
                         resolution=resolution, detail=detail)

    candidates = [b for b in available_backends() if backend_supports(b, precision)]
    key = _auto_key(model, precision, batch_size, resolution, candidates)
    cache = _read_json(_auto_cache())
    if key in cache and cache[key]["backend"] in candidates:
        chosen = cache[key]["backend"]
        run, detail = _build(chosen, folded, precision, batches, batch_size, resolution, workdir)
        predictor = Predictor(run, backend=chosen, precision=precision, batch_size=batch_size,
                              resolution=resolution, detail=detail)
        predictor.timings = dict(cache[key]["timings"])
        return predictor

    x = _example(batch_size, resolution)
    built = {}
    for name in candidates:
        try:
            built[name] = _build(name, folded, precision, batches, batch_size, resolution, workdir)
        except Exception as e:  # a runtime that cannot serve this request is skipped; all failing is fatal
            if name == candidates[-1] and not built:
                raise
            warnings.warn(f"auto: skipping {name}: {type(e).__name__}: {e}", stacklevel=2)
    times = interleaved({name: run for name, (run, _) in built.items()}, x, rounds=5, min_time=0.3)
    # the lower quartile, not the median: a neighbour's burst of load slows whichever candidate it
    # happens to hit, and a cached wrong choice lasts; the quartile is what each does when it gets the CPU
    timings = {name: float(np.percentile(t, 25)) for name, t in times.items()}
    chosen = min(timings, key=timings.get)
    cache = _read_json(_auto_cache())
    cache[key] = {"backend": chosen, "timings": timings, "precision": precision, "batch_size": batch_size,
                  "resolution": resolution, "alpha": model.config.alpha, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}

    atomic_write(_auto_cache(), lambda f: f.write(json.dumps(cache, indent=1).encode()))
    run, detail = built[chosen]
    predictor = Predictor(run, backend=chosen, precision=precision, batch_size=batch_size,
                          resolution=resolution, detail=detail)
    predictor.timings = timings
    return predictor


# ---------------------------------------------------------------- export


def _format_suffix(fmt: str) -> str:
    return {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt", "exported-program": ".pt2"}[fmt]


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=4096)


def check_export(format: str, precision: str) -> None:
    """Refuse, with what would work, a format or a precision the format cannot hold."""
    _check_precision(precision)
    if format not in EXPORT_FORMATS:
        raise DeployError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    unsupported = {("onnx", "bf16"): "ONNX Runtime has no bf16 CPU kernels; export bf16 as openvino or exported-program",
                   ("torchscript", "int8"): "TorchScript cannot hold PT2E int8; export int8 as onnx, openvino or "
                                            "exported-program"}
    if (format, precision) in unsupported:
        raise DeployError(f"cannot export {precision} as {format}: {unsupported[format, precision]}")


def export(model: MobileNetV1, path, format: str = "onnx", *, precision: str = "fp32", calibration=None,
           resolution: int | None = None) -> Path:
    """Write ``model`` (BatchNorm folded) for another runtime; returns the written path.

    Formats and the precisions each can hold:

    - "onnx": fp32, int8 (static QDQ, per-channel weights); batch dimension dynamic.
    - "openvino": IR .xml + .bin; fp32, bf16 (recorded as the inference-precision
      hint), int8 (NNCF); batch dynamic.
    - "torchscript": traced fp32 or bf16 graph (TorchScript has no PT2E int8).
    - "exported-program": ``torch.export.save`` .pt2; fp32, bf16, int8 (PT2E,
      load with torchao imported); batch dynamic for fp32/bf16.

    int8 needs ``calibration`` batches, as for :func:`compile`.
    """
    check_export(format, precision)
    resolution = DEFAULT_RESOLUTION if resolution is None else int(resolution)
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(_format_suffix(format))
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = fold_batchnorm(model)
    batches = calibration_batches(calibration, resolution) if precision == "int8" else []
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    example = _example(2, resolution)

    if format == "onnx":
        if precision == "int8":
            with tempfile.TemporaryDirectory() as tmp:
                float_path = export_onnx(folded, Path(tmp) / "float.onnx", resolution=resolution)
                return quantize_onnx(float_path, path, batches)
        return export_onnx(folded, path, resolution=resolution)
    if format == "openvino":
        import openvino as ov

        ov.save_model(openvino_model(folded, precision, batches, resolution=resolution, batch_size=None), str(path),
                      compress_to_fp16=False)
        return path
    if format == "torchscript":
        module = folded.to(dtype)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example.to(dtype))

        return atomic_write(path, lambda f: torch.jit.save(traced, f))
    # exported-program
    if precision == "int8":
        quantized = quantize_pt2e(folded, batches, dynamic_batch=True)
        program = torch.export.export(quantized, (example,), dynamic_shapes=({0: _batch_dim()},))
    else:
        program = torch.export.export(folded.to(dtype), (example.to(dtype),), dynamic_shapes=({0: _batch_dim()},))

    return atomic_write(path, lambda f: torch.export.save(program, f))


def load_exported(path, format: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Open an exported file in its own runtime; returns ``run(x) -> float32 logits`` for (N, 3, H, W) input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    format = format or {".onnx": "onnx", ".xml": "openvino", ".pt": "torchscript", ".pt2": "exported-program"}.get(
        path.suffix)
    if format is None:
        raise DeployError(f"cannot tell the format of {path}; name one of {EXPORT_FORMATS}")
    if format == "onnx":
        session = ort_session(path)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: _as_tensor(x).numpy()})[0]).float()
    if format == "openvino":
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        config = {}
        key = ["runtime_options", "INFERENCE_PRECISION_HINT"]
        if model.has_rt_info(key):  # the precision the file was exported for (OpenVINO defaults to bf16 on AMX)
            config["INFERENCE_PRECISION_HINT"] = model.get_rt_info(key).astype(str)
        compiled = core.compile_model(model, "CPU", config)
        return lambda x: torch.from_numpy(compiled(_as_tensor(x).numpy())[0].copy()).float()
    if format == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu").eval()
    elif format == "exported-program":
        try:  # int8 programs use the quantized_decomposed ops that torchao registers
            import torchao.quantization.pt2e  # noqa: F401
        except ImportError:
            pass
        module = torch.export.load(str(path)).module()
    else:
        raise DeployError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    dtype = next((t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), torch.float32)

    def run(x):
        with torch.no_grad():
            return module(_as_tensor(x).to(dtype)).float()

    return run


def parity(reference: torch.Tensor, logits: torch.Tensor, labels=None) -> dict:
    """How close ``logits`` are to ``reference`` (fp32 eager): max abs diff, cosine, top-1 agreement (and accuracy)."""
    reference, logits = reference.float(), logits.float()
    out = {
        "max_abs_diff": float((reference - logits).abs().max()),
        "cosine": float(F.cosine_similarity(reference.flatten(), logits.flatten(), dim=0)),
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).float().mean()),
        "images": int(reference.shape[0]),
    }
    if labels is not None:
        y = torch.as_tensor(labels)
        out["reference_accuracy"] = float((reference.argmax(1) == y).float().mean())
        out["accuracy"] = float((logits.argmax(1) == y).float().mean())
    return out
