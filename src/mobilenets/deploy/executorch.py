"""The ExecuTorch backend (extra ``deploy``): a ``.pte`` program with the XNNPACK delegate, run by ExecuTorch.

fp32: the folded model through ``torch.export`` (batch dimension dynamic),
lowered with ``to_edge_transform_and_lower`` and the XNNPACK partitioner, so
every convolution (ReLU6 fused as its clamp) runs in XNNPACK.  ExecuTorch's
Python runtime loads the program for parity and benchmarks; the program's
memory plan bounds the batch, so larger inputs run in chunks.

ExecuTorch 1.5.1's runtime crashes (segmentation fault in
``Method.execute``) in a process where torchao's PT2E quantization or
Inductor has run before, fp32 programs included; in a fresh process (what
``mobilenets export`` is) it runs them correctly.  So this backend writes and
reads files but offers no in-process builds: ``compile``, ``auto`` and
``benchmark`` never pick it.  int8 (:func:`pte_bytes` with XNNPACK's PT2E
quantizer) is not offered as an export yet for the same reason.  (One cause
is now known and fixed: :func:`runner` dropped the program its method reads,
which crashed in fresh processes too once that memory was reused; with the
program kept alive, fp32 and int8 programs ran after Inductor and PT2E in one
process in a check on this machine, so the restriction may be lifted.)
Timing these files beside others therefore happens in a fresh process
(:mod:`.isolated`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from .backend import Backend, ExportFormat, Run, batch_dim
from .calibration import as_input, example_input
from .machine import DeployError


def _quantize_xnnpack(folded, batches: list[torch.Tensor]):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(folded, (example_input(2, batches[0].shape[-1]),),
                                   dynamic_shapes=({0: batch_dim()},)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_pt2e(prepared)


def pte_bytes(folded, precision: str, batches: list[torch.Tensor], resolution: int) -> bytes:
    """The .pte program of ``folded``: fp32, or int8 quantized by XNNPACK's quantizer on ``batches``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if precision == "int8" and not batches:
        raise DeployError("int8 needs calibration batches")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _quantize_xnnpack(folded, batches) if precision == "int8" else folded
        program = torch.export.export(module, (example_input(2, resolution),), dynamic_shapes=({0: batch_dim()},))
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def match_threads() -> None:
    """Size XNNPACK's thread pool in ExecuTorch to torch's thread count, as LiteRT's interpreter is sized."""
    try:  # the pool starts with one thread per core; the pybindings expose no public setter in 1.5.1
        from executorch.extension.pybindings.portable_lib import (
            _threadpool_get_thread_count, _unsafe_reset_threadpool)
    except ImportError:
        return
    if _threadpool_get_thread_count() != torch.get_num_threads():
        _unsafe_reset_threadpool(torch.get_num_threads())  # unsafe only while a method executes


def runner(data: bytes) -> Run:
    """``run(x)`` over ExecuTorch's Python runtime for the program ``data``, at torch's thread count."""
    from executorch.runtime import Runtime

    match_threads()
    try:
        program = Runtime.get().load_program(data)
        method = program.load_method("forward")
    except (RuntimeError, ValueError) as e:
        raise DeployError(f"ExecuTorch cannot load this program: {str(e).splitlines()[0]}") from None

    limit = method.metadata.input_tensor_meta(0).sizes()[0]

    def run(x) -> torch.Tensor:
        x = as_input(x).contiguous()
        return torch.cat([method.execute([chunk.contiguous()])[0].float() for chunk in x.split(limit)])

    # the method reads the program's memory and the program the bytes: a method whose program was
    # garbage-collected crashes (segmentation fault in Method::inputs_size) once that memory is reused
    run.program = (data, program)

    return run


class ExecuTorch(Backend):
    name = "executorch"
    precisions = ()  # no in-process builds: see the module docstring
    refusal = ("ExecuTorch 1.5.1 crashes in a process that has run PT2E or Inductor; export a .pte "
               "(mobilenets export --format executorch) and run it in its own process")
    requires = ("executorch.runtime", "executorch.exir")
    shares_process = False  # see the module docstring
    formats = (ExportFormat("executorch", ".pte", ("fp32",),
                            refusal="int8 .pte export is not offered yet (ExecuTorch 1.5.1 crashes running it "
                                    "in the exporting process)"),)

    def describe(self, precision: str) -> str:
        return "ExecuTorch (XNNPACK)"

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        return runner(pte_bytes(folded, precision, batches, resolution))

    def save(self, folded, path, format, precision, batches, resolution, **options) -> Path:
        data = pte_bytes(folded, precision, batches, resolution)
        return atomic_write(Path(path), lambda f: f.write(data))

    def load(self, path, format) -> Run:
        return runner(Path(path).read_bytes())


BACKEND = ExecuTorch()
