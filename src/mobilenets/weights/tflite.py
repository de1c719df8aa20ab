"""``convert --from tflite``: a MobileNet v1 ``.tflite`` file (float or quantized) to our state dict.

Reads the flatbuffer without any runtime (:mod:`mobilenets.formats.tflite_schema`).  The
converters fold BatchNorm into each convolution, so a layer comes back as its
convolution with a bias; it loads into our conv + BatchNorm as that
convolution and a BatchNorm that adds the bias (gamma 1, mean 0, variance
1 - eps), which computes the file's function exactly and can be fine-tuned.

Quantized files (the 2018 uint8 per-tensor asymmetric layout, and int8 per
channel as TFLiteConverter writes today) give their dequantized weights,
``scale * (q - zero_point)``, and the activation ranges their int8 graph used
in ``meta["int8"]["ranges"]`` ("input", "features.<i>", "pool", "logits").
Graph shapes accepted: a chain of CONV_2D / DEPTHWISE_CONV_2D (ReLU6 or ReLU
fused; SAME, or an explicit PAD then VALID), MEAN or AVERAGE_POOL_2D, a 1x1
CONV_2D or FULLY_CONNECTED head, then RESHAPE / SQUEEZE / SOFTMAX; QUANTIZE /
DEQUANTIZE at the ends and the shape arithmetic converters emit are skipped.
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..formats import tflite_schema as fb
from ..images import INCEPTION
from ..metadata import Metadata
from .archive import check_inflation
from .layout import Converted, WeightsError, imagenet_labels, infer_config

MAX_FILE_BYTES = 1 << 30
INT8_FORMAT_VERSION = 1
# SHAPE, STRIDED_SLICE, PACK, CAST: the arithmetic TFLiteConverter emits for a dynamic-batch RESHAPE
_SHAPE_OPS = {77, 45, 83, 53}
_PASS = {fb.RESHAPE, fb.SQUEEZE, fb.SOFTMAX, fb.QUANTIZE, fb.DEQUANTIZE, *_SHAPE_OPS}


def read_tflite_bytes(path) -> tuple[bytes, str]:
    """The .tflite bytes of ``path``: a .tflite file, or a release .tgz holding exactly one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; give a .tflite file or a release .tgz holding one")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise WeightsError(f"{path} is {path.stat().st_size} bytes, more than any MobileNet v1 .tflite")
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".tflite")]
            if len(members) != 1:
                raise WeightsError(f"{path} holds {len(members)} .tflite files "
                                   f"({[m.name for m in members][:4]}); extract the one to convert and give it")
            if members[0].size > MAX_FILE_BYTES:
                raise WeightsError(f"{path}: {members[0].name} is too large for a MobileNet v1 .tflite")
            check_inflation(path, members[0].name, members[0].size)
            return archive.extractfile(members[0]).read(), f"{path.name}:{members[0].name}"
    return path.read_bytes(), path.name


def dequantized(t: fb.Tensor) -> np.ndarray:
    """A constant tensor as float32: integers through their scale and zero point (per tensor or per channel)."""
    if t.data is None:
        raise WeightsError(f"tensor {t.name!r} should be a constant but has no data")
    data = t.data.astype(np.float64)
    if t.type in (fb.FLOAT32, fb.FLOAT16):
        return data.astype(np.float32)
    if t.quant is None:
        raise WeightsError(f"integer tensor {t.name!r} has no quantization parameters")
    scale, zero = np.asarray(t.quant.scale), np.asarray(t.quant.zero_point, np.float64)
    if scale.size > 1:
        shape = [1] * data.ndim
        shape[t.quant.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((data - zero) * scale).astype(np.float32)


def tensor_range(t: fb.Tensor) -> tuple[float, float] | None:
    """The real interval an integer activation tensor can represent, or None for a float tensor."""
    if t.quant is None or t.type not in (fb.INT8, fb.UINT8):
        return None
    info = np.iinfo(fb.NUMPY_TYPES[t.type])
    s, z = t.quant.scale[0], t.quant.zero_point[0]
    return float(s * (info.min - z)), float(s * (info.max - z))


class _Graph:
    """The layers of a MobileNet v1 graph, in order, with their padding and activation."""

    def __init__(self, graph: fb.Graph, name: str):
        self.g, self.name = graph, name
        self.producer = {o: op for op in graph.operators for o in op.outputs}

    def fail(self, what: str):
        raise WeightsError(f"{self.name}: {what}; convert --from tflite reads MobileNet v1 graphs as "
                           f"TFLiteConverter and mobilenets export write them")

    def operand(self, op: fb.Operator, k: int, what: str) -> int:
        """Input ``k`` of ``op``, which must be there (the reader has checked that it names a tensor)."""
        if len(op.inputs) <= k or op.inputs[k] < 0:
            self.fail(f"{what} ({fb.OPERATOR_NAMES.get(op.code, op.code)}) has inputs {op.inputs}, without "
                      f"input {k}")
        return op.inputs[k]

    def output(self, op: fb.Operator, what: str) -> int:
        if not op.outputs:
            self.fail(f"{what} ({fb.OPERATOR_NAMES.get(op.code, op.code)}) has no output")
        return op.outputs[0]

    def stored(self, index: int) -> fb.Tensor:
        """The tensor holding constant ``index``'s values: itself, or what a DEQUANTIZE reads (fp16 weights)."""
        t = self.g.tensors[index]
        if t.data is None and index in self.producer and self.producer[index].code == fb.DEQUANTIZE:
            return self.g.tensors[self.operand(self.producer[index], 0, f"the DEQUANTIZE of {t.name!r}")]
        return t

    def constant(self, index: int) -> np.ndarray:
        return dequantized(self.stored(index))

    def pads(self, index: int) -> tuple[int, int] | None:
        """(before, after) spatial padding if tensor ``index`` comes out of a PAD, else None."""
        op = self.producer.get(index)
        if op is None or op.code != fb.PAD:
            return None
        p = self.g.tensors[self.operand(op, 1, "a PAD")].data  # int32 amounts, not a quantized value
        if p is None:
            self.fail("a PAD whose amounts are not constant")
        p = p.astype(int)
        if p.shape != (4, 2) or p[0].any() or p[3].any() or tuple(p[1]) != tuple(p[2]):
            self.fail(f"unsupported padding {p.tolist()}")
        return int(p[1][0]), int(p[1][1])


def _layer_names() -> list[str]:
    return ["features.0"] + [f"features.{i}.{part}" for i in range(1, 14) for part in ("depthwise", "pointwise")]


def from_tflite(path, *, keep_background: bool = False, resolution: int | None = None) -> Converted:
    """Convert a MobileNet v1 ``.tflite`` (or a release ``.tgz`` with one) to our layout."""
    data, source = read_tflite_bytes(path)
    try:
        graph = fb.read(data, str(path))
    except fb.TFLiteError as e:
        raise WeightsError(str(e)) from None
    g = _Graph(graph, str(path))
    names = _layer_names()
    sd: dict[str, torch.Tensor] = {}
    convs, paddings, activations, ranges = [], set(), set(), {}
    pool, head = None, None
    for op in graph.operators:
        if op.code in (fb.CONV_2D, fb.DEPTHWISE_CONV_2D) and pool is None:
            convs.append(op)
        elif op.code in (fb.MEAN, fb.AVERAGE_POOL_2D) and pool is None:
            pool = op
        elif op.code in (fb.CONV_2D, fb.FULLY_CONNECTED) and pool is not None and head is None:
            head = op
        elif op.code == fb.PAD and pool is None:
            continue  # read through the convolution that consumes it
        elif op.code not in _PASS:
            g.fail(f"operator {fb.OPERATOR_NAMES.get(op.code, op.code)} is not part of MobileNet v1")
    if len(convs) != len(names) or pool is None:
        g.fail(f"found {len(convs)} convolutions{'' if pool else ' and no global pooling'}, MobileNet v1 has "
               f"{len(names)} then a global average pool")

    _check_shapes(g, convs, names, head, keep_background)
    eps = 1e-3
    for i, (op, name) in enumerate(zip(convs, names)):
        x, w_index = g.operand(op, 0, f"layer {i}"), g.operand(op, 1, f"layer {i}")
        w = g.constant(w_index)
        depthwise = op.code == fb.DEPTHWISE_CONV_2D
        if depthwise != name.endswith("depthwise"):
            g.fail(f"layer {i} is a {fb.OPERATOR_NAMES[op.code]} where MobileNet v1 has a "
                   f"{'depthwise' if name.endswith('depthwise') else 'full'} convolution")
        kernel = w.transpose(3, 0, 1, 2) if depthwise else w.transpose(0, 3, 1, 2)  # -> OIHW / (C, 1, kh, kw)
        bias = g.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else np.zeros(len(kernel))
        stride = op.options["stride_h"]
        pads = g.pads(x)
        if op.options["padding"] == fb.SAME and pads is None:
            style = "same"
        elif op.options["padding"] == fb.VALID and pads is not None:
            # SAME pads k - stride in all on a side the stride divides, the odd one after: (0, 1) at stride 2,
            # (1, 1) at stride 1, where it is also the symmetric padding; any other PAD changes the layer's size
            k = kernel.shape[-1]
            total = max(k - stride, 0)
            style = "same" if pads == (total // 2, total - total // 2) else (
                "symmetric" if pads == (k // 2, k // 2) else None)
        elif op.options["padding"] == fb.VALID and kernel.shape[-1] == 1:
            style = "same"
        else:
            style = None
        if style is None:
            g.fail(f"layer {i} pads {pads} with padding type {op.options['padding']}")
        if stride > 1:
            paddings.add(style)
        activations.add(op.options["activation"])
        sd[f"{name}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(kernel, np.float32))
        n = len(kernel)
        sd[f"{name}.bn.weight"] = torch.ones(n)
        sd[f"{name}.bn.bias"] = torch.from_numpy(np.asarray(bias, np.float32).reshape(-1).copy())
        sd[f"{name}.bn.running_mean"] = torch.zeros(n)
        sd[f"{name}.bn.running_var"] = torch.full((n,), 1.0 - eps)
        sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
        if i == 0:
            ranges["input"] = tensor_range(graph.tensors[x])
        ranges[f"features.{i}"] = tensor_range(graph.tensors[g.output(op, f"layer {i}")])
    if len(paddings) > 1:
        g.fail("its stride-2 layers mix SAME and symmetric padding")
    if activations - {fb.RELU6} and activations - {fb.RELU}:
        g.fail(f"fused activations {sorted(activations)}: every layer must fuse ReLU6 (or every one ReLU)")
    ranges["pool"] = tensor_range(graph.tensors[g.output(pool, "the pool")])

    labels = None
    if head is not None:
        w = g.constant(g.operand(head, 1, "the classifier"))
        w = w.reshape(w.shape[0], -1)  # (classes, C): a 1x1 conv's OHWI and FULLY_CONNECTED's (out, in) alike
        b = g.constant(head.inputs[2]) if len(head.inputs) > 2 and head.inputs[2] >= 0 else np.zeros(len(w))
        if head.options.get("activation", 0) != fb.NONE:
            g.fail("the classifier has a fused activation; logits must be linear")
        ranges["logits"] = tensor_range(graph.tensors[g.output(head, "the classifier")])
        if len(w) == 1001:
            if keep_background:
                labels = ["background"] + imagenet_labels()
            else:  # index 0 is "background", index k the ImageNet class k - 1
                w, b = w[1:], b[1:]
        sd["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(w, np.float32))
        sd["classifier.bias"] = torch.from_numpy(np.asarray(b, np.float32).reshape(-1).copy())

    ours = _own_metadata(graph, str(path))
    input_shape = graph.tensors[convs[0].inputs[0]].shape
    if g.pads(convs[0].inputs[0]) is not None:
        input_shape = graph.tensors[g.producer[convs[0].inputs[0]].inputs[0]].shape
    options = {"padding": "symmetric" if paddings == {"symmetric"} else "tf_same", "bn_eps": eps,
               "activation": "relu6" if activations == {fb.RELU6} else "relu"}
    config = infer_config(sd, name=str(path), **options)
    if labels is None:
        labels = ours.get("labels") or (imagenet_labels() if config.num_classes == 1000 else None)
    int8 = None
    if all(r is not None for r in ranges.values()) and ranges:
        int8 = {"version": INT8_FORMAT_VERSION, "weights": _weight_layout(graph, convs),
                "activations": "affine per tensor (from the .tflite file)",
                "ranges": {k: list(v) for k, v in ranges.items()},
                "scales": [[1.0] * int(sd[f"{n}.conv.weight"].shape[0]) for n in names], "report": {}}
    # what the file's own metadata claims is checked like any stored record, before anything is written
    meta = Metadata.from_dict({"resolution": int(resolution or input_shape[1]),
                               "normalization": ours.get("normalization") or INCEPTION, "labels": labels,
                               "source": f"tflite:{source}", "int8": int8}, str(path),
                              num_classes=config.num_classes)
    return Converted(sd, config, meta)


def _weight_layout(graph: fb.Graph, convs) -> str:
    t = graph.tensors[convs[0].inputs[1]]
    kind = "uint8" if t.type == fb.UINT8 else "int8"
    per = "per channel" if t.quant is not None and len(t.quant.scale) > 1 else "per tensor"
    return f"{kind} {per} (from the .tflite file)"


def _own_metadata(graph: fb.Graph, name: str) -> dict:
    """What mobilenets export stored in the file (normalization, labels), if it wrote it; its fields are
    then checked as any stored record is (Metadata.from_dict)."""
    try:
        ours = json.loads(graph.metadata.get("mobilenets", b"{}").decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(ours, dict):
        raise WeightsError(f"{name}: its mobilenets metadata is a JSON {type(ours).__name__}, not an object with "
                           f"normalization and labels; export the model again")
    return ours


def _check_shapes(g: _Graph, convs, names, head, keep_background: bool) -> None:
    """Every weight's declared shape against the architecture, before any is dequantized (as every reader)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (op, name) in enumerate(zip(convs, names)):
        w = g.stored(g.operand(op, 1, f"layer {i}"))
        if len(w.shape) != 4:
            g.fail(f"layer {i}'s weights {w.name!r} have shape {w.shape}; a convolution's are 4-d")
        kh, kw = w.shape[1:3]
        ours = (w.shape[3], 1, kh, kw) if name.endswith("depthwise") else (w.shape[0], w.shape[3], kh, kw)
        shapes[f"{name}.conv.weight"] = ours
        shapes.update({f"{name}.bn.{k}": (ours[0],) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{name}.bn.num_batches_tracked"] = ()
        if len(op.inputs) > 2 and op.inputs[2] >= 0 and math.prod(g.stored(op.inputs[2]).shape) != ours[0]:
            g.fail(f"layer {i}'s bias has shape {g.stored(op.inputs[2]).shape} for {ours[0]} channels")
    if head is not None:
        w = g.stored(g.operand(head, 1, "the classifier")).shape
        if len(w) not in (2, 4) or not w[0]:
            g.fail(f"the classifier's weights have shape {w}; expected (classes, channels) or a 1x1 kernel")
        classes = w[0] - 1 if w[0] == 1001 and not keep_background else w[0]
        shapes["classifier.weight"], shapes["classifier.bias"] = (classes, math.prod(w[1:])), (classes,)
        if len(head.inputs) > 2 and head.inputs[2] >= 0 and math.prod(g.stored(head.inputs[2]).shape) != w[0]:
            g.fail(f"the classifier's bias has shape {g.stored(head.inputs[2]).shape} for {w[0]} classes")
    infer_config(shapes, name=g.name)
