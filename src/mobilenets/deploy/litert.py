"""The LiteRT backend (extra ``deploy``): a ``.tflite`` flatbuffer we write ourselves, run by LiteRT's interpreter.

The file is written against LiteRT's schema (:mod:`mobilenets.formats.tflite_schema`)
from the folded model (:mod:`.tflite_graph`), fp32 or full-integer int8, so
no TensorFlow converter is needed; ``ai-edge-litert``'s interpreter (XNNPACK
delegate on by default) runs it for builds, parity and benchmarks.  The
batch dimension is dynamic: the runner resizes the input when N changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..formats import tflite_schema as fb
from .artifacts import cached_build
from .backend import Backend, ExportFormat, Run
from .calibration import as_input
from .machine import DeployError
from .prepare import single_clip
from .tflite_graph import IO_TYPES, build_graph


def tflite_bytes(folded, precision: str, batches, resolution: int, *, io: str | None = None,
                 metadata: dict | None = None, ranges: dict | None = None) -> bytes:
    """The .tflite file of ``folded`` as bytes (``io``: int8 [default], uint8 or float, int8 models only)."""
    if io is not None and precision != "int8" and io != "float":
        raise DeployError(f"io={io!r} applies to int8 files; an {precision} file has float input and output")
    ready = folded.int8_ready
    if precision == "int8" and ready is not None:  # int8-ready weights bring their own ranges
        folded, ranges = single_clip(folded), ready.ranges
    return fb.write(build_graph(folded, resolution, precision, batches, io or "int8", metadata, ranges))


def interpreter(model: bytes, threads: int | None = None):
    """A LiteRT interpreter for the flatbuffer ``model`` (default delegates, XNNPACK included)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_content=model, num_threads=threads or torch.get_num_threads())
    except (ValueError, RuntimeError) as e:
        raise DeployError(f"LiteRT cannot load this model: {str(e).splitlines()[0]}") from None


def runner(interp) -> Run:
    """``run(x)``: (N, 3, H, W) float in, float32 logits out; quantizes/dequantizes integer I/O."""
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    state = {"batch": None}

    def run(x) -> torch.Tensor:
        a = as_input(x).permute(0, 2, 3, 1).contiguous().numpy()
        if state["batch"] != a.shape[0]:
            interp.resize_tensor_input(inp["index"], list(a.shape), strict=True)
            interp.allocate_tensors()
            state["batch"] = a.shape[0]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            a = np.clip(np.round(a / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], a)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return torch.from_numpy(np.array(y, np.float32, copy=True))

    return run


class LiteRT(Backend):
    name = "litert"
    precisions = ("fp32", "int8")
    refusal = "LiteRT files hold fp32 or int8 (no bf16)"
    requires = ("ai_edge_litert", "flatbuffers")
    formats = (ExportFormat("tflite", ".tflite", ("fp32", "int8"), refusal="LiteRT files hold fp32 or int8",
                            options=("io", "metadata", "ranges")),)

    def describe(self, precision: str) -> str:
        return "LiteRT (XNNPACK)" + (", full-integer int8 per-channel" if precision == "int8" else "")

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        return cached_build(self.name, folded, precision, batches, batch_size, resolution,
                            libraries=("ai-edge-litert", "flatbuffers"), suffix=".tflite",
                            make=lambda: tflite_bytes(folded, precision, batches, resolution,
                                                      io="float" if precision == "int8" else None),
                            load=lambda data: runner(interpreter(data)))

    def save(self, folded, path, format, precision, batches, resolution, *, io=None, metadata=None,
             ranges=None) -> Path:
        if io is not None and io not in IO_TYPES:
            raise DeployError(f"io must be one of {IO_TYPES}, got {io!r}")
        data = tflite_bytes(folded, precision, batches, resolution, io=io, metadata=metadata, ranges=ranges)
        path = Path(path)
        path.write_bytes(data)
        return path

    def load(self, path, format) -> Run:
        return runner(interpreter(Path(path).read_bytes()))


BACKEND = LiteRT()
