"""Release archives (``.tgz``) are bounded by what the archive is, not by what its members claim.

Deflate barely packs trained weights: the real 17 MB frozen MobileNet v1 graph
gzips at 1.08 to 1, float32 weights and quantized bytes alike look random to
it.  A member that would inflate to more than :data:`MAX_INFLATION` times the
archive's own size (plus :data:`INFLATION_SLACK` for small files, whose
headers and names pack well) is therefore zeros, not weights: a 262 KB archive
whose graph inflates to 250 MB of padding is refused from its tar header,
before a byte of the member is read.  Every reader of a release archive
(checkpoint, frozen graph, .tflite) checks its members here.
"""

from __future__ import annotations

from pathlib import Path

from .layout import WeightsError

MAX_INFLATION = 16
INFLATION_SLACK = 1 << 20


def inflation_limit(archive: Path) -> int:
    """The most bytes the members read from ``archive`` may hold together."""
    return Path(archive).stat().st_size * MAX_INFLATION + INFLATION_SLACK


def check_inflation(archive: Path, what: str, size: int, error: type[Exception] = WeightsError) -> None:
    """Refuse ``size`` bytes of members (``what`` names them) from ``archive`` if they cannot be weights."""
    limit = inflation_limit(archive)
    if size > limit:
        packed = Path(archive).stat().st_size
        raise error(f"{archive}: {what} would inflate to {size:,} bytes from {packed:,} bytes of archive, more "
                    f"than {MAX_INFLATION} times (weights hardly compress), so it is not read; extract the "
                    f"model file yourself if you trust it")
