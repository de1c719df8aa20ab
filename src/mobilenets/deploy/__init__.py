"""Fast CPU inference: BatchNorm folding, compiled PyTorch, int8, export, and the optional runtimes.

``compile(model, precision, calibration, batch_size, resolution, backend)``
returns a :class:`Predictor`: call it with a preprocessed ``(N, 3, H, W)``
float tensor or array and it returns ``(N, classes)`` float32 logits.
``export(model, path)`` writes the model for another runtime (the format
follows the file's suffix), ``load_exported(path)`` runs such a file, and
``parity(reference, logits)`` says how close two sets of logits are (top-1
agreement, cosine, mean KL in nats).

Backends, one module each behind :class:`~.backend.Backend`:

- ``"torch"`` (:mod:`.pytorch`): Inductor with freezing (oneDNN convolutions,
  ReLU6 fused), bf16, PT2E int8 through torchao.
- ``"onnxruntime"`` (:mod:`.onnxruntime`, extra ``deploy``): fp32 and static
  QDQ int8.
- ``"openvino"`` (:mod:`.openvino`, extra ``deploy``): fp32/bf16 and NNCF int8.
- ``"coreml"`` (:mod:`.coreml`, extra ``coreml``): ``.mlpackage`` export only (fp16, fp32, int8
  weights); Core ML runs only on Apple platforms, so :func:`check_exported` checks the package here.
- ``"auto"`` (:mod:`.auto`): times each available backend once and caches
  the fastest in ``mobilenets.cache.cache_dir()``.

What a build exports is kept there too (:mod:`.artifacts`), so the same model is exported once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names _EXPORTS gives, for type checkers and the API reference (tests/test_structure.py: the same)
    from ..folding import FoldedConv, FoldedMobileNet, FoldingError, fold_batchnorm
    from .auto import interleaved, time_run
    from .backend import Backend, available_backends, backend_supports, export_formats
    from .calibration import builtin_batches, calibration_batches, image_batches, rebatch
    from .fidelity import parity
    from .formats import (check_export, check_exported, default_precision, export, export_target, load_exported,
                          runs_here)
    from .machine import DeployError, bf16_supported, cpu_flags, cpu_name
    from .predictor import Predictor, compile
    from .prepare import quantize_file

    EXPORT_FORMATS: tuple[str, ...]

# public name -> module of this package that defines it; imported on first use (PEP 562), so that reading
# the registries below (the CLI's choices) does not import PyTorch and the runtimes
_EXPORTS = {
    "interleaved": "auto", "time_run": "auto",
    "Backend": "backend", "available_backends": "backend", "backend_supports": "backend",
    "export_formats": "backend",
    "builtin_batches": "calibration", "calibration_batches": "calibration", "image_batches": "calibration",
    "rebatch": "calibration",
    "parity": "fidelity",
    "FoldedConv": "..folding", "FoldedMobileNet": "..folding", "FoldingError": "..folding",
    "fold_batchnorm": "..folding",
    "check_export": "formats", "check_exported": "formats", "default_precision": "formats", "export": "formats",
    "export_target": "formats", "load_exported": "formats", "runs_here": "formats",
    "DeployError": "machine", "bf16_supported": "machine", "cpu_flags": "machine", "cpu_name": "machine",
    "Predictor": "predictor", "compile": "predictor",
    "quantize_file": "prepare",
}
from .backend import BACKENDS, COMPILE_BACKENDS, EXPORT_PRECISIONS, PRECISIONS, SERVE_BACKENDS  # noqa: E402  (no PyTorch)

__all__ = [
    "BACKENDS", "COMPILE_BACKENDS", "EXPORT_FORMATS", "EXPORT_PRECISIONS", "PRECISIONS", "SERVE_BACKENDS", "Backend", "DeployError",
    "Predictor",
    "available_backends", "backend_supports", "bf16_supported", "builtin_batches", "calibration_batches",
    "check_export", "check_exported", "compile", "cpu_flags", "cpu_name", "default_precision", "export",
    "export_target", "fold_batchnorm", "image_batches", "interleaved", "load_exported", "parity", "quantize_file",
    "rebatch", "runs_here", "time_run",
]


def __getattr__(name: str):
    if name == "EXPORT_FORMATS":  # the formats each runtime's module declares: importing them all
        value = tuple(importlib.import_module(".backend", __name__).export_formats())
    elif name in _EXPORTS:
        where = _EXPORTS[name]  # "auto": this package's; "..folding": mobilenets'
        value = getattr(importlib.import_module(where if where.startswith(".") else f".{where}", __name__), name)
    else:
        try:  # a submodule: deploy.auto, deploy.litert, ...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | {"EXPORT_FORMATS"})
