"""The one cache folder: downloads, converted weights, measured backend choices, benchmark grids.

``$MOBILENETS_CACHE`` if set, else ``$XDG_CACHE_HOME/mobilenets``, else
``~/.cache/mobilenets`` (the XDG default), so it lives where the user's other
caches live.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here: writers create what they write)."""
    if os.environ.get("MOBILENETS_CACHE"):
        return Path(os.environ["MOBILENETS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mobilenets"
