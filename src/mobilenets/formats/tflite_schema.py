"""The LiteRT (TFLite) flatbuffer: the subset of its schema MobileNet v1 uses, written and read.

Field slots, enum values and the file identifier ``TFL3`` are those of
LiteRT's ``schema.fbs`` (schema version 3).  Writing uses the ``flatbuffers``
runtime's builder (it comes with ``ai-edge-litert``, extra ``deploy``);
reading is a small bounded parser of our own, so ``convert --from tflite``
needs no runtime and a damaged file gives one line, not a crash.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import MobilenetsError

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"

# TensorType
FLOAT32, FLOAT16, INT32, UINT8, INT64, INT16, INT8 = 0, 1, 2, 3, 4, 7, 9
NUMPY_TYPES = {FLOAT32: np.float32, FLOAT16: np.float16, INT32: np.int32, UINT8: np.uint8, INT64: np.int64, INT16: np.int16,
               INT8: np.int8}

# BuiltinOperator
AVERAGE_POOL_2D, CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE = 1, 3, 4, 6
FULLY_CONNECTED, RESHAPE, SOFTMAX, PAD, MEAN, SQUEEZE, QUANTIZE = 9, 22, 25, 34, 40, 43, 114
OPERATOR_NAMES = {AVERAGE_POOL_2D: "AVERAGE_POOL_2D", CONV_2D: "CONV_2D", DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D",
                  DEQUANTIZE: "DEQUANTIZE", FULLY_CONNECTED: "FULLY_CONNECTED", RESHAPE: "RESHAPE",
                  SOFTMAX: "SOFTMAX", PAD: "PAD", MEAN: "MEAN", SQUEEZE: "SQUEEZE", QUANTIZE: "QUANTIZE"}

# BuiltinOptions union tags, and the builtin each belongs to
OPTIONS_TYPE = {CONV_2D: 1, DEPTHWISE_CONV_2D: 2, AVERAGE_POOL_2D: 5, FULLY_CONNECTED: 8, SOFTMAX: 9,
                RESHAPE: 17, PAD: 22, MEAN: 27, QUANTIZE: 89, DEQUANTIZE: 38}

SAME, VALID = 0, 1  # Padding
NONE, RELU, RELU6 = 0, 1, 3  # ActivationFunctionType


class TFLiteError(MobilenetsError):
    """A .tflite file that cannot be read, or a graph this library cannot write or load."""


# ---------------------------------------------------------------- the graph, as plain data


@dataclass
class Quant:
    """Affine quantization: real = scale * (q - zero_point), per tensor or along ``axis``."""

    scale: list[float]
    zero_point: list[int]
    axis: int = 0
    min: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)


@dataclass
class Tensor:
    name: str
    shape: list[int]
    type: int
    data: np.ndarray | None = None  # constant tensors only
    quant: Quant | None = None
    shape_signature: list[int] | None = None  # -1 marks a dynamic dimension


@dataclass
class Operator:
    code: int
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)


@dataclass
class Graph:
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]
    description: str = ""
    metadata: dict[str, bytes] = field(default_factory=dict)
    version: int = SCHEMA_VERSION


# ---------------------------------------------------------------- writing

# option name -> (slot, kind) per builtin; kinds: b int8/bool, i int32, f float32, v int32 vector
_OPTION_SLOTS = {
    CONV_2D: {"padding": (0, "b"), "stride_w": (1, "i"), "stride_h": (2, "i"), "activation": (3, "b"),
              "dilation_w": (4, "i"), "dilation_h": (5, "i")},
    DEPTHWISE_CONV_2D: {"padding": (0, "b"), "stride_w": (1, "i"), "stride_h": (2, "i"),
                        "depth_multiplier": (3, "i"), "activation": (4, "b"), "dilation_w": (5, "i"),
                        "dilation_h": (6, "i")},
    AVERAGE_POOL_2D: {"padding": (0, "b"), "stride_w": (1, "i"), "stride_h": (2, "i"), "filter_w": (3, "i"),
                      "filter_h": (4, "i"), "activation": (5, "b")},
    FULLY_CONNECTED: {"activation": (0, "b"), "keep_num_dims": (2, "b")},
    SOFTMAX: {"beta": (0, "f")},
    RESHAPE: {"new_shape": (0, "v")},
    MEAN: {"keep_dims": (0, "b")},
    PAD: {}, QUANTIZE: {}, DEQUANTIZE: {},
}
_DEFAULTS = {"dilation_w": 1, "dilation_h": 1}


def write(graph: Graph) -> bytes:
    """The flatbuffer bytes of ``graph`` (one subgraph; buffer 0 is the empty sentinel the format reserves)."""
    import flatbuffers

    b = flatbuffers.Builder(1 << 16)

    def ivec(values, kind="i"):
        prepend = {"i": b.PrependInt32, "f": b.PrependFloat32, "q": b.PrependInt64}[kind]
        b.StartVector(4 if kind != "q" else 8, len(values), 4 if kind != "q" else 8)
        for v in reversed(list(values)):
            prepend(v)
        return b.EndVector()

    def table(slots):
        """slots: list of (slot, kind, value); offsets (kind "o") must be created before this is called."""
        b.StartObject(max(s for s, _, _ in slots) + 1 if slots else 0)
        for slot, kind, value in slots:
            {"o": b.PrependUOffsetTRelativeSlot, "b": b.PrependInt8Slot, "u8": b.PrependUint8Slot,
             "i": b.PrependInt32Slot, "u": b.PrependUint32Slot, "f": b.PrependFloat32Slot}[kind](slot, value, None)
        return b.EndObject()

    # buffers: 0 is the empty sentinel, then one per constant tensor, then one per metadata entry
    blobs = [b""]
    tensor_buffer = []
    for t in graph.tensors:
        if t.data is None:
            tensor_buffer.append(0)
        else:
            tensor_buffer.append(len(blobs))
            blobs.append(np.ascontiguousarray(t.data, dtype=NUMPY_TYPES[t.type]).tobytes())
    metadata_buffer = {}
    for name, payload in graph.metadata.items():
        metadata_buffer[name] = len(blobs)
        blobs.append(bytes(payload))

    buffer_offsets = []
    for blob in blobs:
        if blob:
            b.StartVector(1, len(blob), 16)  # 16-byte aligned so runtimes can map weights in place
            b.head = b.head - len(blob)
            b.Bytes[b.head:b.head + len(blob)] = blob
            data = b.EndVector()
            buffer_offsets.append(table([(0, "o", data)]))
        else:
            buffer_offsets.append(table([]))

    tensor_offsets = []
    for t, buf in zip(graph.tensors, tensor_buffer):
        name = b.CreateString(t.name)
        shape = ivec(t.shape)
        signature = ivec(t.shape_signature) if t.shape_signature is not None else None
        quant = None
        if t.quant is not None:
            q = t.quant
            parts = [(2, "o", ivec(q.scale, "f")), (3, "o", ivec(q.zero_point, "q"))]
            if q.min:
                parts += [(0, "o", ivec(q.min, "f")), (1, "o", ivec(q.max, "f"))]
            quant = table(parts + ([(6, "i", q.axis)] if q.axis else []))
        slots = [(0, "o", shape), (1, "b", t.type), (2, "u", buf), (3, "o", name)]
        slots += [(4, "o", quant)] if quant is not None else []
        slots += [(7, "o", signature)] if signature is not None else []
        tensor_offsets.append(table(slots))

    codes = sorted({op.code for op in graph.operators})
    code_offsets = [table([(0, "b", min(c, 127)), (2, "i", 1), (3, "i", c)]) for c in codes]

    op_offsets = []
    for op in graph.operators:
        known = _OPTION_SLOTS[op.code]
        unknown = set(op.options) - set(known)
        if unknown:
            raise TFLiteError(f"{OPERATOR_NAMES[op.code]} has no options {sorted(unknown)}")
        vectors = {k: ivec(v) for k, v in op.options.items() if known[k][1] == "v"}
        slots = [(known[k][0], "o" if known[k][1] == "v" else known[k][1], vectors.get(k, v))
                 for k, v in op.options.items()]
        options = table(slots)
        inputs, outputs = ivec(op.inputs), ivec(op.outputs)
        op_offsets.append(table([(0, "u", codes.index(op.code)), (1, "o", inputs), (2, "o", outputs),
                                 (3, "u8", OPTIONS_TYPE[op.code]), (4, "o", options)]))

    def offset_vector(offsets):
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    subgraph = table([(0, "o", offset_vector(tensor_offsets)), (1, "o", ivec(graph.inputs)),
                      (2, "o", ivec(graph.outputs)), (3, "o", offset_vector(op_offsets)),
                      (4, "o", b.CreateString("main"))])
    metadata = [table([(0, "o", b.CreateString(name)), (1, "u", metadata_buffer[name])])
                for name in graph.metadata]
    model = [(0, "u", graph.version), (1, "o", offset_vector(code_offsets)),
             (2, "o", offset_vector([subgraph])), (3, "o", b.CreateString(graph.description)),
             (4, "o", offset_vector(buffer_offsets))]
    if metadata:
        model.append((6, "o", offset_vector(metadata)))
    b.Finish(table(model), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def option_defaults(code: int, options: dict) -> dict:
    """``options`` with the schema's defaults filled in for the fields a reader looks at."""
    out = {k: _DEFAULTS.get(k, 0) for k in _OPTION_SLOTS.get(code, {})}
    out.update(options)
    return out


# ---------------------------------------------------------------- reading

_OPTION_KINDS = {"b": ("<b", 1), "i": ("<i", 4), "f": ("<f", 4)}
# no table of the schema that is read here has a field beyond slot 7 (Tensor.shape_signature)
_MAX_SLOT = 8
# the most entries a small vector may hold: a tensor's dims (LiteRT kernels take rank 6 at most, 8 is
# generous), an operator's or a graph's inputs and outputs; each is read per table that points at it, and
# many tables may point at one vector, so only a bound keeps reading linear in the file
MAX_RANK = 8
MAX_OPERANDS = 64


class _Reader:
    """Bounds-checked access to flatbuffer tables, vectors and strings in ``data``.

    Every offset and length is checked against the file before it is followed, and no table costs more than
    its first :data:`_MAX_SLOT` fields, so reading is linear in the file whatever it points at.
    """

    def __init__(self, data: bytes, source: str):
        self.data, self.source = data, source

    def fail(self, what: str):
        raise TFLiteError(f"{self.source} is not a readable .tflite model ({what}); give a LiteRT/TFLite "
                          f"flatbuffer as written by TFLiteConverter or mobilenets export")

    def scalar(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            self.fail(f"offset {pos} beyond the end of the file")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def table(self, pos: int) -> dict[int, int]:
        """slot -> absolute position of the fields present in the table at ``pos``."""
        vtable = pos - self.scalar("<i", pos)
        size = self.scalar("<H", vtable)
        if size < 4 or size % 2:
            self.fail(f"bad vtable at {vtable}")
        fields = {}
        for slot in range(min((size - 4) // 2, _MAX_SLOT)):
            off = self.scalar("<H", vtable + 4 + 2 * slot)
            if off:
                fields[slot] = pos + off
        return fields

    def ref(self, pos: int) -> int:
        return pos + self.scalar("<I", pos)

    def vector(self, pos: int, elem: int) -> tuple[int, int]:
        start = self.ref(pos)
        n = self.scalar("<I", start)
        if start + 4 + n * elem > len(self.data):
            self.fail(f"vector of {n} at {start} runs past the end of the file")
        return start + 4, n

    def tables(self, fields, slot) -> list[dict[int, int]]:
        if slot not in fields:
            return []
        start, n = self.vector(fields[slot], 4)
        return [self.table(self.ref(start + 4 * i)) for i in range(n)]

    def array(self, fields, slot, dtype, most: int | None = None, what: str = "") -> np.ndarray:
        """A vector of scalars, a read-only view of the file (no copy); ``most`` bounds its length."""
        if slot not in fields:
            return np.zeros(0, dtype)
        dtype = np.dtype(dtype)
        start, n = self.vector(fields[slot], dtype.itemsize)
        if most is not None and n > most:
            self.fail(f"{what} lists {n} entries, at most {most} make sense")
        return np.frombuffer(self.data, dtype, n, start)

    def ints(self, fields, slot, most: int, what: str) -> list[int]:
        return [int(v) for v in self.array(fields, slot, "<i4", most, what)]

    def string(self, fields, slot) -> str:
        if slot not in fields:
            return ""
        start, n = self.vector(fields[slot], 1)
        return self.data[start:start + n].decode("utf-8", "replace")

    def get(self, fields, slot, fmt, default=0):
        return self.scalar(fmt, fields[slot]) if slot in fields else default


def _quant(r: _Reader, t, name: str, shape: list[int]) -> Quant | None:
    """A tensor's affine quantization, checked as LiteRT checks it: one scale per tensor or one per channel
    along an axis the tensor has, as many zero points as scales, scales positive and finite."""
    q = r.table(r.ref(t[4]))
    most = max([1, *shape])
    scale = r.array(q, 2, "<f4", most, f"the quantization of tensor {name!r}")
    if not len(scale):
        return None
    zero = r.array(q, 3, "<i8", most, f"the quantization of tensor {name!r}")
    axis = r.get(q, 6, "<i")
    if len(zero) != len(scale):
        r.fail(f"tensor {name!r} has {len(scale)} quantization scales and {len(zero)} zero points")
    if len(scale) > 1 and not (0 <= axis < len(shape) and shape[axis] == len(scale)):
        r.fail(f"tensor {name!r} of shape {shape} has {len(scale)} scales along axis {axis}")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        r.fail(f"tensor {name!r} has a quantization scale that is not a positive number")
    minmax = [[float(v) for v in r.array(q, slot, "<f4", most, f"the quantization of tensor {name!r}")]
              for slot in (0, 1)]
    return Quant([float(v) for v in scale], [int(v) for v in zero], axis, *minmax)


def read(data: bytes, source: str = "the file") -> Graph:
    """Parse a .tflite flatbuffer's first subgraph into a :class:`Graph` (constants as read-only numpy views)."""
    r = _Reader(bytes(data), source)
    if len(r.data) < 8:
        r.fail(f"{len(r.data)} bytes")
    if r.data[4:8] != FILE_IDENTIFIER:
        r.fail(f"file identifier {r.data[4:8]!r}, expected {FILE_IDENTIFIER!r}")
    model = r.table(r.ref(0))
    version = r.get(model, 0, "<I")
    codes = [max(r.get(c, 0, "<b"), r.get(c, 3, "<i")) for c in r.tables(model, 1)]
    buffers = [r.array(b, 0, np.uint8) for b in r.tables(model, 4)]
    subgraphs = r.tables(model, 2)
    if not subgraphs:
        r.fail("no subgraph")
    sg = subgraphs[0]
    tensors = []
    for t in r.tables(sg, 0):
        name = r.string(t, 3)
        ttype = r.get(t, 1, "<b")
        shape = r.ints(t, 0, MAX_RANK, f"the shape of tensor {name!r}")
        if any(d < 0 for d in shape):
            r.fail(f"tensor {name!r} has a negative dimension in its shape {shape}")
        buf = r.get(t, 2, "<I")
        if buf >= len(buffers):
            r.fail(f"tensor buffer {buf} of {len(buffers)}")
        data = None
        if buffers[buf].size:
            if ttype not in NUMPY_TYPES:
                r.fail(f"constant of tensor type {ttype}")
            raw = buffers[buf]
            dtype = np.dtype(NUMPY_TYPES[ttype])
            if raw.size != dtype.itemsize * math.prod(shape):
                r.fail(f"constant {name!r} of {raw.size} bytes for shape {shape}")
            data = raw.view(dtype).reshape(shape)
        quant = _quant(r, t, name, shape) if 4 in t else None
        signature = r.ints(t, 7, MAX_RANK, f"the shape signature of tensor {name!r}") if 7 in t else None
        tensors.append(Tensor(name, shape, ttype, data, quant, signature))
    operators = []
    for op in r.tables(sg, 3):
        index = r.get(op, 0, "<I")
        if index >= len(codes):
            r.fail(f"operator code {index} of {len(codes)}")
        code = codes[index]
        options = {}
        if 4 in op and code in _OPTION_SLOTS:
            o = r.table(r.ref(op[4]))
            for name, (slot, kind) in _OPTION_SLOTS[code].items():
                if kind == "v":
                    if slot in o:
                        options[name] = r.ints(o, slot, MAX_RANK, f"option {name}")
                elif slot in o:
                    options[name] = r.scalar(_OPTION_KINDS[kind][0], o[slot])
        what = f"operator {len(operators)} ({OPERATOR_NAMES.get(code, code)})"
        ins = r.ints(op, 1, MAX_OPERANDS, f"the inputs of {what}")
        outs = r.ints(op, 2, MAX_OPERANDS, f"the outputs of {what}")
        # -1 marks an optional input left out (a convolution without bias); no output is optional
        if any(not -1 <= i < len(tensors) for i in ins) or any(not 0 <= i < len(tensors) for i in outs):
            r.fail(f"{what} names a tensor that does not exist (inputs {ins}, outputs {outs}, "
                   f"{len(tensors)} tensors)")
        operators.append(Operator(code, ins, outs, option_defaults(code, options)))
    metadata, total = {}, 0
    for m in r.tables(model, 6):
        buf = r.get(m, 1, "<I")
        if buf < len(buffers):
            total += buffers[buf].size
            if total > len(r.data):  # entries may share one buffer: copies are bounded by the file
                r.fail("its metadata entries hold more bytes than the file")
            metadata[r.string(m, 0)] = buffers[buf].tobytes()
    graph_io = [r.ints(sg, slot, MAX_OPERANDS, "the graph's inputs and outputs") for slot in (1, 2)]
    if any(not 0 <= i < len(tensors) for i in graph_io[0] + graph_io[1]):
        r.fail("the graph's inputs or outputs name a tensor that does not exist")
    return Graph(tensors, operators, *graph_io, r.string(model, 3), metadata, version)
