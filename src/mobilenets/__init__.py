"""MobileNet v1 (Howard et al., 2017): any width alpha and resolution, with its exact cost.

Names are imported on first use (PEP 562), so ``import mobilenets`` and the
CLI start without loading PyTorch; the CLI must set OpenMP's wait policy
before PyTorch's runtime starts.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# imported now, not on first use: the function ``cost`` shares its module's name, and importing the module
# later (any ``from .cost import ...``) would replace the package's ``cost`` with the module
from .cost import cost, measure  # noqa: E402  (no torch: the cost model is plain Python)

# public name -> module that defines it
_EXPORTS = {
    "CONV_DEFS": "architecture", "body": "architecture", "depth": "architecture",
    "MobileNetV1": "model", "MobileNetV1Config": "model",
    "load": "builders", "mobilenet_v1": "builders", "save": "builders",
    "MobilenetsError": "errors",
}
_SUBMODULES = {"architecture", "benchmark", "builders", "cache", "checkpoint", "cli", "cost", "data", "deploy",
               "errors", "evaluate", "images", "labels", "model", "models", "paper", "pick", "pipeline", "predict",
               "train", "weights"}

__all__ = sorted([*_EXPORTS, "cost", "measure"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mobilenets' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
