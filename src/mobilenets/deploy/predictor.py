"""``compile``: the folded model built by one backend (or the fastest, ``auto``) into a :class:`Predictor`."""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from ..architecture import MIN_RESOLUTION
from ..checks import check_integer, is_integer
from ..errors import ParameterTypeError
from ..images import Normalization, to_tensor
from .. import progress
from ..model import MobileNetV1
from . import auto
from . import backend as registry  # the parameter of compile is called backend
from .backend import Run
from .calibration import DEFAULT_RESOLUTION, as_input, calibration_batches, check_input_shape, rebatch
from .prepare import carries_int8, folded_for
from .machine import DeployError, bf16_supported


class Predictor:
    """Runs one compiled model on ``(N, 3, H, W)`` preprocessed input (or uint8 pixels: :meth:`pixels`) and
    returns float32 logits.

    Attributes a caller can rely on: ``backend``, ``precision``, ``batch_size``,
    ``resolution``, ``detail`` (how the backend runs it), ``timings`` (ms per
    batch of each backend ``auto`` tried, else empty).
    """

    def __init__(self, run: Run, *, backend: str, precision: str, batch_size: int, resolution: int,
                 detail: str = "", timings: dict[str, float] | None = None):
        self._run = run
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.resolution = resolution
        self.detail = detail
        self.timings: dict[str, float] = dict(timings or {})
        self._pixel_runs: dict[Normalization, Run] = {}

    def __repr__(self) -> str:
        return (f"Predictor(backend={self.backend!r}, precision={self.precision!r}, "
                f"batch_size={self.batch_size}, resolution={self.resolution})")

    def __call__(self, x) -> torch.Tensor:
        x = as_input(x)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        check_input_shape(x, self.resolution)
        return self._chunked(self._run, x)

    def pixels(self, x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
        """Logits of uint8 ``(N, 3, H, W)`` pixels (as :func:`mobilenets.images.eval_pixels` gives them),
        normalised as ``normalization``: by the runtime's graph where it offers that (OpenVINO), else by
        :func:`mobilenets.images.to_tensor` a chunk at a time.  The same logits as
        ``predictor(images.to_tensor(x, normalization))`` to float rounding (at int8, the input quantization
        of that rounding: :meth:`.openvino.Request.pixels`)."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            raise ParameterTypeError(f"expected uint8 pixels (N, 3, H, W), got "
                                     f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        x, normalization = self._input(x, normalization)
        return self._chunked(self._pixel_run(normalization), x)

    def stream(self, xs: Iterable, normalization: Normalization | None = None) -> Iterator[torch.Tensor]:
        """The logits of each batch of ``xs``, in order: uint8 pixels normalised as ``normalization`` (as
        :meth:`pixels`), or preprocessed float input (as calling the predictor).  A runtime that runs
        several batches at once (OpenVINO's throughput streams) is given the next ones while it runs this;
        at most that many are held.  For a sequence of batches, such as predict's."""
        pending: deque = deque()  # (rows, whether the chunk ends its batch), a chunk at a time

        def chunks():
            for x in xs:
                x, pixels = self._input(x, normalization)
                for chunk, rows, last in self._chunks(x):
                    pending.append((rows, last))
                    yield chunk, pixels

        run_all = getattr(self._run, "stream", None) or self._one_at_a_time
        parts = []
        for logits in run_all(chunks()):
            rows, last = pending.popleft()
            parts.append(logits[:rows])
            if last:
                yield torch.cat(parts) if len(parts) > 1 else parts[0]
                parts = []

    def _one_at_a_time(self, items) -> Iterator[torch.Tensor]:
        for chunk, normalization in items:
            yield self._run(chunk) if normalization is None else self._pixel_run(normalization)(chunk)

    def _input(self, x, normalization: Normalization | None) -> tuple[torch.Tensor, Normalization | None]:
        """``x`` as a checked (N, 3, H, W) batch, and the normalization it needs: uint8 pixels need one, float
        input none."""
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            if normalization is None:
                raise ParameterTypeError("uint8 pixels need a normalization (mobilenets.images.INCEPTION for the "
                                         "official weights), or pass preprocessed float input")
        else:
            x, normalization = as_input(x), None
        if x.dim() == 3:
            x = x.unsqueeze(0)
        check_input_shape(x, self.resolution)
        return x, normalization

    def _pixel_run(self, normalization: Normalization) -> Run:
        run = self._pixel_runs.get(normalization)
        if run is None:
            make = getattr(self._run, "pixels", None)
            run = self._pixel_runs[normalization] = (
                make(normalization) if make is not None else lambda chunk: self._run(to_tensor(chunk, normalization)))
        return run

    def _chunked(self, run: Run, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.batch_size:
            return run(x)
        return torch.cat([run(chunk)[:rows] for chunk, rows, _ in self._chunks(x)])

    def _chunks(self, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, bool]]:
        """``x`` in chunks of the compiled batch size: (chunk, its rows of ``x``, whether it is the last)."""
        n, b = x.shape[0], self.batch_size
        for start in range(0, n, b):
            chunk = x[start:start + b]
            rows = chunk.shape[0]
            if rows < b:  # pad rather than recompile for a new shape
                chunk = torch.cat([chunk, chunk.new_zeros((b - rows, *chunk.shape[1:]))])
            yield chunk, rows, start + b >= n


def compile(model: MobileNetV1, precision: str = "fp32", calibration: Iterable | None = None,
            batch_size: int = 1, resolution: int | None = None, backend: str = "auto",
            int8: str = "prepared", log=progress.ON_A_TERMINAL, work: int | None = None) -> Predictor:
    """An optimised predictor for ``model``: ``predictor(x)`` takes (N, 3, H, W) preprocessed input, returns logits.

    ``precision``: "fp32", "bf16" (fast on CPUs with AMX or AVX-512 BF16) or
    "int8" (needs ``calibration``: an iterable of (N, 3, H, W) batches, or
    (images, labels) pairs, preprocessed like real inputs; not for weights from
    ``mobilenets quantize``, whose own ranges are used, except on the "torch"
    backend, whose observers measure them).  ``batch_size`` and
    ``resolution`` (default 224) fix the compiled shape: other batch sizes run
    in chunks (the last one padded), other resolutions are refused.
    ``backend``: "auto" (measure the available backends once, cache the
    fastest), "torch", "onnxruntime" or "openvino".  What a runtime exports (ONNX graph, .tflite,
    OpenVINO IR) is kept in the cache folder and loaded by the next compile of the same request
    (:mod:`.artifacts`); nothing else is left on disk.
    ``int8``: "prepared" (default) makes the model int8-ready first
    (:mod:`mobilenets.quantize`; weights from ``mobilenets quantize`` are used as
    they are), "plain" leaves each runtime's own post-training quantization;
    the preparation is cached (:func:`.prepare.prepared_int8`), and ``log(str)``
    hears whether it ran or was read, and the progress of slow steps (:mod:`mobilenets.progress`; by
    default stderr where it is a terminal: the first int8 preparation can take minutes; None: silent).
    ``work``: how many inputs the predictor will run, when known; "auto" then
    measures only what pays for itself in that job, and at fp32 may keep eager
    PyTorch (backend "eager"); see :mod:`.auto`.
    """
    log = progress.resolve(log)
    registry.check_precision(precision)
    registry.check_backend(backend, precision)
    check_integer(batch_size, "batch_size", 1, error=DeployError)
    if work is not None:
        check_integer(work, "work", 1, error=DeployError)
    resolution = DEFAULT_RESOLUTION if resolution is None else resolution
    if not is_integer(resolution) or resolution < MIN_RESOLUTION:
        raise DeployError(f"resolution must be an integer >= {MIN_RESOLUTION} such as 224, 192, 160, 128, "
                          f"got {resolution!r}")
    if precision != "int8" or (calibration is None and carries_int8(model, precision, int8)):
        given = batches = []  # int8-ready weights from mobilenets quantize carry their ranges: nothing to calibrate
    else:
        given = calibration_batches(calibration, resolution)
        batches = rebatch(given, batch_size)  # what a runtime's own static-shape calibration takes
    # prepared on every calibration image as given, as export prepares: rebatched to the job's batch size, a
    # job of 32 kept 32 of 60 images, and each size of small job prepared (and cached) its own int8 model
    folded = folded_for(model, precision, given, int8=int8, log=log)
    if backend != "auto":
        registry.check_calibration(backend, folded, precision, batches)
    if precision == "bf16" and not bf16_supported():
        warnings.warn("this CPU has neither AMX nor AVX-512 BF16: bf16 is emulated and slower than fp32", stacklevel=2)

    timings = {}
    if backend == "auto":
        backend, run, timings = auto.choose(model.config.to_dict(), folded, precision, batches, batch_size,
                                            resolution, work=work, log=log)
    else:
        run = registry.build(backend, folded, precision, batches, batch_size, resolution)
    detail = "eager PyTorch, BatchNorm folded" if backend == "eager" else registry.get(backend).describe(precision)
    return Predictor(run, backend=backend, precision=precision, batch_size=batch_size, resolution=resolution,
                     detail=detail, timings=timings)
