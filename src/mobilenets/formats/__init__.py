"""The binary formats other tools write, read (and for LiteRT written) without their libraries.

``protobuf``: the wire format of protocol buffers; ``tensorflow``: TensorFlow's
tensor messages on it (dtypes, ``TensorShapeProto``, ``TensorProto``);
``sstable``: LevelDB's table format (TensorFlow checkpoint indexes), with
snappy and CRC-32C; ``tflite_schema``: the LiteRT flatbuffer.  The converters
in :mod:`mobilenets.weights` and the LiteRT backend sit on top of these.
Every reader checks lengths against its buffer before slicing, and reports a
fault as :class:`FormatError` for its caller to name the file.
"""

from __future__ import annotations

from ..errors import MobilenetsError


class FormatError(MobilenetsError):
    """Bytes that do not follow their format; the caller names the file and says what would work."""
