"""Reading TensorFlow (V2) checkpoints without TensorFlow.

A checkpoint ``model.ckpt`` is ``model.ckpt.index`` plus shards
``model.ckpt.data-00000-of-00001``.  The index is an SSTable (LevelDB's table
format): data blocks of prefix-compressed key/value entries, an index block
that points at them and a 48-byte footer.  Key ``""`` holds a
``BundleHeaderProto`` (shard count, endianness); every other key is a
variable name whose value is a ``BundleEntryProto`` (dtype, shape, shard,
offset, size, masked CRC-32C) locating the variable's raw little-endian
bytes in its shard; every tensor read is checked against its CRC.
Both protos are decoded here from the protobuf wire format, so converting the
released TF-slim weights needs neither TensorFlow nor protobuf.
"""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MobilenetsError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + crc32c

# tensorflow/core/framework/types.proto
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
          9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
DT_BFLOAT16 = 14
# The released 1.0-224 archive's largest member (the .data shard) is about 17 MB; members over this bound
# are refused before extraction, so a small archive cannot expand into all of memory or disk.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_ARCHIVE_BYTES = 1024 * 1024 * 1024  # all checkpoint members together


class CheckpointFormatError(MobilenetsError):
    """Not a readable TensorFlow checkpoint; the message says which file and why."""


class CheckpointMissingError(CheckpointFormatError, FileNotFoundError):
    """A checkpoint file that does not exist (also a FileNotFoundError)."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    sliced: bool
    crc32c: int | None  # masked, as TensorFlow stores it


# ---------------------------------------------------------------- wire formats


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointFormatError("varint longer than 64 bits")


def _proto_fields(buf: bytes):
    """(field number, value) for each field of a protobuf message: ints for varints/fixed, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointFormatError("truncated protobuf message")
        yield field, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _expect(value, kind: type, what: str):
    """A field of the wire type the schema says; a damaged message may carry any type under any number."""
    if not isinstance(value, kind):
        raise CheckpointFormatError(f"{what} has the wrong protobuf wire type")
    return value


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, value in _proto_fields(buf):
        if field == 2:  # TensorShapeProto.dim
            _expect(value, bytes, "a shape dimension")
            size = 0
            for f, v in _proto_fields(value):
                if f == 1:
                    size = _signed64(_expect(v, int, "a dimension size"))
            dims.append(size)
        elif field == 3 and value:
            raise CheckpointFormatError("a tensor of unknown rank")
    return tuple(dims)


# BundleEntryProto: dtype, shape, shard_id, offset, size, crc32c, slices
_ENTRY_TYPES = {1: int, 2: bytes, 3: int, 4: int, 5: int, 6: int, 7: bytes}


def _parse_entry(name: str, buf: bytes) -> Entry:
    dtype = shard_id = offset = size = 0
    shape: tuple[int, ...] = ()
    sliced = False
    crc = None
    for field, value in _proto_fields(buf):
        if field in _ENTRY_TYPES:
            _expect(value, _ENTRY_TYPES[field], f"field {field} of {name}'s entry")
        if field == 1:
            dtype = value
        elif field == 2:
            shape = _parse_shape(value)
        elif field == 3:
            shard_id = value
        elif field == 4:
            offset = value
        elif field == 5:
            size = value
        elif field == 6:
            crc = value
        elif field == 7:
            sliced = True
    return Entry(name, dtype, shape, shard_id, offset, size, sliced, crc)


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


def _snappy_decompress(data: bytes) -> bytes:
    """Raw snappy, the one compression LevelDB tables may use."""
    n, pos = _varint(data, 0)
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
            raise CheckpointFormatError("corrupt snappy block")
        for _ in range(length):  # copies may overlap their own output
            out.append(out[-offset])
    if len(out) != n:
        raise CheckpointFormatError("corrupt snappy block (wrong length)")
    return bytes(out)


def _read_block(table: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise CheckpointFormatError("a block runs past the end of the file")
    data, kind = table[offset:end], table[end]
    if kind == 0:
        return data
    if kind == 1:
        return _snappy_decompress(data)
    raise CheckpointFormatError(f"unknown block compression type {kind}")


def _block_entries(block: bytes):
    """(key, value) pairs of one block: keys share prefixes with the previous key; restarts at the end."""
    if len(block) < 4:
        raise CheckpointFormatError("block too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise CheckpointFormatError("corrupt block restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _table_entries(table: bytes):
    if len(table) < FOOTER_SIZE or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise CheckpointFormatError("not an SSTable (bad footer magic)")
    footer = table[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # metaindex handle: unused
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    for _, handle in _block_entries(_read_block(table, index_offset, index_size)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        yield from _block_entries(_read_block(table, offset, size))


# ---------------------------------------------------------------- the reader


class CheckpointReader:
    """Variables of a TF V2 checkpoint by name: ``names()``, ``shape(name)``, ``read(name)`` -> numpy array."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        index = Path(self.prefix + ".index")
        if not index.is_file():
            raise CheckpointMissingError(f"no TensorFlow checkpoint index {index}")
        try:
            self.num_shards, self.entries = 1, {}
            for key, value in _table_entries(index.read_bytes()):
                if key == b"":
                    self._header(value)
                else:
                    name = key.decode("utf8")
                    self.entries[name] = _parse_entry(name, value)
        except (IndexError, TypeError, UnicodeDecodeError) as e:  # a damaged index: offsets past a block, bad names
            raise CheckpointFormatError(f"{index} is not a readable TensorFlow checkpoint index: {e}") from None
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{index} is not a readable TensorFlow checkpoint index: {e}") from None
        self._shards: dict[int, bytes] = {}

    def _header(self, value: bytes) -> None:
        for field, v in _proto_fields(value):
            if field == 1:
                self.num_shards = _expect(v, int, "the shard count")
            elif field == 2 and v != 0:
                raise CheckpointFormatError("big-endian checkpoints are not supported")

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def _shard(self, shard_id: int) -> bytes:
        if shard_id not in self._shards:
            path = Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")
            if not path.is_file():
                raise CheckpointMissingError(f"checkpoint data shard {path} is missing")
            self._shards[shard_id] = path.read_bytes()
        return self._shards[shard_id]

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e.sliced:
            raise CheckpointFormatError(f"{name} is a partitioned variable, which this reader does not join")
        data = self._shard(e.shard_id)[e.offset:e.offset + e.size]
        if len(data) != e.size:
            raise CheckpointFormatError(f"{name}: its data shard is truncated")
        if e.crc32c is not None and masked_crc32c(data) != e.crc32c:
            raise CheckpointFormatError(f"{name}: its bytes fail the checkpoint's CRC-32C check; the .data "
                                        f"shard is corrupted, download or copy it again")
        if any(d < 0 for d in e.shape):
            raise CheckpointFormatError(f"{name}: negative dimension in its shape {e.shape}")
        count = int(np.prod(e.shape, dtype=object))
        if e.dtype == DT_BFLOAT16:
            if count * 2 != e.size:
                raise CheckpointFormatError(f"{name}: {e.size} bytes do not hold shape {e.shape} of bfloat16")
            bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(e.shape)
        if e.dtype not in DTYPES:
            raise CheckpointFormatError(f"{name} has TensorFlow dtype {e.dtype}, which this reader does not decode")
        dtype = np.dtype(DTYPES[e.dtype]).newbyteorder("<")
        if count * dtype.itemsize != e.size:
            raise CheckpointFormatError(f"{name}: {e.size} bytes do not hold shape {e.shape} of {dtype}")
        return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(e.shape)

    def close(self) -> None:
        self._shards.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def find_prefix(path: str | Path) -> str:
    """The checkpoint prefix for a prefix, an .index or .data-* file, or a folder holding one checkpoint."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.index"))
        if len(indexes) != 1:
            raise CheckpointFormatError(f"{p} holds {len(indexes)} checkpoint .index files; name one")
        return str(indexes[0])[: -len(".index")]
    name = str(p)
    if name.endswith(".index"):
        return name[: -len(".index")]
    if ".data-" in p.name:
        return name[: name.rindex(".data-")]
    if Path(name + ".index").is_file():
        return name
    raise CheckpointMissingError(f"{path} is not a TensorFlow checkpoint (no {name}.index); pass the prefix "
                            f"(model.ckpt), its .index file, its folder or the released .tgz")


def extract_checkpoint(archive: Path, folder: str | Path) -> None:
    """Copy the checkpoint files (.index, .data-*) of a tar archive into ``folder``, flat, by base name.

    Member sizes are checked as the archive is read, before a member is
    extracted: one over :data:`MAX_MEMBER_BYTES`, or all of them over
    :data:`MAX_ARCHIVE_BYTES`, is refused.
    """
    found, total = 0, 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:  # streamed: a huge member is refused before the ones after it are even read
                if not (m.isfile() and (m.name.endswith(".index") or ".data-" in m.name)):
                    continue
                total += m.size
                if m.size > MAX_MEMBER_BYTES or total > MAX_ARCHIVE_BYTES:
                    raise CheckpointFormatError(
                        f"{archive}: member {m.name} declares {m.size:,} bytes ({total:,} so far); a MobileNet "
                        f"checkpoint member is at most {MAX_MEMBER_BYTES:,} bytes, so it is not extracted")
                src = tar.extractfile(m)
                with open(Path(folder, Path(m.name).name), "wb") as dst:  # base name: nothing lands outside
                    shutil.copyfileobj(src, dst, 1 << 20)
                found += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CheckpointFormatError(f"cannot read {archive} as a tar archive: {e}") from None
    if not found:
        raise CheckpointFormatError(f"{archive} holds no checkpoint (.index and .data-* files)")


@contextlib.contextmanager
def open_checkpoint(path: str | Path):
    """A :class:`CheckpointReader` for any of the forms :func:`find_prefix` takes, or a released .tgz archive."""
    p = Path(path)
    if p.is_file() and (p.name.endswith((".tgz", ".tar.gz", ".tar"))):
        with tempfile.TemporaryDirectory() as tmp:
            extract_checkpoint(p, tmp)
            with CheckpointReader(find_prefix(tmp)) as reader:
                yield reader
        return
    with CheckpointReader(find_prefix(p)) as reader:
        yield reader
