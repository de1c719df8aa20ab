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
========================  =======  ====================================================

The batch dimension of every file is dynamic.
"""

from __future__ import annotations

from pathlib import Path

from ..model import MobileNetV1
from .backend import Run, check_precision, export_formats
from .calibration import DEFAULT_RESOLUTION, calibration_batches
from ..folding import fold_batchnorm
from .prepare import folded_for, single_clip
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
                              f"name the file with one of {known}, or pass format=")
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
                              f"or pass format={suffixes[suffix]!r}")
        raise DeployError(f"format {format!r} writes {expected} files; write to {path.name + expected} "
                          f"instead of {path.name}")
    return path, format


def check_export(format: str, precision: str) -> None:
    """Refuse, with what would work, a format or a precision the format cannot hold."""
    check_precision(precision)
    formats = export_formats()
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    spec = formats[format][1]
    if precision not in spec.precisions:
        others = [name for name, (_, f) in formats.items() if precision in f.precisions]
        raise DeployError(f"cannot export {precision} as {format}: {spec.refusal}; export {precision} as "
                          f"{', '.join(others[:-1])} or {others[-1]}")


def export(model: MobileNetV1, path, format: str | None = None, *, precision: str = "fp32", calibration=None,
           resolution: int | None = None, io: str | None = None, int8: str = "prepared") -> Path:
    """Write ``model`` (BatchNorm folded) for another runtime; returns the written path.

    ``format``: "onnx", "openvino", "torchscript", "exported-program",
    "tflite" or "executorch"; by default the one ``path``'s suffix names
    (.onnx, .xml, .pt, .pt2, .tflite, .pte), "onnx" for a path without one.  A suffix that names another
    format is refused.  int8 needs ``calibration`` batches, as for
    :func:`compile` (and ``int8`` chooses as there).  ``io`` ("int8", "uint8"
    or "float"; tflite int8 only) is the type of the file's input and output.
    """
    check_precision(precision)
    path, format = export_target(path, format)
    check_export(format, precision)
    spec = export_formats()[format][1]
    options = {}
    if io is not None:
        if "io" not in spec.options:
            raise DeployError(f"io= applies to tflite files; {format} files have float input and output")
        options["io"] = io
    if "metadata" in spec.options:
        options["metadata"] = _metadata(model)
    ranges = _stored_ranges(model) if precision == "int8" and "ranges" in spec.options else None
    if ranges is not None:
        options["ranges"] = ranges
    resolution = DEFAULT_RESOLUTION if resolution is None else int(resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    int8_needs_batches = precision == "int8" and not (ranges is not None and calibration is None)
    batches = calibration_batches(calibration, resolution) if int8_needs_batches else []
    if ranges is not None and not batches:  # an imported quantized file: its own ranges, as they are
        folded = fold_batchnorm(model)
    else:
        folded = folded_for(model, precision, batches, int8=int8)
        if "ranges" in spec.options:  # the tflite writer takes one clip per layer: bias correction, no equalization
            folded = single_clip(folded)
    backend, _ = export_formats()[format]
    return backend.save(folded, path, format, precision, batches, resolution, **options)


def _stored_ranges(model: MobileNetV1) -> dict | None:
    """The activation ranges a model's file carries (an imported quantized .tflite), if they apply as they are.

    Ranges stored with equalization scales other than 1 belong to a rescaled
    model (mobilenets.quantize), not to ``model`` itself: those are not used here.
    """
    int8 = (getattr(model, "meta", None) or {}).get("int8") or {}
    if not int8.get("ranges") or any(v != 1.0 for s in int8.get("scales", []) for v in s):
        return None
    return int8["ranges"]


def _metadata(model: MobileNetV1) -> dict:
    """What a runtime's user needs beside the graph: width, normalization, class labels."""
    meta = getattr(model, "meta", None) or {}
    out = {"model": "mobilenet_v1", "alpha": model.config.alpha, "num_classes": model.config.num_classes,
           "padding": model.config.padding}
    for key in ("normalization", "labels", "source"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    return out


def load_exported(path, format: str | None = None) -> Run:
    """Open an exported file in its own runtime; returns ``run(x) -> float32 logits`` for (N, 3, H, W) input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    formats = export_formats()
    if format is None:
        format = _suffixes().get(path.suffix.lower())
        if format is None:
            raise DeployError(f"cannot tell the format of {path}; name one of {tuple(formats)}")
    if format not in formats:
        raise DeployError(f"format must be one of {tuple(formats)}, got {format!r}")
    backend, _ = formats[format]
    return backend.load(path, format)

