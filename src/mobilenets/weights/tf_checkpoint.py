"""Reading TensorFlow (V2) checkpoints without TensorFlow.

A checkpoint ``model.ckpt`` is ``model.ckpt.index`` plus shards
``model.ckpt.data-00000-of-00001``.  The index is an SSTable (LevelDB's table
format): data blocks of prefix-compressed key/value entries, an index block
that points at them and a 48-byte footer.  Key ``""`` holds a
``BundleHeaderProto`` (shard count, endianness); every other key is a
variable name whose value is a ``BundleEntryProto`` (dtype, shape, shard,
offset, size, masked CRC-32C) locating the variable's raw little-endian
bytes in its shard; every tensor read is checked against its CRC.
Both protos are decoded here, on :mod:`mobilenets.formats` (the protobuf wire
format, TensorFlow's shapes and dtypes, the SSTable reader), so converting the
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
from ..formats import FormatError
from ..formats.protobuf import I32, LEN, VARINT, expect, fields
from ..formats.sstable import masked_crc32c, table_entries
from ..formats.tensorflow import DT_BFLOAT16, DTYPES, tensor_shape
from .archive import check_inflation

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


# ---------------------------------------------------------------- the bundle's messages


# BundleEntryProto: dtype, shape, shard_id, offset, size, crc32c (fixed32), slices
_ENTRY_WIRES = {1: VARINT, 2: LEN, 3: VARINT, 4: VARINT, 5: VARINT, 6: I32, 7: LEN}


def _parse_entry(name: str, buf: bytes) -> Entry:
    dtype = shard_id = offset = size = 0
    shape: tuple[int, ...] | None = ()
    sliced = False
    crc = None
    for field, wire, value in fields(buf):
        if field in _ENTRY_WIRES:
            expect(field, wire, _ENTRY_WIRES[field])
        if field == 1:
            dtype = value
        elif field == 2:
            shape = tensor_shape(value)
            if shape is None:
                raise CheckpointFormatError("a tensor of unknown rank")
        elif field == 3:
            shard_id = value
        elif field == 4:
            offset = value
        elif field == 5:
            size = value
        elif field == 6:
            crc = int.from_bytes(value, "little")
        elif field == 7:
            sliced = True
    return Entry(name, dtype, shape, shard_id, offset, size, sliced, crc)


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
            for key, value in table_entries(index.read_bytes()):
                if key == b"":
                    self._header(value)
                else:
                    name = key.decode("utf8")
                    self.entries[name] = _parse_entry(name, value)
        except (IndexError, TypeError, UnicodeDecodeError) as e:  # a damaged index: offsets past a block, bad names
            raise CheckpointFormatError(f"{index} is not a readable TensorFlow checkpoint index: {e}") from None
        except (CheckpointFormatError, FormatError) as e:
            raise CheckpointFormatError(f"{index} is not a readable TensorFlow checkpoint index: {e}") from None
        self._shards: dict[int, bytes] = {}

    def _header(self, value: bytes) -> None:
        for field, wire, v in fields(value):
            if field in (1, 2):
                expect(field, wire, VARINT)
            if field == 1:
                self.num_shards = v
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
                check_inflation(archive, f"its checkpoint members up to {m.name}", total, CheckpointFormatError)
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
