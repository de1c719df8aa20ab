"""The protocol buffer wire format: fields by number, without the protobuf library or the .proto files."""

from __future__ import annotations

from . import FormatError

# wire types: varint, 64-bit, length-delimited, 32-bit (3 and 4 are proto2 groups, which no message here uses)
VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(buf, pos: int) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at ``pos``."""
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise FormatError("a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise FormatError("a varint is longer than 64 bits")


def fields(buf):
    """(field number, wire type, value) per field: an int for varints, a slice of ``buf`` otherwise.

    Every declared length is checked against what remains before it is sliced.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise FormatError("a field numbered 0")
        if wire == VARINT:
            value, pos = varint(buf, pos)
        else:
            if wire == LEN:
                size, pos = varint(buf, pos)
            elif wire in (I64, I32):
                size = 8 if wire == I64 else 4
            else:
                raise FormatError(f"wire type {wire} (field {field})")
            if size > end - pos:
                raise FormatError(f"field {field} declares {size} bytes but only {end - pos} remain")
            value, pos = buf[pos:pos + size], pos + size
        yield field, wire, value


def expect(field: int, wire: int, want: int) -> None:
    """A field of the wire type its schema says; a damaged message may carry any type under any number."""
    if wire != want:
        raise FormatError(f"field {field} has wire type {wire}, expected {want}")


def text(value) -> str:
    """A string field (UTF-8)."""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("a name that is not UTF-8") from None


def signed64(v: int) -> int:
    """An int64 field: varints carry its two's complement as an unsigned 64-bit number."""
    return v - (1 << 64) if v >= 1 << 63 else v
