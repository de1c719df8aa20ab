"""``mobilenets export`` as one function: write a model for another runtime, then check the file against PyTorch.

:func:`export_and_check` picks the format (from the file's suffix unless
given) and refuses what cannot work before any model is loaded or fitted,
then reads calibration images, writes the file and compares its logits with
the float PyTorch model's: run in its runtime here, or, for a format no
runtime here runs (Core ML), read back and checked (:func:`deploy.check_exported`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import deploy, quantize
from .errors import MobilenetsError
from .benchmark import model_for

# An int8 file that keeps fewer of the float model's top-1 answers than this is still written, with a warning:
# the user decides, but must not mistake it for the float model.
INT8_AGREEMENT_WARNING = 0.95


def calibration(model, resolution: int, normalization, labels, *, calib_data=None, calib_images: int = 64,
                precision: str = "fp32", seeded: bool = False):
    """(batches, labels or None): images of ``calib_data`` (a folder), else the built-in digits.

    A folder laid out as DIR/<class>/* with the model's class names gives labels, so accuracy can be reported;
    the digits are labelled when the model has 10 classes.  int8 of weights not made for the digits (not
    ``seeded`` on them, not labelled 0-9) and not int8-ready is refused without ``calib_data``: ranges measured
    on digits fit digits, not the images the weights were made for.
    """
    if calib_data:
        batches, paths = deploy.image_batches(calib_data, resolution, normalization=normalization, limit=calib_images)
        names = [Path(p).parent.name for p in paths]
        y = [labels.index(n) for n in names] if labels and all(n in labels for n in names) else None
        return batches, y
    made_for_digits = seeded or labels == [str(d) for d in range(10)]
    if precision == "int8" and not made_for_digits and quantize.from_model(model) is None:
        raise MobilenetsError("--precision int8 needs --calib-data DIR, a folder of images like the model's inputs "
                              "(int8 measures its ranges on them; these weights were not made for the built-in "
                              "digits), or weights made int8-ready by 'mobilenets quantize'")
    batches, y = deploy.builtin_batches(resolution, normalization=normalization, limit=calib_images)
    return batches, y if model.config.num_classes == 10 else None


def export_and_check(out, *, format: str | None = None, precision: str | None = None, weights=None,
                     checkpoint=None, alpha: float = 1.0, resolution: int | None = None, io: str | None = None,
                     calib_data=None, calib_images: int = 64, warn=None, log=None) -> dict:
    """Write the model of ``weights`` / ``checkpoint`` (else a seeded ``alpha`` model) to ``out`` and check it.

    Returns the report: ``path``, ``format``, ``precision``, ``resolution`` and the parity with PyTorch fp32 on
    the calibration images (:func:`deploy.parity`); for a format that does not run here, what
    :func:`deploy.check_exported` checked, with ``why`` it was not run.  ``warn(str)`` hears when an int8 file
    keeps under :data:`INT8_AGREEMENT_WARNING` of the float model's top-1 answers.
    """
    out, fmt = deploy.export_target(out, format)
    precision = precision or deploy.default_precision(fmt)
    deploy.check_export(fmt, precision)  # before anything is loaded or fitted
    model, res, normalization, labels = model_for(weights=weights, checkpoint=checkpoint, alpha=alpha,
                                                  resolution=resolution)
    batches, y = calibration(model, res, normalization, labels, calib_data=calib_data, calib_images=calib_images,
                             precision=precision, seeded=not (weights or checkpoint))
    x = torch.cat(batches)
    with torch.no_grad():
        reference = model.eval()(x)
    if not deploy.runs_here(fmt):  # Core ML: written, then checked here, not run
        spec = deploy.export_formats()[fmt][1]
        if precision == "int8" and spec.weights_only_int8 and quantize.from_model(model) is None:
            # prepared once, for the file and for its check, which compares it with these int8-ready weights
            model = quantize.to_model(quantize.prepare_int8(model, batches), model)
        path = deploy.export(model, out, fmt, precision=precision, resolution=res, io=io, log=log)
        return deploy.check_exported(model, path, fmt, precision=precision, images=x, logits=reference, labels=y)
    path = deploy.export(model, out, fmt, precision=precision, calibration=batches, resolution=res, io=io,
                         log=log)
    run = deploy.load_exported(path, fmt)
    report = {"path": str(path), "format": fmt, "precision": precision, "resolution": res,
              **deploy.parity(reference, run(x), y)}
    if precision == "int8" and report["top1_agreement"] < INT8_AGREEMENT_WARNING and warn is not None:
        warn(f"the int8 file keeps only {100 * report['top1_agreement']:.1f}% of the float model's top-1 answers "
             f"on the {report['images']} calibration images (under {100 * INT8_AGREEMENT_WARNING:.0f}%); calibrate "
             f"on more images like your inputs (--calib-data), or prepare the weights with 'mobilenets quantize'")
    return report
