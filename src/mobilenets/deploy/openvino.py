"""The OpenVINO backend (extra ``deploy``): the folded graph converted in memory; bf16 as a hint, int8 by NNCF.

fp32 and bf16 are OpenVINO's inference-precision hint (recorded in a saved
IR's rt_info, since OpenVINO otherwise runs float IR in bf16 on AMX CPUs);
int8 is NNCF post-training quantization (FakeQuantize on activations,
int8 weights) on the calibration batches.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from .artifacts import cached_build
from .backend import Backend, ExportFormat, Run
from .calibration import as_input, example_input, rebatch
from .machine import DeployError

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
HINT_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]
SIGNAL_STACK_BYTES = 1 << 16


class _StackT(ctypes.Structure):  # POSIX stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_signal_stacks: dict[int, ctypes.Array] = {}  # per thread, never freed


@contextlib.contextmanager
def own_signal_stack():
    """Run OpenVINO with, before and after, a signal stack of ours that is never freed.

    OpenVINO's CPU plugin (2026.x) points the calling thread's signal stack at a buffer of its own when it
    compiles, and puts back the stack it found when that model is destroyed.  Destroyed out of order, two
    models leave the thread on a freed buffer; Python runs every signal handler on that stack (SA_ONSTACK),
    so the next Ctrl-C or SIGCHLD killed the process with SIGSEGV (the test suite, after a few hundred
    compiles).  Starting each compile from our stack makes ours what every model puts back.
    """
    _use_own_stack()
    try:
        yield
    finally:
        _use_own_stack()


def _use_own_stack() -> None:
    try:
        sigaltstack = ctypes.CDLL(None).sigaltstack
    except (OSError, AttributeError):  # no POSIX signal stacks here (Windows)
        return
    buffer = _signal_stacks.get(threading.get_ident())
    if buffer is None:  # one per thread, made once
        buffer = _signal_stacks[threading.get_ident()] = ctypes.create_string_buffer(SIGNAL_STACK_BYTES)
    sigaltstack(ctypes.byref(_StackT(ctypes.cast(buffer, ctypes.c_void_p), 0, SIGNAL_STACK_BYTES)), None)


def openvino_model(folded, precision: str, batches, *, resolution: int, batch_size: int | None):
    """Convert the folded model to an ov.Model; int8 through NNCF on ``batches``; bf16 recorded as a runtime hint."""
    import openvino as ov

    example = example_input(batch_size or 1, resolution)
    shape = [batch_size or -1, 3, resolution, resolution]
    ready = folded.int8_ready if precision == "int8" else None
    if ready is not None:  # our QDQ graph, which OpenVINO reads as int8 (FakeQuantize): no NNCF needed
        import tempfile

        from ..quantize import to_qdq_onnx

        with tempfile.TemporaryDirectory(prefix="mobilenets-ov-") as tmp:
            path = to_qdq_onnx(ready, Path(tmp) / "int8.onnx", resolution=resolution)
            with own_signal_stack():
                model = ov.Core().read_model(str(path))
            model.reshape(ov.PartialShape(shape))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with own_signal_stack():
                model = ov.convert_model(folded, example_input=example, input=[ov.PartialShape(shape)])
    if precision == "int8" and ready is None:
        try:
            import nncf
        except ImportError:
            raise DeployError("int8 on OpenVINO needs NNCF (pip install nncf); or use backend 'torch'") from None

        logging.getLogger("nncf").setLevel(logging.ERROR)
        # a static-shape model takes calibration rows in its own batch size
        data = [b.numpy() for b in (rebatch(batches, batch_size) if batch_size else batches)]
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), own_signal_stack():
            warnings.simplefilter("ignore")
            model = nncf.quantize(model, nncf.Dataset(data), subset_size=sum(len(d) for d in data))
    if precision in PRECISION_HINTS:
        # travels with a saved IR: compile_model applies runtime_options from rt_info
        model.set_rt_info(PRECISION_HINTS[precision], HINT_KEY)
    return model


def ir_bytes(model, workdir: Path) -> bytes:
    """``model`` as one byte string: the length of its IR's XML (8 bytes, little-endian), the XML, the weights.

    The weights stay float32 (fp16 compression would change the logits); the precision hint travels in
    the XML's rt_info.
    """
    import openvino as ov

    xml = Path(workdir) / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    graph, weights = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    return len(graph).to_bytes(8, "little") + graph + weights


def ir_model(data: bytes):
    """The ov.Model that :func:`ir_bytes` wrote, read from memory."""
    import numpy as np
    import openvino as ov

    n = int.from_bytes(data[:8], "little")
    if not 0 < n <= len(data) - 8:
        raise DeployError("not an OpenVINO IR written by mobilenets: its graph length is out of range")
    weights = np.frombuffer(data, np.uint8, offset=8 + n)
    with own_signal_stack():
        return ov.Core().read_model(data[8:8 + n], ov.Tensor(weights))


def openvino_compile(model, *, precision: str, throughput: bool = False):
    import openvino as ov

    config = {"PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY"}
    if precision in PRECISION_HINTS:
        config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
    with own_signal_stack():
        return ov.Core().compile_model(model, "CPU", config)


class Request:
    """``run(x) -> logits``: the float graph on one infer request, all threads on one batch (LATENCY).

    ``run.pixels(normalization)`` runs uint8 pixels, normalised by the graph's first ops, and
    ``run.stream(items)`` runs a sequence of batches with several in flight.  Each graph and mode is
    compiled when first used (0.3 s for 1.0-224 int8 here): predict over a folder compiles only the
    pixel graph for streaming.  ``compiled_model`` is what the CPU plugin runs for ``run(x)`` (inspectable).
    """

    def __init__(self, model, precision: str):
        self._model = model  # the ov.Model from which every graph and mode is compiled
        self._precision = precision
        self._requests: dict = {}  # (normalization or None, throughput) -> infer requests

    @property
    def compiled_model(self):
        return self._infer_requests(None, False)[0].get_compiled_model()

    def _infer_requests(self, normalization, throughput: bool) -> list:
        requests = self._requests.get((normalization, throughput))
        if requests is None:
            model = self._model if normalization is None else pixel_input(self._model, normalization)
            compiled = openvino_compile(model, precision=self._precision, throughput=throughput)
            count = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if throughput else 1
            requests = self._requests[(normalization, throughput)] = [
                compiled.create_infer_request() for _ in range(count)]
        return requests

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _inferred(self._infer_requests(None, False)[0], x)

    def pixels(self, normalization) -> Run:
        """``run(uint8 (N, 3, H, W) pixels) -> logits``, with (x / 255 - mean) / std as the graph's first ops.

        A quarter of the bytes cross into the runtime, and OpenVINO folds the normalisation into the first
        layer instead of a pass over a float batch.  At fp32 the logits are the float graph's to 2e-5; at
        int8 the input's quantization may round a pixel that sits on a step's midpoint the other way: on
        320 photos the two graphs gave the same top-1 on 93.1%, each agreeing with fp32 on 93.75%
        (benchmarks/results/pixel_input.md).
        """
        return functools.partial(_inferred, self._infer_requests(normalization, False)[0])

    def stream(self, items) -> Iterator[torch.Tensor]:
        """Logits of each ``(x, normalization)`` of ``items`` in order (normalization None: float input, else
        uint8 pixels), with OpenVINO's THROUGHPUT streams: as many batches in flight as it has streams, each
        on its own threads (2 of one thread on 2 cores).  Nothing waits for a slower thread at each layer,
        as the threads of one batch do while a decoding worker holds a core: predict int8 on 3,000
        ImageNet-size JPEGs ran a median 345.8 images/s this way, 245.6 one batch at a time; with a neighbour
        busy for half a core 280.6 and 231.9 (benchmarks/results/predict_cpu*.md)."""
        in_flight: deque = deque()
        turns: dict = {}
        for x, normalization in items:
            requests = self._infer_requests(normalization, True)
            if len(in_flight) == len(requests):
                yield _collected(*in_flight.popleft())
            # round robin within a graph: with no more in flight than it has requests, the next one is done
            turn = turns[normalization] = turns.get(normalization, -1) + 1
            request = requests[turn % len(requests)]
            request.start_async({0: x.numpy()}, share_inputs=True)
            in_flight.append((request, x))  # x stays alive while the runtime reads it in place
        while in_flight:
            yield _collected(*in_flight.popleft())


def _inferred(request, x: torch.Tensor) -> torch.Tensor:
    request.infer({0: x.numpy()}, share_inputs=True)  # read in place: x is not copied
    return _logits(request)


def _collected(request, x) -> torch.Tensor:
    request.wait()
    return _logits(request)


def _logits(request) -> torch.Tensor:
    return torch.from_numpy(request.get_output_tensor(0).data.copy())  # the request's buffer is reused


def pixel_input(model, normalization):
    """A copy of ``model`` whose input is uint8 pixels, normalised in the graph as images.to_tensor does:
    x * (1 / (255 std)) - mean / std, in float32."""
    import openvino as ov
    import openvino.opset13 as ops

    from ..images import affine

    scale, shift = (t.numpy()[None] for t in affine(normalization))  # (1, 3, 1, 1)

    def normalise(pixels):
        return ops.subtract(ops.multiply(pixels, ops.constant(scale)), ops.constant(shift)).output(0)

    ppp = ov.preprocess.PrePostProcessor(model.clone())
    ppp.input().tensor().set_element_type(ov.Type.u8)
    ppp.input().preprocess().convert_element_type(ov.Type.f32).custom(normalise)
    return ppp.build()


class OpenVINO(Backend):
    name = "openvino"
    requires = ("openvino",)
    formats = (ExportFormat("openvino", ".xml", ("fp32", "bf16", "int8"), companions=(".bin",)),)

    def describe(self, precision: str) -> str:
        return "OpenVINO CPU" + (", NNCF int8" if precision == "int8" else "")

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        def make() -> bytes:
            model = openvino_model(folded, precision, batches, resolution=resolution, batch_size=batch_size)
            return ir_bytes(model, Path(workdir))

        # converting is nearly all of the build (30 s of 1.0-224's, compiling 1 s): kept, it is done once
        return cached_build(self.name, folded, precision, batches, batch_size, resolution,
                            libraries=("openvino", "nncf"), suffix=".ir",
                            make=make, load=lambda data: Request(ir_model(data), precision))

    def save(self, folded, path, format, precision, batches, resolution) -> Path:
        import openvino as ov

        # the weights go to the .bin beside the .xml, as float32: fp16 compression would change the logits
        ov.save_model(openvino_model(folded, precision, batches, resolution=resolution, batch_size=None), str(path),
                      compress_to_fp16=False)
        return Path(path)

    def load(self, path, format) -> Run:
        import openvino as ov

        with own_signal_stack():
            core = ov.Core()
            model = core.read_model(str(path))
            config = {}
            if model.has_rt_info(HINT_KEY):  # the precision the file was exported for (OpenVINO defaults to bf16 on AMX)
                config["INFERENCE_PRECISION_HINT"] = model.get_rt_info(HINT_KEY).astype(str)
            compiled = core.compile_model(model, "CPU", config)
        return lambda x: torch.from_numpy(compiled(as_input(x).numpy())[0].copy()).float()


BACKEND = OpenVINO()
