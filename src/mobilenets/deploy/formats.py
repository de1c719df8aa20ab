"""``export`` and ``load_exported``: the folded model as a file for another runtime, the format named by its suffix.

========================  =======  ====================================================
format                    suffix   precisions
========================  =======  ====================================================
``onnx``                  .onnx    fp32, int8 (static QDQ, per-channel weights)
``openvino``              .xml     fp32, bf16 (the inference-precision hint), int8 (NNCF)
``torchscript``           .pt      fp32, bf16 (traced; no PT2E int8)
``exported-program``      .pt2     fp32, bf16, int8 (PT2E; load with torchao imported)
``tflite``                .tflite  fp32, int8 (full-integer, per-channel weights; LiteRT)
``executorch``            .pte     fp32, int8 (XNNPACK delegate; int8 with the int8-ready ranges)
``coreml``                .mlpackage  fp16 (default), fp32, int8 weights (a folder; Core ML, Apple only)
========================  =======  ====================================================

The batch dimension of every file is dynamic, except Core ML's and ExecuTorch's (one image a call, as
apps feed them; ``load_exported`` runs a batch image by image).
A format that no runtime here can run (Core ML) is checked instead: :func:`check_exported`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import metadata
from ..atomic import replacing
from ..model import MobileNetV1
from .backend import EXPORT_PRECISIONS, PRECISIONS, Run, export_formats
from .calibration import DEFAULT_RESOLUTION, as_input, calibration_batches
from ..folding import FoldedMobileNet, fold_batchnorm
from .prepare import carries_int8, folded_for
from .auto import expected
from ..progress import ON_A_TERMINAL, Progress, resolve
from .machine import DeployError

DEFAULT_FORMAT = "onnx"


def _suffixes() -> dict[str, str]:
    return {f.suffix: name for name, (_, f) in export_formats().items()}


def export_target(path, format: str | None = None) -> tuple[Path, str]:
    """(the path to write, its format): the format follows the suffix unless given, and the two must agree.

    No suffix: the format's suffix is added (``format`` default "onnx").
    """
    path, formats, suffixes = Path(path), export_formats(), _suffixes()
    suffix = path.suffix.lower()
    known = ", ".join(f"{s} ({n})" for s, n in suffixes.items())
    if format is None:
        if suffix and suffix not in suffixes:
            raise DeployError(f"cannot tell the format of {path.name} from its suffix {path.suffix!r}; "
                              f"name the file with one of {known}, or give the format (--format NAME; format= in "
                              f"Python), one of {tuple(formats)}")
        format = suffixes.get(suffix, DEFAULT_FORMAT)
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    expected = formats[format][1].suffix
    if not suffix:
        return path.with_suffix(expected), format
    if suffix != expected:
        if suffix in suffixes:  # another format's file name: the user meant one of the two
            raise DeployError(f"format {format!r} writes {expected} files, but {path.name} names a "
                              f"{suffixes[suffix]} file; write to {path.with_suffix(expected).name} "
                              f"or give --format {suffixes[suffix]} (format={suffixes[suffix]!r} in Python)")
        raise DeployError(f"format {format!r} writes {expected} files; write to {path.name + expected} "
                          f"instead of {path.name}")
    return path, format


def default_precision(format: str) -> str:
    """The precision ``format`` is written at when none is asked for (fp32; fp16 for Core ML)."""
    formats = export_formats()
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    return formats[format][1].default_precision


def check_export(format: str, precision: str) -> None:
    """Refuse, with what would work, a format or a precision the format cannot hold, or a missing runtime."""
    if precision not in EXPORT_PRECISIONS:
        raise DeployError(f"precision must be one of {EXPORT_PRECISIONS}, got {precision!r}")
    formats = export_formats()
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    backend, spec = formats[format]
    if precision not in spec.precisions:
        others = [name for name, (_, f) in formats.items() if precision in f.precisions]
        # the refusals speak of the compute precisions; fp16 is a precision of stored weights only
        why = spec.refusal if spec.refusal and precision in PRECISIONS else \
            f"{format} files hold {' or '.join(spec.precisions)}"
        where = f"{', '.join(others[:-1])} or {others[-1]}" if len(others) > 1 else others[0]
        raise DeployError(f"cannot export {precision} as {format}: {why}; export {precision} as {where}")
    if not backend.available():
        raise DeployError(f"format {format!r} needs {' and '.join(backend.requires)}, which is not installed: "
                          f"pip install 'mobilenets[{backend.extra}]'")


def export(model: MobileNetV1, path, format: str | None = None, *, precision: str | None = None, calibration=None,
           resolution: int | None = None, io: str | None = None, int8: str = "prepared",
           log=ON_A_TERMINAL) -> Path:
    """Write ``model`` (BatchNorm folded) for another runtime; returns the written path.

    ``format``: "onnx", "openvino", "torchscript", "exported-program",
    "tflite", "executorch" or "coreml"; by default the one ``path``'s suffix
    names (.onnx, .xml, .pt, .pt2, .tflite, .pte, .mlpackage), "onnx" for a
    path without one.  A suffix that names another format is refused.
    ``precision``: by default fp32 (fp16 for coreml).  int8 needs
    ``calibration`` batches, as for :func:`compile` (and ``int8`` chooses as
    there), except coreml's int8, which is weights only.  ``io`` ("int8",
    "uint8" or "float"; tflite int8 only) is the type of the file's input and
    output.  ``log(str)`` hears the progress (int8 preparation, the write; :mod:`mobilenets.progress`;
    by default stderr where it is a terminal; None: silent).
    """
    log = resolve(log)
    path, format = export_target(path, format)
    precision = default_precision(format) if precision is None else precision
    check_export(format, precision)
    spec = export_formats()[format][1]
    options = {}
    if io is not None:
        if "io" not in spec.options:
            raise DeployError(f"io= applies to tflite files; {format} files have no choice of input and output type")
        options["io"] = io
    if "metadata" in spec.options:
        options["metadata"] = _metadata(model)
    ranges = _stored_ranges(model) if precision == "int8" and "ranges" in spec.options else None
    if ranges is not None:
        options["ranges"] = ranges
    resolution = DEFAULT_RESOLUTION if resolution is None else int(resolution)
    if precision == "int8" and spec.weights_only_int8:
        batches, folded = [], weights_only_int8(model, calibration, resolution, int8)
    else:
        # weights from mobilenets quantize (their ranges in the file) or an imported quantized file need no
        # calibration images, as in compile; images given are used
        brings = ranges is not None or carries_int8(model, precision, int8)
        int8_needs_batches = precision == "int8" and not (brings and calibration is None)
        batches = calibration_batches(calibration, resolution) if int8_needs_batches else []
        if ranges is not None and not batches:  # an imported quantized file: its own ranges, as they are
            folded = fold_batchnorm(model)
        else:
            folded = folded_for(model, precision, batches, int8=int8, log=log, here=False)
    backend, _ = export_formats()[format]
    # every runtime writes a temporary path beside the target: a failed write keeps the old file whole
    with replacing(path, companions=spec.companions) as partial, \
            Progress(f"export: writing {format} {precision}", expected(backend.name, precision)[0], log,
                     expected=True):
        backend.save(folded, partial, format, precision, batches, resolution, **options)
    return path


def weights_only_int8(model: MobileNetV1, calibration, resolution: int, int8: str = "prepared") -> FoldedMobileNet:
    """The float graph whose weights a weights-only int8 file (Core ML) quantizes.

    ``int8="prepared"``: the int8-ready graph (:mod:`mobilenets.quantize`: equalized, bias-corrected), from
    the model's own int8 data, else prepared on ``calibration``; "plain": the folded weights as they are.
    """
    needs_batches = int8 == "prepared" and not carries_int8(model, "int8", int8)
    batches = calibration_batches(calibration, resolution) if needs_batches else []
    return folded_for(model, "int8", batches, int8=int8, here=False)


def _stored_ranges(model: MobileNetV1) -> dict | None:
    """The activation ranges a model's file carries (an imported quantized .tflite), if they apply as they are.

    Ranges stored with equalization scales other than 1 belong to a rescaled
    model (mobilenets.quantize), not to ``model`` itself: those are not used here.
    """
    int8 = metadata.of(model).int8 or {}
    if not int8.get("ranges") or any(v != 1.0 for s in int8.get("scales", []) for v in s):
        return None
    return int8["ranges"]


def _metadata(model: MobileNetV1) -> dict:
    """What a runtime's user needs beside the graph: width, normalization, class labels."""
    meta = metadata.of(model).to_dict()
    out = {"model": "mobilenet_v1", "alpha": model.config.alpha, "num_classes": model.config.num_classes,
           "padding": model.config.padding}
    for key in ("normalization", "labels", "source"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    return out


def _format_of(path: Path, format: str | None) -> str:
    if not path.exists():  # a file, or a folder for Core ML's .mlpackage
        raise FileNotFoundError(f"{path} does not exist")
    formats = export_formats()
    if format is None:
        format = _suffixes().get(path.suffix.lower())
        if format is None:
            raise DeployError(f"cannot tell the format of {path}; name one of {tuple(formats)}")
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    return format


def load_exported(path, format: str | None = None) -> Run:
    """Open an exported file in its own runtime; returns ``run(x) -> float32 logits`` for (N, 3, H, W) input.

    A format no runtime here can run (Core ML) is refused: :func:`check_exported` checks it instead.
    """
    path = Path(path)
    format = _format_of(path, format)
    backend, _ = export_formats()[format]
    return backend.load(path, format)


def runs_here(format: str) -> bool:
    """Whether a runtime on this machine runs ``format``'s files (all but Core ML's)."""
    formats = export_formats()
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    return formats[format][1].runs_here


def check_exported(model: MobileNetV1, path, format: str | None = None, *, precision: str | None = None,
                   calibration=None, int8: str = "prepared", images=None, logits=None, labels=None) -> dict:
    """A file no runtime here can run (Core ML's .mlpackage), read back and compared with ``model``.

    Returns a report (``executed`` is False); raises :class:`DeployError` where
    the file does not hold ``model`` at ``precision`` (default: the one it
    holds).  For an int8 file of a model that is not int8-ready, pass the
    ``calibration`` (and ``int8``) it was exported with: its weights are
    prepared again from them.  With ``images`` ((N, 3, H, W), preprocessed),
    ``reference_evaluation`` is the parity of the file's program, computed op
    by op in PyTorch, with ``logits`` (default: ``model``'s on ``images``;
    ``labels`` adds accuracy).
    """
    path = Path(path)
    format = _format_of(path, format)
    backend, spec = export_formats()[format]
    if spec.runs_here:
        raise DeployError(f"{format} files run here: load_exported(path) and compare with parity()")

    def reference(stored: str, resolution: int) -> FoldedMobileNet:
        if stored == "int8" and spec.weights_only_int8:
            return weights_only_int8(model, calibration, resolution, int8)
        return fold_batchnorm(model)

    x = None
    if images is not None:
        x = as_input(images)
        if logits is None:
            with torch.no_grad():
                logits = fold_batchnorm(model)(x)
    return backend.check(path, format, reference, _metadata(model), precision=precision, images=x, logits=logits,
                         labels=labels)
