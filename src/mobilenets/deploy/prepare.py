"""The folded float graph a backend builds from: for int8, the int8-ready one (:mod:`mobilenets.quantize`).

int8 is prepared once here, on the folded PyTorch model, so every int8 backend and export gets it:
weights from ``mobilenets quantize`` (``model.meta.int8``) are used as they are; otherwise
:func:`quantize.prepare_int8` runs on the calibration batches (equalization, bias correction, ranges
chosen by error). ``int8="plain"`` keeps each runtime's own post-training quantization of the
unadjusted model, for comparison: on the real ImageNet weights it keeps only about 72-75% of the float
model's top-1 answers (benchmarks/int8_fidelity.py).

The int8 weights' grid follows where the graph will run.  Built for this CPU (compile, predict), an x86 CPU
without VNNI gets 7-bit weights ([-64, 64], :func:`.machine.int8_weight_qmax`): its runtimes' u8 x s8 kernels
add pairs of products into saturating int16, and full-range weights kept 34-43% of the float answers there.
Exports are for other machines (phones, servers with VNNI) and keep the full [-127, 127] grid, unless the
model's own int8 data is 7-bit (docs/deploy.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..cache import code_sha256, signature, signed, trusted_secret
from ..errors import MobilenetsError
from ..folding import FoldedConv, FoldedMobileNet, fold_batchnorm
from ..model import MobileNetV1
from .machine import DeployError, int8_weight_qmax

INT8_MODES = ("prepared", "plain")
# int8-ready models kept in the cache; an ImageNet-size one is 17 MB, and a user switches among few
INT8_CACHE_ENTRIES = 8


def folded_for(model: MobileNetV1, precision: str, batches, *, int8: str = "prepared", log=None,
               here: bool = True) -> FoldedMobileNet:
    """``model`` folded for ``precision``; for prepared int8 the result carries ``int8_ready`` (an Int8Ready).

    ``here``: the graph runs on this CPU, so its int8 weights take the grid this CPU sums without saturating
    (:func:`.machine.int8_weight_qmax`): prepared on it, or, for weights that bring full-range int8 data,
    rounded to it (:func:`quantize.on_weight_grid`, with a warning: that loses answers).  Else (an export)
    the full grid, or the model's own.
    """
    if int8 not in INT8_MODES:
        raise DeployError(f"int8 must be one of {INT8_MODES}, got {int8!r}")
    if precision != "int8" or int8 == "plain":
        return fold_batchnorm(model)
    from .. import quantize
    from ..quantize.sim import WEIGHT_QMAX

    qmax = int8_weight_qmax() if here else WEIGHT_QMAX
    ready = quantize.from_model(model)
    if ready is None:
        ready = prepared_int8(model, batches, log=log, weight_qmax=qmax)
    elif ready.weight_qmax > qmax:
        # rounding to nearest kept 58% of the float answers on the real 1.0-224 weights, where preparing on the
        # 7-bit grid kept 90% and saturating full-range weights 42% (benchmarks/results/int8_saturation.md)
        warnings.warn(f"this CPU has no VNNI, and these int8 weights on [-{ready.weight_qmax}, {ready.weight_qmax}] "
                      f"would saturate its int16 sums: rounding them to [-{qmax}, {qmax}], which loses answers; "
                      f"compile the float weights with calibration images instead, or prepare 7-bit weights with "
                      f"quantize.prepare_int8(weight_qmax={qmax})", stacklevel=3)
        ready = quantize.on_weight_grid(ready, qmax)
    folded = ready.folded
    folded.int8_ready = ready
    return folded


def prepared_int8(model: MobileNetV1, batches: list[torch.Tensor], *, log=None, weight_qmax: int | None = None):
    """``quantize.prepare_int8(model, batches, weight_qmax=...)`` (by default this CPU's grid), kept in the cache
    folder: the same weights and calibration images give the same int8-ready model, and preparing it took 21 of predict --precision int8's 26 s of setup.

    The key covers everything the result depends on: the weights, the calibration rows (batched as given),
    the weights' int8 grid, this package's code and torch's version.  A cached file is an int8-ready weights file (what
    ``mobilenets quantize`` writes: atomic, checksummed), read back exactly as prepared; one that does not
    read is prepared again.  ``log(str)`` hears which of the two happens.
    """
    from .. import quantize

    weight_qmax = int8_weight_qmax() if weight_qmax is None else weight_qmax
    path = cache_path(model, batches, weight_qmax)
    folder = path.parent
    resolution = int(batches[0].shape[-1])
    secret = trusted_secret(folder, "int8", "preparing int8 afresh")
    if secret is None:
        return quantize.prepare_int8(model, batches, weight_qmax=weight_qmax)
    if path.is_file() and not signed(secret, path):
        warnings.warn(f"ignoring the cached int8 preparation {path}: it does not carry this cache's signature "
                      f"(edited, or written elsewhere); preparing it afresh", stacklevel=3)
    elif path.is_file():
        try:
            from ..weights import load

            ready = quantize.from_model(load(path, progress=False))
        except Exception as e:  # whatever the file holds, preparing again gives the right answer
            warnings.warn(f"ignoring the cached int8 preparation {path}: {e}", stacklevel=3)
            ready = None
        if ready is not None:
            ready.resolution = resolution  # prepare_int8 keeps the calibration's; the file keeps the weights'
            path.touch()  # recently used: pruned last
            if log:
                log(f"int8: the preparation of these weights on these calibration images, from {path}")
            return ready
    if log:
        log(f"int8: preparing the weights on {sum(len(b) for b in batches)} calibration images (seconds to a "
            f"minute, once: the result is kept in {folder})")
    ready = quantize.prepare_int8(model, batches, log=log, weight_qmax=weight_qmax)
    try:
        quantize.save(ready, model, path)
        mark = signature(secret, path.name, path.read_bytes())
        atomic_write(path.with_suffix(".sig"), lambda f: f.write(mark.encode()))
        for old in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[:-INT8_CACHE_ENTRIES]:
            old.unlink(missing_ok=True)
            old.with_suffix(".sig").unlink(missing_ok=True)
    except (OSError, MobilenetsError) as e:  # a cache that cannot be written costs the next run time, not its result
        warnings.warn(f"could not keep the int8 preparation in {folder}: {e}", stacklevel=3)
    return ready


def cache_path(model: MobileNetV1, batches: list[torch.Tensor], weight_qmax: int | None = None) -> Path:
    """Where :func:`prepared_int8` keeps the preparation of ``model`` on ``batches`` (int8 weights on
    [-weight_qmax, weight_qmax], by default the grid of this CPU: :func:`.machine.int8_weight_qmax`)."""
    from ..cache import cache_dir
    from ..quantize.sim import WEIGHT_QMAX
    from ..weights import tensors_sha256

    key = {"config": model.config.to_dict(), "torch": torch.__version__, "code": code_sha256(),
           "batches": [list(b.shape) for b in batches]}
    weight_qmax = int8_weight_qmax() if weight_qmax is None else weight_qmax
    if weight_qmax != WEIGHT_QMAX:  # full-range entries keep the keys they had
        key["weight_qmax"] = weight_qmax
    h = hashlib.sha256()
    h.update(json.dumps(key, sort_keys=True).encode())
    h.update(tensors_sha256(model.state_dict()).encode())
    for b in batches:
        h.update(b.detach().float().contiguous().cpu().numpy().tobytes())
    return cache_dir() / "int8" / f"{h.hexdigest()[:32]}.safetensors"


def carries_int8(model: MobileNetV1, precision: str, int8: str = "prepared") -> bool:
    """Whether ``model`` brings the int8 ranges ``precision`` needs (weights from ``mobilenets quantize``), so
    that nothing need be calibrated."""
    if precision != "int8" or int8 != "prepared":
        return False
    from .. import quantize

    return quantize.from_model(model) is not None


def single_clip(folded: FoldedMobileNet) -> FoldedMobileNet:
    """An int8-ready graph with one ReLU6 clip per layer, for runtimes that fuse only a scalar clip (PT2E, LiteRT).

    Equalization gives each channel its own clip, 6 s_i with s_i >= 1.  The scalar clip is the smallest of
    them: the int8 graph is unchanged as long as each layer's activation range ends at or below it, and
    calibration caps the int8-ready ranges there (an observer of this graph cannot see more either).
    The result keeps ``int8_ready``.
    """
    ready = folded.int8_ready
    if ready is None:
        return folded
    from ..quantize import scalar_clips

    clips = scalar_clips(ready.folded, ready.ranges)
    layers = [FoldedConv(layer.conv, layer.tf_pad, clip if math.isfinite(clip) else None)
              for layer, clip in zip(ready.folded.features, clips)]
    out = FoldedMobileNet(layers, ready.folded.classifier).eval()
    out.int8_ready = ready
    return out


def quantize_file(weights, calib_data, out, *, calib_images: int = 128, steps: int = 0, method: str = "mse",
                  log=None) -> dict:
    """``mobilenets quantize``: the int8-ready form of the weights in ``weights``, written to ``out``.

    Prepared (:func:`quantize.prepare_int8`) on up to ``calib_images`` images of the folder ``calib_data``,
    preprocessed as the weights expect.  Returns ``{"out", "steps", "images", "top1_agreement", "cosine"}``:
    how closely the int8 graph (simulated) follows the float model on those images.
    """
    from .. import quantize
    from ..weights import load
    from .calibration import image_batches
    from .fidelity import parity

    model = load(weights)
    batches, _ = image_batches(calib_data, model.meta.resolution, normalization=model.meta.normalization,
                               limit=calib_images)
    ready = quantize.prepare_int8(model, batches, steps=steps, method=method, log=log)
    path = quantize.save(ready, model, out)
    x = torch.cat(batches)
    with torch.no_grad():
        report = parity(model(x), ready.simulate(x))
    return {"out": str(path), "steps": steps, "images": report["images"], "top1_agreement": report["top1_agreement"],
            "cosine": report["cosine"]}
