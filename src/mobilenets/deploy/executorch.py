"""The ExecuTorch backend (extra ``executorch``): a ``.pte`` program with the XNNPACK delegate, run by ExecuTorch.

fp32: the folded model through ``torch.export`` at a fixed batch (1 in an
exported file: what an app runs, and what ExecuTorch's own example flow
writes; a dynamic batch dimension split the graph into two XNNPACK calls and
cost 2-4% at batch 1), lowered with ``to_edge_transform_and_lower`` and the
XNNPACK partitioner, so every convolution (ReLU6 fused as its clamp) runs in
XNNPACK.

int8, from the int8-ready model (:mod:`mobilenets.quantize`, the default):
PT2E with XNNPACK's quantizer places the quantize/dequantize pairs (int8
weights per output channel, symmetric; int8 activations per tensor), and every
activation observer is replaced by the fixed scale and zero point of our
range for that point, so XNNPACK runs the graph :meth:`Int8Ready.simulate`
computes.  After equalization ReLU6's clip differs per channel, but it is
never below the top of its layer's range, so the graph keeps only ReLU (fused
into each convolution) and int8 saturation at the range's top is the clip;
TF's SAME pads stay int8, folded into their convolutions by XNNPACK
(:func:`_quantize_before_pads`: 1.2x the example flow's speed at 1.0-224).
``int8="plain"``: XNNPACK's quantizer with its own observers on the
calibration batches (ExecuTorch's example flow).  On the real 1.0-224 weights
the first keeps 94% of the float model's top-1 answers at a mean KL of 0.014
nats, the second 71% at 0.47 (docs/deploy.md has the table and its command).

Beside ``forward``, a program returns its resolution, normalization, labels
and description from constant methods (:func:`constant_methods`).

Every program is checked as written: the XNNPACK delegate holds every
convolution and the classifier (:func:`program_summary`).  ExecuTorch's
Python runtime runs it for parity, larger inputs in chunks of the program's batch.

The program runs in any process (an earlier crash was the runner dropping
the program its method reads, see :class:`_Program`): ``compile`` and
``benchmark`` build it when asked for by name; ``auto`` does not try it (its
lowering takes 10-25 s), and ``pick --runtime executorch`` times files in a
fresh process (:mod:`.isolated`).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
import subprocess
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..folding import FoldedConv, FoldedMobileNet
from .backend import Backend, ExportFormat, Run, batch_dim
from .calibration import as_input, example_input
from .coreml_package import class_labels, normalization_of, num_classes_of  # the rules Core ML's package follows too
from .machine import DeployError

INT32_MAX = 2 ** 31 - 1
# XNNPACK graph nodes that multiply by weights: what must run in the delegate, quantized for int8
WEIGHTED_NODES = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNFullyConnected")
PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)
SINGLE_CONSTANTS = ("resolution", "mobilenets")  # constant methods returning one value (the others: a list)


def _quantizer():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


def _export(module, resolution: int, batch_size: int | None = None):
    """``module`` through torch.export: a dynamic batch (for calibrating), or a fixed one (for the program)."""
    if batch_size is not None:
        return torch.export.export(module, (example_input(batch_size, resolution),))
    return torch.export.export(module, (example_input(2, resolution),), dynamic_shapes=({0: batch_dim()},))


def quantize_plain(folded, batches: list[torch.Tensor], resolution: int):
    """XNNPACK's quantizer with its own observers (histograms) over ``batches``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(_export(folded, resolution).module(), _quantizer())
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_pt2e(prepared)


def saturating_graph(ready) -> FoldedMobileNet:
    """The int8-ready float graph with ReLU in place of each (per-channel) clip: int8 saturation clips instead."""
    from ..quantize import scalar_clips

    scalar_clips(ready.folded, ready.ranges)  # no range reaches past its layer's clip
    layers = [FoldedConv(copy.deepcopy(layer.conv), layer.tf_pad, None) for layer in ready.folded.features]
    return FoldedMobileNet(layers, copy.deepcopy(ready.folded.classifier)).eval()


def quantize_ready(ready, resolution: int):
    """The int8-ready model as a converted PT2E graph whose every activation has the scale our range gives."""
    from torchao.quantization.pt2e.observer import FixedQParamsObserver, ObserverBase
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from ..quantize import sim

    prepared = prepare_pt2e(_export(saturating_graph(ready), resolution).module(), _quantizer())
    graph = prepared.graph
    convs = [n for n in graph.nodes if n.target == torch.ops.aten.conv2d.default]
    weighted = convs + [n for n in graph.nodes if n.target == torch.ops.aten.linear.default]
    for node in graph.nodes:
        observer = getattr(prepared, node.target) if node.op == "call_module" else None
        if not isinstance(observer, ObserverBase) or node.args[0].op == "get_attr":
            continue  # weight observers measure the weights themselves below
        scale, zero_point = sim.act_qparams(*ready.ranges[_range_key(node.args[0], convs)])
        # our ranges are uint8 (0..255); XNNPACK's activations are int8 (-128..127): the same grid shifted
        setattr(prepared, node.target, FixedQParamsObserver(scale, zero_point - 128, dtype=torch.int8,
                                                            qscheme=torch.per_tensor_affine, quant_min=-128,
                                                            quant_max=127))
    for node in weighted:
        # scale = max|w| / 127 per output channel, as the ranges were chosen for (XNNPACK's default floor is 2^-12)
        getattr(prepared, node.args[1].target).eps.fill_(1e-12)
    with torch.no_grad():
        prepared(example_input(1, resolution))  # only the weight observers record anything
    for node in weighted:
        _floor_weight_scale(prepared, node)
    _quantize_before_pads(prepared)
    return convert_pt2e(prepared)


def _quantize_before_pads(prepared) -> None:
    """Leave each zero pad (TF's SAME at stride 2) between a dequantize and its convolution, so XNNPACK pads int8.

    XNNPACK's quantizer observes a pad's output on its own, and ExecuTorch
    lowers a pad standing alone only in float: the program dequantized each
    stride-2 input, padded it in float and quantized it again (8 of its 10
    conversions, on the largest tensors; at 1.0-224 a sixth of its time,
    benchmarks/edge_runtimes.py).  ExecuTorch's own example flow writes the
    same.  With the pad's input quantized and its output not, ExecuTorch
    keeps the pad in the convolution's int8 partition and XNNPACK folds it
    into the convolution's padding.  Exact: the pad's output has its input's
    range (:func:`_range_key`), which holds 0, so a zero pad lands on the
    zero point either way; a pad between two different ranges is left alone.
    """
    from torchao.quantization.pt2e.observer import ObserverBase

    def observer(node) -> bool:
        return node.op == "call_module" and isinstance(getattr(prepared, node.target), ObserverBase)

    def qparams(node) -> tuple[float, ...]:
        return tuple(float(t) for t in getattr(prepared, node.target).calculate_qparams())

    graph = prepared.graph
    for pad in [n for n in graph.nodes if n.target in PADS]:
        users = list(pad.users)
        if len(users) != 1 or not observer(users[0]) or not _zero_pad(pad):
            continue
        after, before = users[0], pad.args[0]
        if observer(before):  # the same range twice: the one before the pad stands for both
            if qparams(before) != qparams(after):
                continue
            after.replace_all_uses_with(pad)
            graph.erase_node(after)
        else:  # the network's input: quantized before it is padded
            after.replace_all_uses_with(pad)
            after.args = (before,)
            pad.args = (after, *pad.args[1:])
            pad.prepend(after)
    prepared.recompile()


def _floor_weight_scale(prepared, node) -> None:
    """Raise a channel's weight scale where its int32 bias (bias / (input scale * weight scale)) would overflow.

    Only dead channels (weights near zero) are affected; XNNPACK would clamp their bias otherwise.
    """
    observer = getattr(prepared, node.args[1].target)
    in_scale = float(getattr(prepared, node.args[0].target).scale)
    bias = functools.reduce(getattr, node.args[2].target.split("."), prepared).detach().abs().float()
    floor = bias / (in_scale * INT32_MAX) * 1.01 * 127  # as max|w|
    observer.max_val.copy_(torch.maximum(observer.max_val, floor))
    observer.min_val.copy_(torch.minimum(observer.min_val, -floor))


def _zero_pad(node) -> bool:
    """Whether a pad node pads with zeros (aten.pad: x, pad, mode, value; aten.constant_pad_nd: x, pad, value)."""
    names = ("mode", "value") if node.target == torch.ops.aten.pad.default else ("value",)
    given = dict(zip(names, node.args[2:])) | {k: v for k, v in node.kwargs.items() if k in names}
    return given.get("mode", "constant") == "constant" and not given.get("value")


def _range_key(node, convs) -> str:
    """Which of our ranges ("input", "features.<i>", "pool", "logits") the tensor ``node`` produces."""
    while node.op == "call_module":  # an observer: its input's range
        node = node.args[0]
    if node.op == "placeholder":
        return "input"
    if node.target == torch.ops.aten.relu.default and node.args[0] in convs:
        return f"features.{convs.index(node.args[0])}"
    if node.target == torch.ops.aten.mean.dim:
        return "pool"
    if node.target == torch.ops.aten.linear.default:
        return "logits"
    if node.target in (*PADS, torch.ops.aten.flatten.using_ints):
        return _range_key(node.args[0], convs)  # zero padding and flattening keep their input's range
    raise DeployError(f"cannot place int8 ranges on the exported graph: unexpected {node.target} ({node.name})")


def pte_bytes(folded, precision: str, batches: list[torch.Tensor], resolution: int, batch_size: int = 1,
              metadata: dict | None = None) -> bytes:
    """The .pte program of ``folded`` for ``batch_size`` images a call: fp32, or int8 (with its int8-ready ranges,
    else XNNPACK's own calibration); with ``metadata``, also the methods :func:`constant_methods` gives."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ready = folded.int8_ready if precision == "int8" else None
    if precision == "int8" and ready is None and not batches:
        raise DeployError("int8 needs calibration batches")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision != "int8":
            module = folded
        elif ready is not None:
            module = quantize_ready(ready, resolution)
        else:
            module = quantize_plain(folded, batches, resolution)
        program = _export(module, resolution, batch_size)
        constants = None if metadata is None else constant_methods(metadata, resolution, precision,
                                                                    num_classes_of(folded))
        data = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods=constants).to_executorch().buffer
    check_delegated(program_summary(data), len(folded.features) + 1, precision)
    return data


def constant_methods(metadata: dict, resolution: int, precision: str, num_classes: int) -> dict:
    """Methods of the program that return what an app needs beside ``forward``, as ExecuTorch stores constants.

    ``resolution`` (int), ``mean`` and ``std`` (3 floats: the input is
    (pixel / 255 - mean[c]) / std[c], RGB, NCHW), ``labels`` (the class
    names, ImageNet's for 1000 classes without names of their own), and
    ``mobilenets``: the JSON a LiteRT file carries under that name, less the labels (once is enough).
    ``Module::execute("labels")`` returns them in C++, ``load_method("labels").execute([])`` in Python.
    """
    mean, std = normalization_of(metadata)
    labels = class_labels(metadata, num_classes)
    described = {**{k: v for k, v in metadata.items() if k != "labels"}, "resolution": int(resolution),
                 "layout": "NCHW", "precision": precision}
    out = {"resolution": int(resolution), "mean": list(mean), "std": list(std),
           "mobilenets": json.dumps(described)}
    if labels is not None:
        out["labels"] = [str(v) for v in labels]
    return out


def read_constants(data: bytes) -> dict:
    """The program's constant methods (:func:`constant_methods`) as ExecuTorch's runtime returns them."""
    program = _Program(data)
    out = {}
    for name in sorted(program.program.method_names - {"forward"}):
        values = program.program.load_method(name).execute([])
        out[name] = values[0] if name in SINGLE_CONSTANTS else values
    return out


def check_delegated(summary: dict, weighted: int, precision: str) -> None:
    """Refuse a program where a convolution or the classifier was left outside XNNPACK (or in float, for int8)."""
    outside = [op for op in summary["operators"] if any(k in op for k in ("conv", "linear", "addmm", "aten::mm"))]
    inside = summary["weighted"]
    quantized = [n for n in inside if n["filter"] == "qcint8" and n["input"] == n["output"] == "qint8"]
    expected = inside if precision != "int8" else quantized
    if outside or len(expected) != weighted:
        raise DeployError(f"ExecuTorch left {weighted - len(expected)} of {weighted} weighted layers outside "
                          f"XNNPACK{' int8' if precision == 'int8' else ''} (operators outside: {outside}); "
                          f"export another format, or another executorch version")


# ---------------------------------------------------------------- reading a program


def program_summary(data: bytes) -> dict:
    """What a .pte program holds: its delegates, the operators run outside them, and XNNPACK's weighted nodes.

    Keys: ``delegates`` (backend ids), ``operators`` (ExecuTorch kernels the
    program calls outside any delegate), ``xnnpack_nodes`` (node kind ->
    count, over every XNNPACK graph) and ``weighted``: one dict per
    convolution or fully-connected node with its ``kind`` and the XNNPACK
    data types (``fp32``, ``qint8``, ``qcint8`` ...) of its ``input``,
    ``filter`` and ``output``, and the output's ``scale`` and ``zero_point``
    where quantized.
    """
    try:
        from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
        from executorch.exir._serialize._program import deserialize_pte_binary
    except ImportError as e:
        raise DeployError(f"this executorch cannot read .pte files back ({e}); pip install 'executorch>=1.5'") \
            from None
    try:
        program = deserialize_pte_binary(bytes(data)).program
        plan = next(p for p in program.execution_plan if p.name == "forward")
    except Exception as e:  # a damaged file fails anywhere in the flatbuffer reader, with any exception
        raise DeployError(f"not an ExecuTorch program: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    out = {"delegates": [d.id for d in plan.delegates], "operators": [op.name for op in plan.operators],
           "xnnpack_nodes": Counter(), "weighted": []}
    for delegate in plan.delegates:
        if delegate.id != "XnnpackBackend":
            continue
        payload = program.backend_delegate_data[delegate.processed.index].data
        header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
        graph = _xnnpack_graph(payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
        values = graph["xvalues"]
        for node in graph["xnodes"]:
            kind, fields = node["xnode_union_type"], node["xnode_union"]
            out["xnnpack_nodes"][kind] += 1
            if kind in WEIGHTED_NODES:
                output = _value(values[fields["output_id"]])
                out["weighted"].append({"kind": kind, "input": _value(values[fields["input1_id"]])["type"],
                                        "filter": _value(values[fields["filter_id"]])["type"],
                                        "output": output["type"], **{k: output[k] for k in ("scale", "zero_point")
                                                                     if k in output}})
    out["xnnpack_nodes"] = dict(out["xnnpack_nodes"])
    return out


def _value(value: dict) -> dict:
    """An XNNPACK graph value as its data type (without the ``xnn_datatype_`` prefix) and per-tensor quantization."""
    body = value["xvalue_union"]
    if value["xvalue_union_type"] == "XNNQuantizedTensorValue":
        out = {"type": body["tensor_value"]["datatype"].removeprefix("xnn_datatype_")}
        if body.get("quant_params_type") == "PerTensorQuant":
            out.update(scale=body["quant_params"]["scale"], zero_point=body["quant_params"]["zero_point"])
        return out
    return {"type": body["datatype"].removeprefix("xnn_datatype_")}


def _xnnpack_graph(flatbuffer: bytes) -> dict:
    """An XNNPACK delegate's graph as JSON, read with the flatc and schema ExecuTorch ships (as it reads a .pte)."""
    schema = importlib.resources.files("executorch.backends.xnnpack.serialization") / "schema.fbs"
    flatc = importlib.resources.files("executorch.data.bin") / "flatc"
    with tempfile.TemporaryDirectory(prefix="mobilenets-pte-") as tmp, \
            importlib.resources.as_file(schema) as schema_path, importlib.resources.as_file(flatc) as flatc_path:
        binary = Path(tmp) / "graph.bin"
        binary.write_bytes(flatbuffer)
        done = subprocess.run([str(flatc_path), "--json", "--strict-json", "--defaults-json", "--raw-binary",
                               "-o", tmp, str(schema_path), "--", str(binary)], capture_output=True, text=True)
        if done.returncode != 0:
            raise DeployError(f"cannot read the XNNPACK graph of this program: {done.stderr.strip()[:200]}")
        # flatc writes unbounded clamps (ReLU's) as bare inf, which JSON spells Infinity
        return json.loads(re.sub(r"(?<=[:\s-])inf\b", "Infinity", (Path(tmp) / "graph.json").read_text()))


# ---------------------------------------------------------------- running a program


class _Program:
    """``run(x)`` over one loaded program; holds the program, because its method does not keep it alive.

    ExecuTorch's Python ``Method`` refers to memory its ``Program`` owns (the
    program's bytes); once the program is collected, ``execute`` reads freed
    memory: a segmentation fault or wrong numbers, by what was allocated since.
    """

    def __init__(self, data: bytes):
        from executorch.runtime import Runtime

        try:
            self.program = Runtime.get().load_program(data)
            self.method = self.program.load_method("forward")
        except (RuntimeError, ValueError) as e:
            raise DeployError(f"ExecuTorch cannot load this program: {str(e).splitlines()[0]}") from None
        self.limit = self.method.metadata.input_tensor_meta(0).sizes()[0]  # the memory plan's batch

    def __call__(self, x) -> torch.Tensor:
        x = as_input(x).contiguous()
        return torch.cat([self.method.execute([chunk.contiguous()])[0].float() for chunk in x.split(self.limit)])


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
    match_threads()
    return _Program(data)


class ExecuTorch(Backend):
    name = "executorch"
    precisions = ("fp32", "int8")
    refusal = "ExecuTorch's XNNPACK programs run fp32 or int8"
    tried_by_auto = False  # lowering takes 10-25 s: built when named, not tried on every auto choice
    requires = ("executorch.runtime", "executorch.exir")
    extra = "executorch"  # apart from deploy: it pins torchao to its own minor version
    shares_process = False  # pick --runtime times its files alone, in a fresh process (:mod:`.isolated`)
    formats = (ExportFormat("executorch", ".pte", ("fp32", "int8"), refusal="ExecuTorch files hold fp32 or int8",
                            options=("metadata",)),)

    def describe(self, precision: str) -> str:
        return "ExecuTorch (XNNPACK)" + (", int8 per-channel" if precision == "int8" else "")

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        return runner(pte_bytes(folded, precision, batches, resolution, batch_size))

    def save(self, folded, path, format, precision, batches, resolution, *, metadata=None) -> Path:
        data = pte_bytes(folded, precision, batches, resolution, metadata=metadata or {})
        return atomic_write(Path(path), lambda f: f.write(data))

    def load(self, path, format) -> Run:
        return runner(Path(path).read_bytes())


BACKEND = ExecuTorch()
