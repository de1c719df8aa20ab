"""TensorFlow's tensor messages on the protobuf wire: dtypes, ``TensorShapeProto`` and ``TensorProto``.

Field numbers from tensorflow/core/framework/{types,tensor_shape,tensor}.proto.
A checkpoint's entries and a frozen graph's constants both carry them.
"""

from __future__ import annotations

import numpy as np

from . import FormatError
from .protobuf import I32, I64, LEN, VARINT, expect, fields, signed64

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


def _varints(value) -> np.ndarray:
    """Packed varints, decoded in numpy: time and memory linear in the bytes, whatever the count."""
    b = np.frombuffer(value, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(b) and (not len(ends) or ends[-1] != len(b) - 1):
        raise FormatError("a packed varint runs past the end of its field")
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else ends
    lengths = ends - starts + 1
    if len(lengths) and lengths.max() > 10:
        raise FormatError("a varint is longer than 64 bits")
    out = np.zeros(len(ends), dtype=np.uint64)
    for k in range(int(lengths.max()) if len(lengths) else 0):
        has = lengths > k
        out[has] |= (b[starts[has] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out.view(np.int64)  # int64 fields carry two's complement


def _count(field: int, wire: int, value) -> int:
    """How many elements one occurrence of a repeated value field lists, without decoding them."""
    kind = np.dtype(_VALUE_FIELDS[field])
    if wire != LEN:
        return 1
    if kind.kind == "f":
        return len(value) // kind.itemsize
    return int(np.count_nonzero(np.frombuffer(value, dtype=np.uint8) < 0x80))


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
    if wire == LEN:
        return _varints(value)
    expect(field, wire, VARINT)
    return np.array([signed64(value)], dtype=np.int64)


def _dtype(dtype_code: int) -> np.dtype:
    """The dtype of a constant as decoded (bfloat16 as its 16-bit patterns), little-endian."""
    if dtype_code == DT_BFLOAT16:
        return np.dtype("<u2")
    if dtype_code in DTYPES:
        return np.dtype(DTYPES[dtype_code]).newbyteorder("<")
    raise FormatError(f"a constant of TensorFlow dtype {dtype_code}, which this reader does not decode")


def _header(buf: memoryview):
    """(dtype code, shape, tensor_content or None, repeated value fields) of a TensorProto, nothing decoded."""
    dtype_code, shape, content = 0, (), None
    values: list[tuple[int, int, object]] = []
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
            values.append((field, wire, value))
    if shape is None or any(d < 0 for d in shape):
        raise FormatError(f"a constant of unknown shape {shape}")
    return dtype_code, shape, content, values


def declared(buf: memoryview) -> tuple[int, tuple[int, ...], int]:
    """(dtype code, shape, bytes once decoded) a TensorProto declares, read without decoding its values."""
    dtype_code, shape, _, _ = _header(buf)
    count = 1
    for d in shape:
        count *= d
    return dtype_code, shape, count * (4 if dtype_code == DT_BFLOAT16 else _dtype(dtype_code).itemsize)


def tensor(buf: memoryview, limit: int) -> np.ndarray:
    """A TensorProto as an array; ``limit`` bounds the bytes it may declare (the file's size).

    The array is the one allocation the size of the tensor: listed values are
    counted before they are decoded and go straight into it, so a constant
    filled from one value costs its declared size once (bounded by ``limit``).
    """
    dtype_code, shape, content, values = _header(buf)
    dtype = _dtype(dtype_code)
    native = dtype.newbyteorder("=")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * (4 if dtype_code == DT_BFLOAT16 else dtype.itemsize)
    # a weight stored in a file can be no larger than the file; this refuses a shape that would allocate more
    if nbytes > limit:
        raise FormatError(f"a constant of shape {shape} declares {nbytes} bytes, more than the file's {limit}")
    if content is not None and len(content):
        if len(content) != count * dtype.itemsize:
            raise FormatError(f"a constant of shape {shape} has {len(content)} bytes of content, "
                              f"expected {count * dtype.itemsize}")
        array = np.frombuffer(content, dtype=dtype).astype(native)
    else:
        listed = sum(_count(*v) for v in values)
        if listed > count:
            raise FormatError(f"a constant of shape {shape} lists {listed} values")
        array = np.zeros(count, dtype=native)
        half = any(f == 13 for f, _, _ in values)  # half_val: the 16-bit patterns of float16 (or bfloat16)
        pos = 0
        for v in values:
            part = _values(*v)
            part = part.astype(np.uint16).view(native) if half else part.astype(native)
            array[pos:pos + len(part)] = part
            pos += len(part)
        if 0 < pos < count:  # TensorFlow repeats the last listed value to fill the shape
            array[pos:] = array[pos - 1]
    if dtype_code == DT_BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(shape)
