"""The one interface every runtime implements, and the registry of runtimes.

A backend turns the folded float model (:class:`~.folding.FoldedMobileNet`)
into a ``run(x) -> logits`` callable for one precision, batch size and
resolution, and, where its runtime has a file format, writes and reads that
file.  Adding a runtime is one module defining a :class:`Backend` instance
named ``BACKEND`` and one line in :data:`RUNTIMES`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .machine import DeployError

PRECISIONS = ("fp32", "bf16", "int8")
# what export writes: the precisions above, and fp16 weights (Core ML's default)
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# name users pass as backend= -> the module of this package that defines its BACKEND
RUNTIMES = {
    "torch": "pytorch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "litert": "litert",
    "executorch": "executorch",
    "coreml": "coreml",
}
BACKENDS = tuple(RUNTIMES)
# what compile(backend=) takes: a runtime, or "auto" for the fastest measured here
COMPILE_BACKENDS = ("auto", *BACKENDS)
# what a caller serving from this process (predict, ray_predict) may run by name: the eager model, the fastest
# measured here ("auto"), and the runtimes that serve from a Python process (LiteRT's and ExecuTorch's files
# are for devices; Core ML does not run here). Here, not in predict, so that the CLI reads it without PyTorch.
SERVE_BACKENDS = ("eager", "auto", "torch", "onnxruntime", "openvino")

if TYPE_CHECKING:  # imported where used: the registries above are read without PyTorch (the CLI's choices)
    import torch

Run = Callable[["torch.Tensor"], "torch.Tensor"]

MAX_BATCH = 4096  # upper bound of the dynamic batch dimension of saved files


def batch_dim():
    """The dynamic batch dimension of every saved graph (torch.export / ONNX)."""
    import torch

    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


@dataclass(frozen=True)
class ExportFormat:
    """A file format a backend writes: its name, file suffix, the precisions it holds and why not the others.

    ``runs_here``: False for a format no runtime on this machine can run (Core
    ML): its backend's :meth:`Backend.check` inspects the file instead.
    ``weights_only_int8``: its int8 quantizes the weights only (activations stay
    float), so an int8-ready model (mobilenets.quantize) needs no calibration.
    """

    name: str
    suffix: str
    precisions: tuple[str, ...]
    refusal: str = ""
    options: tuple[str, ...] = ()  # keyword options its backend's save() takes beyond the common ones
    default_precision: str = "fp32"
    runs_here: bool = True
    weights_only_int8: bool = False
    companions: tuple[str, ...] = ()  # suffixes of the files written beside the named one (OpenVINO's .bin)


class Backend:
    """One runtime.  Subclasses set the attributes and implement :meth:`build` (and :meth:`save`/:meth:`load`).

    ``build`` gets a ``workdir`` for intermediate files, removed as soon as it
    returns: what the returned ``run`` needs must be held in memory.
    """

    name: str = ""
    precisions: tuple[str, ...] = PRECISIONS
    refusal: str = ""  # why a precision outside ``precisions`` cannot run here
    requires: tuple[str, ...] = ()  # modules that must import for this runtime to be available
    extra: str = "deploy"  # the extra of mobilenets that installs them
    formats: tuple[ExportFormat, ...] = ()
    # False: its files are timed in a fresh process (:mod:`.isolated`), away from what this process has run
    shares_process: bool = True
    # False: backend="auto" does not build it (too slow to build on every choice); named, it builds
    tried_by_auto: bool = True

    def installed(self) -> bool:
        """Whether the packages it requires are installed, found without importing them: auto asks this of every
        runtime it might time (importing ONNX Runtime, OpenVINO and LiteRT took 1.9 s of each predict's set-up)
        and imports only what it builds; a runtime that then fails to import is skipped with a warning there."""
        return all(importlib.util.find_spec(module.split(".")[0]) is not None for module in self.requires)

    def available(self) -> bool:
        try:
            for module in self.requires:
                importlib.import_module(module)
        except ImportError:
            return False
        return True

    def describe(self, precision: str) -> str:
        """How this runtime runs ``precision``, in a few words (shown in benchmark tables)."""
        return self.name

    def needs_calibration(self, folded, precision: str) -> bool:
        """Whether building ``folded`` at ``precision`` needs calibration batches: int8 measures its activation
        ranges on them, unless the graph is int8-ready (:mod:`mobilenets.quantize`) and brings its own."""
        return precision == "int8" and folded.int8_ready is None

    def build(self, folded, precision: str, batches: list[torch.Tensor], batch_size: int, resolution: int,
              workdir: Path) -> Run:
        """A callable taking a (batch_size, 3, resolution, resolution) float32 tensor, returning float32 logits.

        ``batches`` are the int8 calibration rows, already in batches of ``batch_size`` (empty otherwise).
        """
        raise NotImplementedError

    def save(self, folded, path: Path, format: str, precision: str, batches: list[torch.Tensor],
             resolution: int, **options) -> Path:
        """Write ``folded`` at ``precision`` as ``format`` (one of ``formats``), batch dimension dynamic.

        ``path`` is a temporary name beside the target (:func:`mobilenets.atomic.replacing`), renamed into
        place once this returns; write to it directly.

        ``options`` are those the format lists in :attr:`ExportFormat.options`.
        """
        raise NotImplementedError(f"backend {self.name!r} writes no files")

    def load(self, path: Path, format: str) -> Run:
        """Open a file :meth:`save` wrote; returns ``run(x) -> float32 logits`` for (N, 3, H, W) float32 input."""
        raise NotImplementedError(f"backend {self.name!r} reads no files")

    def check(self, path: Path, format: str, reference: Callable[[str, int], object], metadata: dict, *,
              precision: str | None = None, images: torch.Tensor | None = None, logits: torch.Tensor | None = None,
              labels=None) -> dict:
        """For a format that does not run here: the file read back and compared with the model; a report dict.

        ``reference(precision, resolution)`` is the folded graph that export
        wrote at the file's precision; ``logits`` are the model's on ``images``.
        Raises :class:`DeployError` where the file does not hold the model.
        """
        raise NotImplementedError(f"backend {self.name!r} runs its files: load them")


@functools.cache
def get(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in RUNTIMES:
        raise DeployError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return importlib.import_module(f"{__package__}.{RUNTIMES[name]}").BACKEND


def available_backends() -> list[str]:
    """The backends importable here, in registry order (torch first)."""
    return [name for name in BACKENDS if get(name).available()]


def backend_supports(name: str, precision: str) -> bool:
    return precision in get(name).precisions


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DeployError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_backend(name: str, precision: str) -> None:
    """Refuse, with what would work, a backend that is unknown, not installed, or cannot run ``precision``."""
    if name == "auto":
        return
    backend = get(name)
    if not backend.available():
        raise DeployError(f"backend {name!r} is not installed; pip install 'mobilenets[{backend.extra}]' "
                          f"(or pip install {' '.join(backend.requires)}), or use one of {available_backends()}")
    if precision not in backend.precisions:
        others = [b for b in BACKENDS if backend_supports(b, precision)]
        raise DeployError(f"{backend.refusal}; for {precision} use backend " + " or ".join(map(repr, others)))


def check_calibration(name: str, folded, precision: str, batches: list[torch.Tensor]) -> None:
    """Refuse, with what would work, to build ``name`` without the calibration batches it needs."""
    if batches or not get(name).needs_calibration(folded, precision):
        return
    others = [b for b in available_backends()
              if backend_supports(b, precision) and not get(b).needs_calibration(folded, precision)]
    instead = f", or use backend {' or '.join(map(repr, others))}, which use the model's own int8 ranges" if others else ""
    raise DeployError(f"backend {name!r} measures {precision} activation ranges on calibration images: pass "
                      f"calibration= batches of preprocessed images{instead}")


def build(name: str, folded, precision: str, batches: list[torch.Tensor], batch_size: int, resolution: int) -> Run:
    """``get(name).build(...)`` in a temporary folder that is removed before this returns."""
    with tempfile.TemporaryDirectory(prefix="mobilenets-deploy-") as workdir:
        return get(name).build(folded, precision, batches, batch_size, resolution, Path(workdir))


def export_formats() -> dict[str, tuple[Backend, ExportFormat]]:
    """Every format some backend writes: name -> (backend, format)."""
    return {f.name: (get(name), f) for name in BACKENDS for f in get(name).formats}
