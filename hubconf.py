"""torch.hub entry points: ``torch.hub.load("<owner>/mobilenets", "mobilenet_v1", alpha=0.5, weights="imagenet")``.

The package lives under src/, so the checkout's src is put on the import path
when the repository is loaded as a hub repository.
"""

import sys
from pathlib import Path

dependencies = ["torch"]

_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from mobilenets.builders import mobilenet_v1  # noqa: E402  (after the path is set)

__all__ = ["mobilenet_v1"]
