"""MobileNet v1 (Howard et al., 2017): any width alpha and resolution, with its exact cost.

Names are imported on first use (PEP 562), so ``import mobilenets`` and the
CLI start without loading PyTorch; the CLI must set OpenMP's wait policy
before PyTorch's runtime starts.  For the same reason timm is never imported
here: :mod:`mobilenets.timm` registers the family in timm's model registry
when timm itself is imported, in either order (see
:func:`register_when_timm_is_imported`).
"""

from __future__ import annotations

import importlib
import sys
import warnings

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
               "timm",
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


def _register_in_timm() -> None:
    try:
        importlib.import_module(".timm", __name__)
    except Exception as e:  # a timm we cannot register with must not break the user's own `import timm`
        warnings.warn(f"mobilenets could not register its models with timm {getattr(sys.modules.get('timm'), '__version__', '')}: "
                      f"{type(e).__name__}: {e}", stacklevel=2)


class _AfterTimmImport:
    """A meta path finder that finds nothing itself: when ``timm`` is about to be imported, it wraps timm's
    loader to register us after it.  (Neither ``importlib.abc`` nor ``importlib.util`` is imported: the first
    costs 60 ms.)"""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # once; the other finders give the real spec
        spec = next((s for f in sys.meta_path if hasattr(f, "find_spec")
                     for s in (f.find_spec(name, path, target),) if s is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_in_timm()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_timm_is_imported() -> None:
    """Register the family in timm's registry now if timm is loaded, else right after ``import timm``.

    Costs nothing when timm is never imported: only a finder that waits for
    the name ``timm`` is added to ``sys.meta_path``.
    """
    if "timm" in sys.modules:
        _register_in_timm()
    elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimmImport())


register_when_timm_is_imported()
