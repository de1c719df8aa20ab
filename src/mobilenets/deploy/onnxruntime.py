"""The ONNX Runtime backend (extra ``deploy``): the folded graph as ONNX; int8 as static QDQ quantization.

int8 is ONNX Runtime's ``quantize_static`` in QDQ format: per-channel int8
weights, uint8 activations from min/max over the calibration batches.  ONNX
Runtime has no bf16 CPU kernels.  Sessions are created from the model's bytes;
a build keeps them in the cache folder (:mod:`.artifacts`), so the same model is exported once.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .artifacts import cached_build
from .backend import Backend, ExportFormat, Run, batch_dim
from ..cores import omp_passive
from .calibration import as_input, example_input


def export_onnx(folded: nn.Module, path, *, resolution: int, batch_size: int | None = None) -> Path:
    """Write the folded float graph as ONNX; ``batch_size=None`` makes the batch dimension dynamic."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_input(batch_size or 2, resolution)
    dynamic = None if batch_size else {"x": {0: batch_dim()}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(folded, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=dynamic, optimize=True, verbose=False)
    # one self-contained file: MobileNets are small enough, and a single file is simpler to deploy
    onnx.save_model(program.model_proto, str(path), save_as_external_data=False)
    return path


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
    with tempfile.TemporaryDirectory(prefix="mobilenets-onnx-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(pre), str(out_path), _Reader("x", batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    return out_path


def onnx_file(folded, path, precision: str, batches, *, resolution: int, batch_size: int | None) -> Path:
    """The folded model as an ONNX file at ``path``, QDQ-quantized for int8 (the float graph beside it meanwhile)."""
    path = Path(path)
    if precision != "int8":
        return export_onnx(folded, path, resolution=resolution, batch_size=batch_size)
    ready = folded.int8_ready
    if ready is not None:  # our own QDQ graph: equalized, bias-corrected, ranges chosen by error
        from ..quantize import to_qdq_onnx

        return to_qdq_onnx(ready, path, resolution=resolution)
    with tempfile.TemporaryDirectory(prefix="mobilenets-onnx-") as tmp:
        float_path = export_onnx(folded, Path(tmp) / "float.onnx", resolution=resolution, batch_size=batch_size)
        return quantize_onnx(float_path, path, batches)


def ort_session(model, threads: int | None = None):
    """An ONNX Runtime CPU session for ``model`` (a path or the serialized bytes), all graph optimizations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if omp_passive():
        # ONNX Runtime's pool spins between operators by default: beside predict's decoding workers on 2
        # busy cores that burnt a sixth more CPU per image and cost as much in images/s
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _runner(session) -> Run:
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: as_input(x).numpy()})[0]).float()


class OnnxRuntime(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "int8")
    refusal = "onnxruntime has no bf16 CPU kernels"
    requires = ("onnxruntime", "onnx")
    formats = (ExportFormat("onnx", ".onnx", ("fp32", "int8"), refusal="ONNX Runtime has no bf16 CPU kernels"),)

    def describe(self, precision: str) -> str:
        return "ONNX Runtime CPU" + (", QDQ int8 per-channel" if precision == "int8" else "")

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        def make() -> bytes:  # in memory: the workdir goes when this returns
            return onnx_file(folded, Path(workdir) / "model.onnx", precision, batches, resolution=resolution,
                             batch_size=batch_size).read_bytes()

        # the export is most of the build (3.8 s of 1.0-224's): kept, the next build only starts a session
        return cached_build(self.name, folded, precision, batches, batch_size, resolution,
                            libraries=("onnx", "onnx-ir", "onnxruntime", "onnxscript"), suffix=".onnx", make=make,
                            load=lambda data: _runner(ort_session(data)))

    def save(self, folded, path, format, precision, batches, resolution) -> Path:
        return onnx_file(folded, path, precision, batches, resolution=resolution, batch_size=None)

    def load(self, path, format) -> Run:
        return _runner(ort_session(path))


BACKEND = OnnxRuntime()
