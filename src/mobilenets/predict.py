"""Classifying images with a set of weights, preprocessed as those weights expect.

The resolution and normalization come from the weights' metadata
(``model.meta``), so an image is resized by resolution / 0.875 and
centre-cropped exactly as in evaluation (:func:`images.eval_transform`).
Files are decoded in worker processes (:mod:`pipeline`) while the model runs;
large inputs run through :func:`deploy.compile`, the fastest runtime present.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import metadata, pipeline
from .checks import check_integer
from .deploy.backend import SERVE_BACKENDS
from .errors import MobilenetsError
from .images import ImageError, Normalization, list_images, to_tensor, warn_skipped
from .model import MobileNetV1
from .progress import Progress
from .terminal import printable

# what predict runs by name (deploy.SERVE_BACKENDS: the eager model, "auto", the runtimes serving from here)
BACKENDS = SERVE_BACKENDS


@dataclass(frozen=True)
class Prediction:
    """The ``topk`` most probable classes for one image, most probable first."""

    image: str
    top: list[dict]  # {"class_index": int, "label": str, "probability": float}

    def to_dict(self) -> dict:
        return {"image": self.image, "top": self.top}


@dataclass(frozen=True)
class _Source:
    name: str
    item: object  # a Path, a PIL image, or a preprocessed (3, R, R) tensor
    in_folder: bool = False


def _sources(inputs) -> list[_Source]:
    """One source per image: a path (file or folder), a PIL image, an (N,) 3 x H x W tensor, or a list of these."""
    if isinstance(inputs, (str, Path, Image.Image, torch.Tensor, np.ndarray)):
        inputs = [inputs]
    elif not isinstance(inputs, Iterable):
        raise MobilenetsError(f"inputs must be a path, a folder, a PIL image, a tensor or a list of these, "
                              f"got {type(inputs).__name__}")
    found: list[_Source] = []
    for item in inputs:
        if isinstance(item, (str, Path)):
            p = Path(item)
            if p.is_dir():
                found.extend(_Source(str(f), f, True) for f in list_images(p))
            elif p.is_file():
                found.append(_Source(str(p), p))
            elif p.exists():
                raise MobilenetsError(f"{p} is neither a regular file nor a folder")
            else:
                raise MobilenetsError(f"{p} does not exist; pass image files or folders")
        elif isinstance(item, Image.Image):
            found.append(_Source(f"<image {len(found)}>", item))
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            found.extend(_tensor_sources(torch.as_tensor(item), len(found)))
        else:
            raise MobilenetsError(f"cannot classify a {type(item).__name__}; pass a path, a folder, a PIL image or "
                                  f"a tensor")
    if not found:
        raise MobilenetsError("no images to classify; pass image files or folders")
    return found


def _tensor_sources(t: torch.Tensor, start: int) -> list[_Source]:
    """uint8 tensors are images (C, H, W as torchvision.io.read_image gives); float ones are preprocessed input."""
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != 3:
        raise MobilenetsError(f"a tensor must be (3, H, W) or (N, 3, H, W), got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return [_Source(f"<tensor {start + i}>", Image.fromarray(t[i].permute(1, 2, 0).numpy(), "RGB"))
                for i in range(len(t))]
    if not t.is_floating_point():
        raise MobilenetsError(f"a tensor must be uint8 (an image) or float (preprocessed input), got {t.dtype}")
    finite = torch.isfinite(t).flatten(1).all(dim=1)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise MobilenetsError(f"input tensor {start + first} holds NaN or infinite values; its answer would be "
                              f"NaN: preprocess finite pixels")
    return [_Source(f"<tensor {start + i}>", t[i].float()) for i in range(len(t))]


def _batches(sources: list[_Source], resolution: int, normalization, batch_size: int, workers, draft, warn=None):
    """pipeline.batches over the images to decode (its workers start now): uint8 pixels; with preprocessed
    tensors among the inputs, float batches, those tensors passed through in place."""
    if not any(isinstance(s.item, torch.Tensor) for s in sources):
        # uint8 pixels, normalised where the model runs (runner): in a runtime's graph where it can
        return pipeline.batches([s.item for s in sources], resolution=resolution, normalization=None,
                                batch_size=batch_size, workers=workers, draft=draft, warn=warn)
    return _mixed_batches(sources, resolution, normalization, batch_size, draft)


def _mixed_batches(sources: list[_Source], resolution: int, normalization, batch_size: int, draft):
    for start in range(0, len(sources), batch_size):  # a mix: small inputs given in memory, decode here
        chunk = range(start, min(start + batch_size, len(sources)))
        tensors = [i for i in chunk if isinstance(sources[i].item, torch.Tensor)]
        for t in tensors:
            if tuple(sources[t].item.shape[-2:]) != (resolution, resolution):
                raise MobilenetsError(f"a preprocessed tensor must be 3 x {resolution} x {resolution} for these "
                                      f"weights, got {tuple(sources[t].item.shape)}")
        images_ = [i for i in chunk if i not in tensors]
        decoded = {}
        failed = []
        if images_:
            for b in pipeline.batches([sources[i].item for i in images_], resolution=resolution,
                                      normalization=normalization, batch_size=len(images_), workers=0, draft=draft):
                decoded.update({images_[j]: b.x[k] for k, j in enumerate(b.indices)})
                failed += [(images_[j], why) for j, why in b.failed]
        good = [i for i in chunk if i in decoded or i in tensors]
        x = torch.stack([decoded[i] if i in decoded else sources[i].item for i in good]) if good else None
        yield pipeline.DecodedBatch(good, x, failed)


def model_for(weights: str = "imagenet", *, alpha: float | None = None, resolution: int | None = None,
              progress: bool = True) -> tuple[MobileNetV1, int | None]:
    """The model that ``mobilenets predict --weights`` names, and the input size to run it at (None: its own).

    "imagenet": the released weights of width ``alpha`` (default 1.0) trained at ``resolution`` (default
    224).  A file holds its own width, so ``alpha`` beside it is refused (it was once silently ignored);
    ``resolution`` then only changes the input size.
    """
    from . import weights as released

    if weights == "imagenet":
        return released.load("imagenet", alpha=alpha or 1.0, resolution=resolution, progress=progress), None
    if alpha is not None:
        raise MobilenetsError(f"--alpha chooses among the released weights (--weights imagenet); {weights} holds "
                              f"its own width: drop --alpha")
    return released.load(weights), resolution


def predict(model: MobileNetV1, inputs, *, topk: int = 5, batch_size: int = 32, resolution: int | None = None,
            normalization: Normalization | None = None, precision: str = "fp32", backend: str | None = None,
            workers: int | None = None, exact: bool = False, calibration=None, log=None,
            on_skip=None, warn=None) -> Iterator[Prediction]:
    """Classify images, ``batch_size`` at a time, yielding one :class:`Prediction` per image in input order.

    ``inputs``: an image file, a folder (every image below it, sorted), a PIL
    image, a tensor (uint8 (3, H, W) / (N, 3, H, W) images, or float
    preprocessed input), or a list of these.  ``resolution`` and
    ``normalization`` default to ``model.meta`` (set by
    :func:`mobilenets.load` and :func:`mobilenets.mobilenet_v1`).
    ``precision`` ("fp32", "bf16", "int8") and ``backend`` (None:
    :func:`deploy.compile`'s "auto", told how many images there are: at fp32 it
    keeps eager PyTorch unless building a runtime pays for itself in this job,
    :mod:`mobilenets.deploy.auto`) choose how the model runs; int8 needs
    ``calibration`` (see :func:`deploy.compile`) unless the weights are from
    ``mobilenets quantize`` (they carry their ranges).  ``workers`` decoding
    processes (default from the cores).  A JPEG is decoded at the coarsest DCT
    scale (1/2, 1/4, 1/8) that leaves its shorter side at least the resize
    size (:func:`images.draft_side`: 256 pixels for 224), about 3x faster on
    phone photos; on 195 camera photos this moved answers less than the
    preprocessing these weights were evaluated with (TF-slim) or Keras's does
    (benchmarks/results/decode_agreement.md).  ``exact=True`` decodes
    every pixel: torchvision's and timm's preprocessing to within a grey level.
    A file named directly that cannot be decoded is an error; one found in a
    folder is skipped with a warning.  With ``on_skip(image, why)``, every
    file that cannot be decoded, named or found, is skipped and reported to it
    instead (the CLI reports each in one line and goes on).  ``log(str)`` hears
    about slow setup (int8 preparation, the runtime's measurement) and the progress of the whole
    (:mod:`mobilenets.progress`); ``warn(str)`` about a decoding worker that died (the images it had
    are decoded in this process, none lost; default: a warning).
    """
    check_integer(topk, "topk", 1, error=MobilenetsError)
    check_integer(batch_size, "batch_size", 1, error=MobilenetsError)
    if model.config.num_classes == 0:
        raise MobilenetsError("these weights have no classifier (a feature extractor, e.g. a _no_top file); "
                              "classifying needs weights with their classification head")
    meta = metadata.of(model)
    resolution = resolution or meta.resolution
    if normalization is None:
        normalization = meta.normalization
    if precision == "int8" and calibration is None:
        from . import quantize

        if quantize.from_model(model) is None:  # before any image is decoded
            raise MobilenetsError("int8 needs calibration images (--calib-data DIR: a folder of images like the "
                                  "inputs), or weights made int8-ready by 'mobilenets quantize', which carry "
                                  "their own ranges")
    labels = list(meta.labels) if meta.labels and len(meta.labels) == model.config.num_classes else None
    topk = min(topk, model.config.num_classes)
    sources = _sources(inputs)
    if isinstance(calibration, (str, Path)):  # a folder of images, read like the inputs
        from . import deploy

        calibration, _ = deploy.image_batches(calibration, resolution, normalization=normalization)
    # decoding starts before the model is built, and overlaps it
    stream = _batches(sources, resolution, normalization, batch_size, workers, not exact, warn)
    with Progress("predict", len(sources), log, unit="images") as shown:
        yield from _classify(stream, runner(model, len(sources), precision, backend, calibration, batch_size,
                                            resolution, normalization, log), sources, topk, labels, on_skip, shown)


def _classify(stream, run: Runner, sources, topk, labels, on_skip, shown) -> Iterator[Prediction]:
    for batch, logits in _with_logits(stream, run):
        for i, why in batch.failed:
            if on_skip is not None:
                on_skip(sources[i].name, why)
            elif not sources[i].in_folder:
                raise ImageError(why)
            else:
                warn_skipped(Path(sources[i].name), ImageError(why))
        if logits is None:
            shown.advance(len(batch.failed))
            continue
        probabilities = torch.softmax(logits.float(), dim=1)
        values, indices = probabilities.topk(topk, dim=1)
        for i, vs, ixs in zip(batch.indices, values.tolist(), indices.tolist()):
            yield Prediction(sources[i].name, [{"class_index": c, "label": labels[c] if labels else str(c),
                                                "probability": v} for v, c in zip(vs, ixs)])
        shown.advance(len(batch.indices) + len(batch.failed))


def _with_logits(stream, run: Runner) -> Iterator[tuple[pipeline.DecodedBatch, torch.Tensor | None]]:
    """Each batch of ``stream`` with its logits (None where none of its images decoded), in order, while the
    runner may hold the next batches in flight."""
    pending: deque = deque()

    def inputs():
        for batch in stream:
            pending.append(batch)
            if batch.x is not None:
                yield batch.x

    for logits in run.stream(inputs()):
        while pending[0].x is None:  # batches with nothing to run, ahead of this one
            yield pending.popleft(), None
        yield pending.popleft(), logits
    while pending:  # nothing left to run: what remains has nothing to run
        yield pending.popleft(), None


class Runner:
    """Turns batches into logits: eager PyTorch, or a compiled predictor.  A batch is uint8 pixels,
    normalised as ``normalization`` (by the runtime's graph where it can: :meth:`deploy.Predictor.pixels`), or
    preprocessed float input.  ``run(x)`` runs one batch; ``run.stream(xs)`` a sequence, in order, several in
    flight where the runtime can (:meth:`deploy.Predictor.stream`)."""

    def __init__(self, model: MobileNetV1 | None, predictor, normalization: Normalization):
        self.model, self.predictor, self.normalization = model, predictor, normalization
        self.device = None if model is None else next(model.parameters()).device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.predictor is not None:
            return self.predictor.pixels(x, self.normalization) if x.dtype == torch.uint8 else self.predictor(x)
        if x.dtype == torch.uint8:
            x = to_tensor(x, self.normalization)
        with torch.inference_mode():
            return self.model(x.to(self.device))

    def stream(self, xs: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        if self.predictor is not None:
            return self.predictor.stream(xs, self.normalization)
        return map(self, xs)


def runner(model: MobileNetV1, count: int | None, precision: str, backend: str | None, calibration,
           batch_size: int, resolution: int, normalization: Normalization, log=None) -> Runner:
    """predict's :class:`Runner` (also each Ray actor's, mobilenets.ray_predict).  ``count``: how many images
    the job has (None: not known, as for an actor serving a stream); auto sizes what it builds to it."""
    if backend == "eager":
        if precision != "fp32":
            raise MobilenetsError(f"the eager model runs fp32 only; for {precision} pass backend=None or a runtime")
        return Runner(model.eval(), None, normalization)
    from . import deploy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporters' chatter; deploy's own warnings concern benchmarks
        predictor = deploy.compile(model.cpu(), precision=precision, calibration=calibration,
                                   batch_size=batch_size if count is None else min(batch_size, count),
                                   resolution=resolution, backend=backend or "auto", log=log,
                                   work=count if backend in (None, "auto") else None)
    return Runner(None, predictor, normalization)


def decode_predictions(logits: torch.Tensor, k: int = 5, labels: list[str] | None = None) -> list[list[dict]]:
    """The top ``k`` classes of each row of ``logits`` (N, classes), most probable first, as ``predict`` gives them.

    ``labels`` default to the ImageNet class names when there are 1000 classes.
    """
    logits = torch.as_tensor(logits)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    if logits.dim() != 2:
        raise MobilenetsError(f"logits must be (N, classes), got {tuple(logits.shape)}")
    if labels is None and logits.shape[1] == 1000:
        from .labels import imagenet_labels

        labels = list(imagenet_labels())
    if labels is not None and len(labels) != logits.shape[1]:
        raise MobilenetsError(f"labels must name each of the {logits.shape[1]} classes, got {len(labels)} labels")
    k = min(k, logits.shape[1])
    values, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
    return [[{"class_index": c, "label": labels[c] if labels else str(c), "probability": v}
             for v, c in zip(vs, ixs)] for vs, ixs in zip(values.tolist(), indices.tolist())]


def format_table(predictions: Iterable[Prediction]) -> Iterator[str]:
    """A readable block per image: rank, class index, probability, label."""
    for p in predictions:
        yield printable(p.image)  # file names and labels are data: no escape sequence or newline reaches the terminal
        for rank, t in enumerate(p.top, start=1):
            yield f"  {rank:>2}  {t['class_index']:>4}  {100 * t['probability']:6.2f}%  {printable(t['label'])}"
