"""TensorFlow's tensor messages on the protobuf wire: dtypes, ``TensorShapeProto`` and ``TensorProto``.

Field numbers from tensorflow/core/framework/{types,tensor_shape,tensor}.proto.
A checkpoint's entries and a frozen graph's constants both carry them.
"""

from __future__ import annotations

import numpy as np

from . import FormatError
from .protobuf import I32, I64, LEN, VARINT, expect, fields, signed64, varint

# tensorflow/core/framework/types.proto
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
          9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
DT_BFLOAT16 = 14
# TensorProto's repeated value fields: field number -> numpy dtype of one element on the wire
_VALUE_FIELDS = {5: "<f4", 6: "<f8", 7: "int32", 10: "int64", 11: "bool", 13: "uint16"}


def tensor_shape(buf: memoryview) -> tuple[int, ...] | None:
    """A TensorShapeProto: dims (-1 where unknown), or None for an unknown rank."""
    dims = []
    for field, wire, value in fields(buf):
        if field == 2:  # dim
            expect(field, wire, LEN)
            size = 0
            for f, w, v in fields(value):
                if f == 1:
                    expect(f, w, VARINT)
                    size = signed64(v)
            dims.append(size)
        elif field == 3 and wire == VARINT and value:
            return None
    return tuple(dims)


def _values(field: int, wire: int, value) -> np.ndarray:
    """One occurrence of a repeated value field, packed (LEN) or a single element."""
    kind = np.dtype(_VALUE_FIELDS[field])
    if kind.kind == "f":
        if wire == LEN:
            if len(value) % kind.itemsize:
                raise FormatError(f"packed field {field} is not a whole number of {kind.itemsize}-byte values")
            return np.frombuffer(value, dtype=kind)
        expect(field, wire, I32 if kind.itemsize == 4 else I64)
        return np.frombuffer(value, dtype=kind)
    if wire == LEN:  # packed varints
        out, pos = [], 0
        while pos < len(value):
            v, pos = varint(value, pos)
            out.append(signed64(v))
        return np.array(out, dtype=np.int64)
    expect(field, wire, VARINT)
    return np.array([signed64(value)], dtype=np.int64)


def tensor(buf: memoryview, limit: int) -> np.ndarray:
    """A TensorProto as an array; ``limit`` bounds the bytes it may declare (the file's size)."""
    dtype_code, shape, content = 0, (), None
    values: dict[int, list[np.ndarray]] = {}
    for field, wire, value in fields(buf):
        if field == 1:
            expect(field, wire, VARINT)
            dtype_code = value
        elif field == 2:
            expect(field, wire, LEN)
            shape = tensor_shape(value)
        elif field == 4:
            expect(field, wire, LEN)
            content = value
        elif field in _VALUE_FIELDS:
            values.setdefault(field, []).append(_values(field, wire, value))
    if shape is None or any(d < 0 for d in shape):
        raise FormatError(f"a constant of unknown shape {shape}")
    if dtype_code == DT_BFLOAT16:
        dtype = np.dtype("<u2")
    elif dtype_code in DTYPES:
        dtype = np.dtype(DTYPES[dtype_code]).newbyteorder("<")
    else:
        raise FormatError(f"a constant of TensorFlow dtype {dtype_code}, which this reader does not decode")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    # a weight stored in a file can be no larger than the file; this refuses a shape that would allocate more
    if nbytes > limit:
        raise FormatError(f"a constant of shape {shape} declares {nbytes} bytes, more than the file's {limit}")
    if content is not None and len(content):
        if len(content) != nbytes:
            raise FormatError(f"a constant of shape {shape} has {len(content)} bytes of content, expected {nbytes}")
        array = np.frombuffer(content, dtype=dtype).astype(dtype.newbyteorder("="))
    else:
        parts = [v for chunks in values.values() for v in chunks]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        if len(flat) > count:
            raise FormatError(f"a constant of shape {shape} lists {len(flat)} values")
        if 0 < len(flat) < count:  # TensorFlow repeats the last listed value to fill the shape
            flat = np.concatenate([flat, np.full(count - len(flat), flat[-1])])
        if 13 in values:  # half_val carries the 16-bit patterns of float16 (or bfloat16) values
            flat = flat.astype(np.uint16).view(dtype.newbyteorder("="))
        array = flat.astype(dtype.newbyteorder("=")) if len(flat) else np.zeros(count, dtype=dtype)
    if dtype_code == DT_BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(shape)
