"""The PyTorch backend: Inductor with freezing (oneDNN convolutions), bf16, and PT2E int8 through torchao.

fp32 and bf16 run the folded graph channels_last under ``torch.compile``
with freezing, so the weights become constants of prepacked oneDNN
convolutions with the ReLU6 clamp fused as a post-op (bf16 uses AMX /
avx512_bf16 where the CPU has them).  int8 is PT2E post-training
quantization with ``X86InductorQuantizer``: per-channel symmetric int8
weights, per-tensor uint8 activations observed on the calibration batches,
of the int8-ready graph (:mod:`mobilenets.quantize`) unless ``int8="plain"``,
lowered by Inductor to oneDNN int8 convolutions.  Files: TorchScript (.pt,
float only) and ``torch.export`` programs (.pt2, int8 too).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write
from .prepare import single_clip
from .backend import Backend, ExportFormat, Run, batch_dim
from .calibration import as_input, example_input
from ..folding import FoldedMobileNet
from .machine import DeployError


def _pt2e():
    """torchao's PT2E entry points (older PyTorch shipped them in torch.ao)."""
    try:
        from torchao.quantization.pt2e import PerChannelMinMaxObserver
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        try:
            from torch.ao.quantization.observer import PerChannelMinMaxObserver
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as x86
        except ImportError:
            raise DeployError("int8 on the torch backend needs torchao (pip install 'mobilenets[deploy]' "
                              "or pip install torchao); or use backend 'onnxruntime' or 'openvino'") from None
    return PerChannelMinMaxObserver, convert_pt2e, prepare_pt2e, x86


def quantize_pt2e(folded: FoldedMobileNet, batches: list[torch.Tensor], *, dynamic_batch: bool = False) -> nn.Module:
    """PT2E int8 with X86InductorQuantizer: per-channel int8 weights, per-tensor uint8 activations observed on
    ``batches`` by its histogram observers.

    An int8-ready graph (:func:`prepare.single_clip`: equalized, bias-corrected) gets weights on the grid its
    bias correction was measured on ([-127, 127]; [-64, 64] for an x86 CPU without VNNI), without the
    quantizer's default floor of 2**-12 on a weight scale, under which equalization puts many channels (on the real weights, 32 calibration
    crops, 256 held out: 81% top-1 agreement with that floor, 97% without).  The int8-ready ranges are not
    imposed: the observers' ranges of this graph match them within 1% (each ends at its ReLU6 clip), and
    the classifier's output stays float here, so there is nothing to gain.
    """
    PerChannelMinMaxObserver, convert_pt2e, prepare_pt2e, x86 = _pt2e()
    config = x86.get_default_x86_inductor_quantization_config()
    if folded.int8_ready is not None:
        qmax = folded.int8_ready.weight_qmax
        weight = dataclasses.replace(config.weight, quant_min=-qmax, quant_max=qmax,
                                     observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(
                                         eps=torch.finfo(torch.float32).tiny))
        config = dataclasses.replace(config, weight=weight)
    example = batches[0].contiguous(memory_format=torch.channels_last)
    shapes = ({0: batch_dim()},) if dynamic_batch else None
    exported = torch.export.export(folded, (example,), dynamic_shapes=shapes).module()
    prepared = prepare_pt2e(exported, x86.X86InductorQuantizer().set_global(config))
    with torch.no_grad():
        for x in batches:
            prepared(x.contiguous(memory_format=torch.channels_last))
    return convert_pt2e(prepared)


# Every model compiled in one process shares the forward code of FoldedMobileNet and its layers, so their
# compiled entries add up under one code object: pick's grid compiles 16 models (and auto more), and at
# torch's default of 8 each later one printed recompile_limit warnings (issue 22 counted ~70) and ran eager.
RECOMPILE_LIMIT = 256


def inductor_compile(module: nn.Module, example: torch.Tensor, dtype: torch.dtype):
    """torch.compile with Inductor and freezing (weights become constants: prepacked oneDNN convs)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, backend="inductor", dynamic=False, fullgraph=True)
    limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    with inductor_config.patch(freezing=True), dynamo_config.patch(recompile_limit=limit,
                                                                    accumulated_recompile_limit=max(
                                                                        dynamo_config.accumulated_recompile_limit,
                                                                        limit)), torch.no_grad():
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

    def needs_calibration(self, folded, precision: str) -> bool:
        # PT2E's observers measure every activation range, int8-ready graph or not (see quantize_pt2e)
        return precision == "int8"

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
