"""``predict`` over many machines: a Ray Data ``Dataset`` of images in, a ``Dataset`` of results out.

Each actor holds one model, built once through the same runtimes as
``predict`` (:func:`predict.runner`: eager PyTorch or :func:`deploy.compile`
at fp32, bf16 or int8), and decodes with the project's own decoder
(:func:`images.load_pixels` + :func:`images.eval_pixels`), so a row's answer
is the one ``mobilenets predict`` gives for that file.  An image that cannot
be decoded becomes a row with its ``error``, not a failed job.

:func:`predict_files` is the command-line form: files under a local folder or
any fsspec URL, results written as Parquet shards, each complete or absent
(temporary name, then a rename), so a second run with the same ``out`` does
only what is missing.  Needs the ``ray`` extra: ``pip install 'mobilenets[ray]'``.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass

import torch

from . import metadata
from .errors import MobilenetsError, ParameterError
from .images import IMAGE_EXTENSIONS, ImageError, draft_side, eval_pixels, load_pixels, to_tensor
from .model import MobileNetV1

# Images per Parquet shard written by predict_files: a shard is the unit a resumed run skips or redoes.
SHARD_SIZE = 1000
MANIFEST = "manifest.json"
# Threads per actor at most: a MobileNet forward pass gains little beyond a few cores, and each actor decodes
# its images on one thread, so more actors of fewer threads keep more cores decoding.
MAX_THREADS = 4


class RayPredictError(MobilenetsError):
    """Inputs, outputs or a cluster that batch inference on Ray cannot use; the message says what would."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 (the extra brings both)
    except ImportError:
        raise RayPredictError("batch inference on Ray needs the ray extra: pip install 'mobilenets[ray]'") from None
    return ray


@dataclass(frozen=True)
class Plan:
    """How the work is spread: ``actors`` models, each on ``threads`` cores, fed ``batch_size`` images at once."""

    actors: int
    threads: int
    batch_size: int


def plan(actors: int | None = None, threads: int | None = None, batch_size: int | None = None) -> Plan:
    """Fill what is not given from the connected cluster's resources.

    ``threads``: the smallest node's cores / 4, between 1 and :data:`MAX_THREADS`
    (an actor must fit on every node); ``actors``: as many as the nodes' cores
    hold at ``threads`` each; ``batch_size``: 32, ``predict``'s default.
    """
    for name, value in (("actors", actors), ("threads", threads), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ParameterError(f"{name} must be an integer >= 1, got {value!r}")
    ray = _ray()
    cores = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    cores = [c for c in cores if c > 0] or [1]
    if threads is None:
        threads = max(1, min(MAX_THREADS, min(cores) // 4))
    if actors is None:
        actors = max(1, sum(c // threads for c in cores))
    return Plan(actors=actors, threads=threads, batch_size=batch_size or 32)


def result_schema(topk: int, embedding_size: int | None):
    """The Arrow schema of a result row: ``predict --json``'s fields, ``error``, and the embedding if asked."""
    import pyarrow as pa

    top = pa.struct([("class_index", pa.int64()), ("label", pa.string()), ("probability", pa.float64())])
    fields = [("image", pa.string()), ("top", pa.list_(top)), ("error", pa.string())]
    if embedding_size:
        fields.append(("embedding", pa.list_(pa.float32(), embedding_size)))
    return pa.schema(fields)


def _read(path: str, min_side):
    """A local path is decoded from the file; any other URL (s3://, gs://, ...) is read through fsspec first."""
    if "://" not in path or path.startswith("file://"):
        return load_pixels(path.removeprefix("file://"), min_side=min_side)
    import fsspec

    with fsspec.open(path, "rb") as f:
        return load_pixels(f.read(), min_side=min_side)


class Classifier:
    """One Ray actor's model: built once, then called on batches of rows ``{"path"[, "bytes"]}``."""

    def __init__(self, model: MobileNetV1, topk: int, precision: str, backend: str | None, batch_size: int,
                 threads: int, embedding: bool, exact: bool = False):
        from .predict import runner

        torch.set_num_threads(threads)
        meta = metadata.of(model)
        self.resolution = meta.resolution
        self.normalization = meta.normalization
        self.labels = list(meta.labels) if meta.labels and len(meta.labels) == model.config.num_classes else None
        self.topk = min(topk, model.config.num_classes)
        self.model = model.eval()
        self.embedding = embedding
        # large JPEGs decode at a reduced DCT scale unless exact, as predict does (images.draft_side)
        self.min_side = None if exact else draft_side(self.resolution)
        # count unknown: an actor serves batches for as long as the dataset lasts, so auto measures every runtime
        # (once per machine: the choice is cached) rather than sizing its measurement to a job
        self.run = runner(model, None, precision, backend, None, batch_size, self.resolution, self.normalization)
        self.schema = result_schema(self.topk, model.num_features if embedding else None)

    def __call__(self, batch: dict):
        import pyarrow as pa

        paths = [str(p) for p in batch["path"]]
        data = batch.get("bytes")
        crops, good, errors = [], [], [None] * len(paths)
        for i, path in enumerate(paths):
            try:
                pixels = (load_pixels(bytes(data[i]), min_side=self.min_side) if data is not None
                          else _read(path, self.min_side))
                crops.append(eval_pixels(pixels, self.resolution))
                good.append(i)
            except (ImageError, OSError) as e:  # a bad or unreadable file is its row's answer, not the job's end
                errors[i] = str(e) if data is None else f"cannot decode image {path}: {e}"
        tops: list = [[] for _ in paths]
        embeddings = [None] * len(paths)
        if good:
            pixels = torch.stack(crops)  # normalised where the model runs, as predict's (predict.runner)
            probabilities = torch.softmax(self.run(pixels).float(), dim=1)
            values, indices = probabilities.topk(self.topk, dim=1)
            for i, vs, ixs in zip(good, values.tolist(), indices.tolist()):
                tops[i] = [{"class_index": c, "label": self.labels[c] if self.labels else str(c), "probability": v}
                           for v, c in zip(vs, ixs)]
            if self.embedding:
                with torch.inference_mode():
                    pooled = self.model.forward_head(self.model.forward_features(to_tensor(pixels, self.normalization)),
                                                     pre_logits=True)
                for i, row in zip(good, pooled.float().numpy()):
                    embeddings[i] = row
        columns = {"image": paths, "top": tops, "error": errors}
        if self.embedding:
            columns["embedding"] = embeddings
        return pa.Table.from_pydict(columns, schema=self.schema)


def predict_dataset(dataset, model: MobileNetV1, *, topk: int = 5, precision: str = "fp32", backend: str | None = None,
                    embedding: bool = False, actors: int | None = None, threads: int | None = None,
                    batch_size: int | None = None, exact: bool = False):
    """Classify every row of a Ray ``dataset`` and return the Dataset of results (lazy, as Ray Data is).

    ``dataset`` rows: ``path`` (a local path or fsspec URL every node can
    read), or ``bytes`` and ``path`` (``ray.data.read_binary_files(...,
    include_paths=True)``).  Result rows: ``image`` (the path), ``top`` (the
    ``topk`` classes as ``predict --json`` gives them: ``class_index``,
    ``label``, ``probability``), ``error`` (None, or why the image could not
    be decoded; ``top`` is then empty) and, with ``embedding=True``, the
    pooled fp32 ``embedding`` (1024 x alpha values; from the eager model,
    whatever ``precision`` the classifier runs at).  ``precision`` and
    ``backend`` are ``predict``'s (default backend: the fastest measured,
    "auto"; "eager" for fp32 PyTorch); int8 needs weights made int8-ready
    by ``mobilenets quantize``.  ``exact``: decode every pixel of large
    JPEGs (default: a reduced DCT scale, as ``predict`` does, so a row's
    answer is ``predict``'s for the same flags).  ``actors``, ``threads`` (per actor) and
    ``batch_size`` default to :func:`plan`'s choice for the connected cluster.
    """
    ray = _ray()
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ParameterError(f"topk must be an integer >= 1, got {topk!r}")
    if not isinstance(model, MobileNetV1):
        raise ParameterError(f"model must be a MobileNetV1 (mobilenets.load(...)), got {type(model).__name__}")
    if model.config.num_classes == 0:
        raise RayPredictError("these weights have no classifier (a feature extractor, e.g. a _no_top file); "
                              "classifying needs weights with their classification head")
    if precision == "int8":
        from . import quantize

        if quantize.from_model(model) is None:
            raise RayPredictError("int8 on Ray needs weights made int8-ready by 'mobilenets quantize' (they carry "
                                  "their own ranges); or use precision fp32 or bf16")
    if not isinstance(dataset, ray.data.Dataset):
        raise ParameterError(f"dataset must be a ray.data.Dataset, got {type(dataset).__name__}")
    columns = dataset.columns(fetch_if_missing=True) or []
    if "path" not in columns:
        raise RayPredictError(f"the dataset needs a 'path' column (and optionally 'bytes', as "
                              f"ray.data.read_binary_files(..., include_paths=True) gives), got {columns}")
    p = plan(actors, threads, batch_size)
    return dataset.map_batches(
        Classifier, batch_size=p.batch_size, batch_format="numpy", num_cpus=p.threads,
        compute=ray.data.ActorPoolStrategy(size=p.actors),
        fn_constructor_kwargs={"model": model.cpu(), "topk": topk, "precision": precision, "backend": backend,
                               "batch_size": p.batch_size, "threads": p.threads, "embedding": embedding,
                               "exact": exact})


# ---------------------------------------------------------------- files in, Parquet shards out


def list_files(source: str) -> list[str]:
    """Image files under ``source`` (a local folder or an fsspec URL), sorted, as paths or URLs the nodes can read."""
    import fsspec
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(source)
        found = fs.find(root) if fs.isdir(root) else ([root] if fs.isfile(root) else None)
    except (OSError, ValueError, ImportError) as e:
        raise RayPredictError(f"cannot list {source}: {e}") from None
    if found is None:
        raise RayPredictError(f"{source} does not exist; pass a folder or file, local or an fsspec URL (s3://...)")
    files = sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise RayPredictError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {source}")
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return files if local else [fs.unstrip_protocol(f) for f in files]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def _manifest(fs, out: str, files: list[str], shard_size: int) -> None:
    """The run's inputs, written on the first run; a resumed run must be over the same files and shard size,
    or a shard name would stand for other images."""
    path = f"{out}/{MANIFEST}"
    record = {"shard_size": shard_size, "files": files}
    if fs.exists(path):
        with fs.open(path, "r") as f:
            previous = json.load(f)
        if previous != record:
            raise RayPredictError(f"{out} holds results of another run (other files or shard size); "
                                  f"pass a new out folder, or the same inputs and shard size to resume")
        return
    fs.makedirs(out, exist_ok=True)
    _write_atomically(fs, path, json.dumps(record).encode())


def _write_atomically(fs, path: str, data: bytes) -> None:
    """Written under a temporary name, then renamed: the final name holds a complete file or nothing."""
    temporary = f"{path.rsplit('/', 1)[0]}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    with fs.open(temporary, "wb") as f:
        f.write(data)
    fs.mv(temporary, path)


def _shard_bytes(rows: list[dict], schema) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["image"])  # each shard in input order, whatever order the actors answered
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def predict_files(source: str, out: str, model: MobileNetV1, *, address: str | None = None,
                  shard_size: int = SHARD_SIZE, log=None, **options) -> dict:
    """Classify every image under ``source`` on a Ray cluster into Parquet shards under ``out``.

    ``source``/``out``: local folders or fsspec URLs.  ``address``: the
    cluster (``ray.init``'s: "auto", "HOST:PORT", "ray://..."; None: the one
    ``RAY_ADDRESS`` names, else a local one started here).  Shard k holds
    input files k x ``shard_size`` ... in sorted order; shards already in
    ``out`` are skipped, so a run that stopped resumes where it was.
    ``options`` go to :func:`predict_dataset`.  Returns a summary: shards
    written and skipped, images, errors, seconds, images/s.
    """
    from fsspec.core import url_to_fs

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ParameterError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    files = list_files(source)
    fs, root = url_to_fs(out)
    _manifest(fs, root, files, shard_size)
    shards = [files[i:i + shard_size] for i in range(0, len(files), shard_size)]
    todo = [k for k in range(len(shards)) if not fs.exists(f"{root}/{shard_name(k)}")]
    summary = {"out": out, "images": len(files), "shards": len(shards), "skipped": len(shards) - len(todo),
               "written": 0, "errors": 0, "seconds": 0.0, "images_per_s": None}
    if not todo:
        return summary
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        shard_of = {f: k for k in todo for f in shards[k]}
        dataset = ray.data.from_items([{"path": f} for f in shard_of])
        results = predict_dataset(dataset, model, **options)
        pending: dict[int, list[dict]] = {k: [] for k in todo}
        schema = None
        start = time.perf_counter()
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            schema = batch.schema
            for row in batch.to_pylist():
                k = shard_of[row["image"]]
                pending[k].append(row)
                summary["errors"] += row["error"] is not None
                if len(pending[k]) == len(shards[k]):  # the shard is complete: write it, forget its rows
                    _write_atomically(fs, f"{root}/{shard_name(k)}", _shard_bytes(pending.pop(k), schema))
                    summary["written"] += 1
                    if log:
                        log(f"wrote {shard_name(k)} ({summary['written']}/{len(todo)})")
        seconds = time.perf_counter() - start
    finally:
        if started_here:
            ray.shutdown()
    if pending:  # Ray returns each row once; a shard left incomplete means rows went missing
        raise RayPredictError(f"rows missing from shards {sorted(pending)}; run again with the same out to redo them")
    done = sum(len(shards[k]) for k in todo)
    summary.update(seconds=round(seconds, 3), images_per_s=round(done / seconds, 2) if seconds else None)
    return summary


def read_results(out: str):
    """Every shard under ``out`` as one pyarrow Table, in input order."""
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(out)
    names = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("shard-"))
    if not names:
        raise RayPredictError(f"no result shards in {out}")
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(fs.open(n, "rb")) for n in names])
