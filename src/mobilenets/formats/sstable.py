"""LevelDB's table format (SSTable), as TensorFlow writes a checkpoint's ``.index``: blocks of
prefix-compressed key/value entries, an index block that points at them and a 48-byte footer; blocks raw
or snappy-compressed.  Also CRC-32C, with which TensorFlow checks every tensor's bytes."""

from __future__ import annotations

import numpy as np

from . import FormatError
from .protobuf import varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + crc32c


# ---------------------------------------------------------------- CRC-32C, to check every tensor's bytes

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reflected
_CRC_TABLE = np.zeros(256, dtype=np.uint32)
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _CRC32C_POLY if _c & 1 else _c >> 1
    _CRC_TABLE[_i] = _c
_CRC_CHUNK = 4096
_crc_zeros: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``, fast enough in numpy for checkpoint-sized tensors.

    The register update is affine: the register after a chunk is Z(register
    before) xor the chunk's CRC from a zero register, with Z the linear map of
    feeding 4096 zero bytes.  So all chunks are CRC'd at once (vectorised over
    chunks), then chained through Z; the tail is done byte by byte.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(buf) // _CRC_CHUNK
    reg = 0xFFFFFFFF
    if n:
        if not _crc_zeros:  # Z's columns: each basis bit pushed through 4096 zero bytes
            state = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
            for _ in range(_CRC_CHUNK):
                state = _CRC_TABLE[state & 0xFF] ^ (state >> 8)
            _crc_zeros.extend(int(v) for v in state)
        chunks = buf[: n * _CRC_CHUNK].reshape(n, _CRC_CHUNK)
        raw = np.zeros(n, dtype=np.uint32)
        for j in range(_CRC_CHUNK):
            raw = _CRC_TABLE[(raw ^ chunks[:, j]) & 0xFF] ^ (raw >> 8)
        for r in raw.tolist():
            z, bit = 0, 0
            while reg:
                if reg & 1:
                    z ^= _crc_zeros[bit]
                reg >>= 1
                bit += 1
            reg = z ^ r
    table = _CRC_TABLE.tolist()
    for b in data[n * _CRC_CHUNK:]:
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TensorFlow stores CRCs masked (rotated right 15 bits plus a constant) so CRCs of CRCs stay distinct."""
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def snappy_decompress(data: bytes) -> bytes:
    """Raw snappy, the one compression LevelDB tables may use."""
    n, pos = varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(data[pos:pos + extra], "little")
                pos += extra
            length += 1
            out += data[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            length = ((tag >> 2) & 7) + 4
            offset = ((tag >> 5) << 8) | data[pos]
            pos += 1
        elif kind == 2:
            length = (tag >> 2) + 1
            offset = int.from_bytes(data[pos:pos + 2], "little")
            pos += 2
        else:
            length = (tag >> 2) + 1
            offset = int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise FormatError("corrupt snappy block")
        for _ in range(length):  # copies may overlap their own output
            out.append(out[-offset])
    if len(out) != n:
        raise FormatError("corrupt snappy block (wrong length)")
    return bytes(out)


def _block(table: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise FormatError("a block runs past the end of the file")
    data, kind = table[offset:end], table[end]
    if kind == 0:
        return data
    if kind == 1:
        return snappy_decompress(data)
    raise FormatError(f"unknown block compression type {kind}")


def _block_entries(block: bytes):
    """(key, value) pairs of one block: keys share prefixes with the previous key; restarts at the end."""
    if len(block) < 4:
        raise FormatError("block too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise FormatError("corrupt block restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        value_len, pos = varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def table_entries(table: bytes):
    """(key, value) of every entry of an SSTable held whole in ``table``, in key order."""
    if len(table) < FOOTER_SIZE or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise FormatError("not an SSTable (bad footer magic)")
    footer = table[-FOOTER_SIZE:]
    _, pos = varint(footer, 0)  # metaindex handle: unused
    _, pos = varint(footer, pos)
    index_offset, pos = varint(footer, pos)
    index_size, pos = varint(footer, pos)
    for _, handle in _block_entries(_block(table, index_offset, index_size)):
        offset, p = varint(handle, 0)
        size, _ = varint(handle, p)
        yield from _block_entries(_block(table, offset, size))
