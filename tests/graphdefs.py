"""Frozen TensorFlow graphs written byte by byte on the protobuf wire, for the hostile-graph tests and
benchmarks/frozen_graph_walk.py: no TensorFlow needed to craft what TensorFlow would never write."""

from __future__ import annotations

import numpy as np

from weights_helpers import tf_slim_variables


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def attr(key: str, value: bytes) -> bytes:
    """One NodeDef.attr map entry: key, AttrValue (its fields already encoded)."""
    return field(5, field(1, key.encode()) + field(2, value))


def node(name: str, op: str, inputs=(), attrs: bytes = b"") -> bytes:
    """One GraphDef.node."""
    body = field(1, name.encode()) + field(2, op.encode()) + b"".join(field(3, i.encode()) for i in inputs)
    return field(1, body + attrs)


def tensor_proto(shape, content: bytes | None = None, float_val=(), dtype: int = 1) -> bytes:
    """A TensorProto: ``content`` as tensor_content, else ``float_val`` listed (TensorFlow fills the rest)."""
    dims = b"".join(field(2, varint(1 << 3) + varint(d)) for d in shape)
    out = varint(1 << 3) + varint(dtype) + field(2, dims)
    if content is not None:
        out += field(4, content)
    if len(float_val):
        out += field(5, np.asarray(float_val, "<f4").tobytes())
    return out


def const(name: str, array=None, *, proto: bytes | None = None) -> bytes:
    proto = proto if proto is not None else tensor_proto(np.shape(array), np.asarray(array, "<f4").tobytes())
    return node(name, "Const", attrs=attr("value", field(8, proto)))


def float_attr(key: str, value: float) -> bytes:
    return attr(key, varint(4 << 3 | 5) + np.float32(value).tobytes())


def mobilenet_graph(alpha: float = 0.25, resolution: int = 128, eps_attr: bytes | None = None, seed: int = 0,
                    extra: bytes = b"", dims: tuple[int, ...] | None = None) -> bytes:
    """A frozen MobileNet v1 as converters read it: every TF-slim variable a Const, an input placeholder of
    ``resolution`` (or of shape ``dims``, -1 for an unknown size) read by the first Conv2D, and one
    FusedBatchNorm carrying ``eps_attr`` (the attribute's bytes; None leaves it out); ``extra`` nodes are
    appended."""
    parts = [const(name, value) for name, value in tf_slim_variables(alpha, seed).items()]
    dims = dims or (1, resolution, resolution, 3)
    # TensorShapeProto.dim.size is an int64: -1 is written as its two's complement varint
    shape = field(7, b"".join(field(2, varint(1 << 3) + varint(d & ((1 << 64) - 1))) for d in dims))
    parts.append(node("input", "Placeholder", attrs=attr("shape", shape)))
    parts.append(node("MobilenetV1/MobilenetV1/Conv2d_0/Conv2D", "Conv2D", ["input", "MobilenetV1/Conv2d_0/weights"]))
    parts.append(node("MobilenetV1/MobilenetV1/Conv2d_0/BatchNorm/FusedBatchNorm", "FusedBatchNorm",
                      ["MobilenetV1/MobilenetV1/Conv2d_0/Conv2D"], eps_attr or b""))
    return b"".join(parts) + extra


def identity_ladders(n: int, name_bytes: int = 100, kinds=("conv", "add")) -> bytes:
    """``n`` nodes in ladders of Identity nodes, from the first kernel ("conv") and from a moving variance
    ("add"), every rung read by a Conv2D (as its kernel) or an AddV2 (an unfused BatchNorm's variance +
    epsilon).  Resolving each rung afresh walks the chain below it: with r rungs a ladder, r^2 / 2 steps
    where remembering each walk makes them r.  Names are padded to ``name_bytes``, as long as TF-slim's
    scoped names: 8,000 nodes make about 1.3 MB."""
    pad = "x" * max(0, name_bytes - 60)
    eps = "MobilenetV1/Conv2d_1_pointwise/BatchNorm/batchnorm/add/y"
    parts = [const(eps, np.float32(1e-3))]
    for kind in kinds:
        below = "MobilenetV1/Conv2d_0/weights" if kind == "conv" else "MobilenetV1/Conv2d_0/BatchNorm/moving_variance"
        for k in range(n // (2 * len(kinds))):
            rung = f"MobilenetV1/ladder/{pad}/{kind}_rung_{k}"
            parts.append(node(rung, "Identity", [below]))
            below = rung
            if kind == "conv":
                parts.append(node(f"MobilenetV1/ladder/{pad}/conv_{k}", "Conv2D", ["input", rung]))
            else:
                parts.append(node(f"MobilenetV1/ladder/{pad}/batchnorm_{k}/add", "AddV2", [rung, eps]))
    return b"".join(parts)
