"""The PyTorch backend: Inductor with freezing (oneDNN convolutions), bf16, and PT2E int8 through torchao.

fp32 and bf16 run the folded graph channels_last under ``torch.compile``
with freezing, so the weights become constants of prepacked oneDNN
convolutions with the ReLU6 clamp fused as a post-op (bf16 uses AMX /
avx512_bf16 where the CPU has them).  int8 is PT2E post-training
quantization with ``X86InductorQuantizer``: per-channel symmetric int8
weights, per-tensor uint8 activations observed on the calibration batches,
lowered by Inductor to oneDNN int8 convolutions.  Files: TorchScript (.pt,
float only) and ``torch.export`` programs (.pt2, int8 too).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_write
from .prepare import single_clip
from .backend import Backend, ExportFormat, Run, batch_dim
from .calibration import as_input, example_input
from ..folding import FoldedMobileNet
from .machine import DeployError


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
    shapes = ({0: batch_dim()},) if dynamic_batch else None
    exported = torch.export.export(folded, (example,), dynamic_shapes=shapes).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x.contiguous(memory_format=torch.channels_last))
    return convert_pt2e(prepared)


def inductor_compile(module: nn.Module, example: torch.Tensor, dtype: torch.dtype):
    """torch.compile with Inductor and freezing (weights become constants: prepacked oneDNN convs)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, backend="inductor", dynamic=False, fullgraph=True)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(example.to(dtype).contiguous(memory_format=torch.channels_last))  # compile now, not on first use
    return compiled


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


class PyTorch(Backend):
    name = "torch"
    requires = ("torch",)
    formats = (
        ExportFormat("torchscript", ".pt", ("fp32", "bf16"), refusal="TorchScript cannot hold PT2E int8"),
        ExportFormat("exported-program", ".pt2", ("fp32", "bf16", "int8")),
    )

    def describe(self, precision: str) -> str:
        return "Inductor, freezing, channels_last" + (", PT2E X86InductorQuantizer" if precision == "int8" else "")

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        if precision == "int8":
            module, dtype = quantize_pt2e(single_clip(folded), batches), torch.float32
        else:
            dtype = _dtype(precision)
            module = copy.deepcopy(folded).to(dtype).to(memory_format=torch.channels_last)
        compiled = inductor_compile(module, example_input(batch_size, resolution), dtype)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return compiled(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()

        return run

    def save(self, folded, path, format, precision, batches, resolution) -> Path:
        dtype = _dtype(precision)
        example = example_input(2, resolution)
        if format == "torchscript":
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(copy.deepcopy(folded).to(dtype), example.to(dtype))
            return atomic_write(path, lambda f: torch.jit.save(traced, f))
        if precision == "int8":
            quantized = quantize_pt2e(single_clip(folded), batches, dynamic_batch=True)
            program = torch.export.export(quantized, (example,), dynamic_shapes=({0: batch_dim()},))
        else:
            program = torch.export.export(copy.deepcopy(folded).to(dtype), (example.to(dtype),),
                                          dynamic_shapes=({0: batch_dim()},))
        return atomic_write(path, lambda f: torch.export.save(program, f))

    def load(self, path, format) -> Run:
        if format == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu").eval()
        else:
            try:  # int8 programs use the quantized_decomposed ops that torchao registers
                import torchao.quantization.pt2e  # noqa: F401
            except ImportError:
                pass
            module = torch.export.load(str(path)).module()
        dtype = next((t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()),
                     torch.float32)

        def run(x):
            with torch.no_grad():
                return module(as_input(x).to(dtype)).float()

        return run


BACKEND = PyTorch()
