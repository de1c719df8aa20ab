"""Batch inference on Ray Data (mobilenets.ray_predict) on a two-node cluster built here, loopback only.

Kept lean for 2 busy cores (the whole file runs in about three minutes, most
of it Ray starting processes): MobileNet 0.25 at 64 px, thirteen files.
The expected answers come from ``predict`` in this process, the path the
Ray actors must agree with, and from the model itself for the embedding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

import mobilenets  # noqa: E402
from mobilenets import quantize, ray_predict  # noqa: E402
from mobilenets.images import eval_transform, load_rgb  # noqa: E402
from mobilenets.predict import predict  # noqa: E402

from ray_cluster import Cluster  # noqa: E402
from weights_helpers import Server, small_converted  # noqa: E402

RUN_TIMEOUT_S = 240
RTOL = 1e-5


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return small_converted(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Twelve images whose answers differ (each its own pattern and size), and a broken file among them."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(12):
        h, w = 56 + 7 * i, 90 - 3 * i
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * (13 - i)) % 256, ((xx + yy) * 5 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.{'png' if i % 3 == 0 else 'jpg'}")
    (folder / "05-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")  # sorts in the middle
    return folder


@pytest.fixture(scope="module")
def ready_file(weights_file, folder, tmp_path_factory):
    """The same weights made int8-ready (mobilenets quantize): they carry their activation ranges."""
    from mobilenets import deploy

    model = mobilenets.load(weights_file)
    calibration, _ = deploy.image_batches(folder, 64)
    # the quickest preparation (10 s here, against 100 s for the defaults): what is tested is that the actors
    # use the file's own ranges, however they were chosen
    ready = quantize.prepare_int8(model, calibration, method="minmax", rounding="nearest", equalize=False,
                                  bias_correction=False)
    return quantize.save(ready, model, tmp_path_factory.mktemp("ready") / "ready.safetensors")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("ray"), cpus_per_node=2)
    patch = pytest.MonkeyPatch()
    try:
        for name, value in cluster.driver_env.items():  # for this process's driver and the CLI's
            patch.setenv(name, value)
        cluster.start()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        patch.undo()
    assert not cluster.processes(), "the cluster's processes outlived it"


def paths(folder) -> list[str]:
    return sorted(str(p) for p in folder.iterdir())


def by_image(rows) -> dict[str, dict]:
    rows = list(rows)
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)), "an image came back twice"
    return {r["image"]: r for r in rows}


def predicted(model, folder, **options) -> dict[str, list[dict]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predict skips the broken file with a warning
        return {p.image: p.top for p in predict(model, [folder], batch_size=4, workers=0, **options)}


def assert_same_answers(answers: dict[str, list[dict]], expected: dict[str, list[dict]]) -> None:
    """The same classes in the same order for every image, and the same probabilities to float32 rounding.

    The actors run on one thread each, this process on two: eager PyTorch sums in another order, which moved
    fp32 probabilities by up to 5.8e-7 of their value here (OpenVINO bf16 and ONNX Runtime int8: not at
    all).  A wrong preprocessing moves them by far more: one grey level added to every pixel changed each
    image's by at least 2.2e-4 relative (fp32, these images and weights).  RTOL sits between the two.
    """
    assert set(answers) == set(expected)
    for image, top in answers.items():
        assert [(t["class_index"], t["label"]) for t in top] == \
            [(t["class_index"], t["label"]) for t in expected[image]], image
        np.testing.assert_allclose([t["probability"] for t in top], [t["probability"] for t in expected[image]],
                                   rtol=RTOL, err_msg=image)


def test_plan_fills_the_cluster(cluster):
    # two nodes of 2 cores: one thread per actor (a node's cores / 4, at least 1), so four actors
    assert ray_predict.plan() == ray_predict.Plan(actors=4, threads=1, batch_size=32)
    assert ray_predict.plan(actors=3, batch_size=8) == ray_predict.Plan(actors=3, threads=1, batch_size=8)


def test_fp32_rows_equal_predict_with_a_worker_killed_mid_run_and_a_broken_file_as_a_row(cluster, weights_file,
                                                                                        folder):
    def slow(row):  # a slow source (object storage, say): rows reach the actors over seconds, not at once
        import time  # (a local function: the workers cannot import this test module, Ray sends its code)

        time.sleep(0.3)
        return row

    model = mobilenets.load(weights_file)
    dataset = ray.data.read_binary_files(str(folder), include_paths=True).map(slow)  # bytes, as read from storage
    results = ray_predict.predict_dataset(dataset, model, topk=3, backend="eager", actors=2, threads=1, batch_size=2,
                                          embedding=True)
    stream = iter(results.iter_rows())
    first = next(stream)  # mid-run: one answer out, most rows still on their way
    victims = cluster.workers("Classifier")
    assert victims, "no classifier actor to kill"
    os.kill(victims[0], signal.SIGKILL)
    rows = by_image([first, *stream])  # Ray restarts the actor and retries its batches: each row exactly once
    assert victims[0] not in cluster.workers("Classifier")

    check_rows(rows, predicted(model, folder, topk=3, backend="eager"), folder)
    for image, row in rows.items():  # the pooled features, from the model on the evaluation crop
        x = eval_transform(load_rgb(image), 64, model.meta.normalization)[None]
        with torch.no_grad():
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)[0]
        assert len(row["embedding"]) == 256  # 1024 x alpha 0.25
        np.testing.assert_allclose(row["embedding"], pooled.numpy(), rtol=1e-5, atol=1e-6)


def check_rows(rows: dict[str, dict], expected: dict[str, list[dict]], folder) -> None:
    """Every file once; the broken one a row with its error; the others predict's answers."""
    assert set(rows) == set(paths(folder))
    broken = rows.pop(str(folder / "05-broken.jpg"))
    assert "cannot decode" in broken["error"] and not broken["top"]
    assert all(row["error"] is None for row in rows.values())
    assert_same_answers({image: row["top"] for image, row in rows.items()}, expected)
    # the images differ in answer, so rows swapped between images would show
    assert len({round(row["top"][0]["probability"], 7) for row in rows.values()}) == len(rows)


@pytest.mark.parametrize("precision, backend", [("bf16", "openvino"), ("int8", "onnxruntime")])
def test_rows_equal_predict_at_bf16_and_int8(cluster, weights_file, ready_file, folder, precision, backend):
    pytest.importorskip(backend)
    model = mobilenets.load(ready_file if precision == "int8" else weights_file)
    dataset = ray.data.from_items([{"path": p} for p in paths(folder)])  # paths: each actor reads its files
    results = ray_predict.predict_dataset(dataset, model, topk=3, precision=precision, backend=backend, actors=1,
                                          threads=1, batch_size=4)
    check_rows(by_image(results.take_all()), predicted(model, folder, topk=3, precision=precision, backend=backend),
               folder)


def run_cli(cluster, weights_file, folder, out) -> dict:
    command = [sys.executable, "-m", "mobilenets", "predict", "--ray", cluster.address, str(folder), "--out", str(out),
               "--weights", str(weights_file), "--backend", "eager", "--topk", "2", "--shard-size", "4",
               "--actors", "2", "--threads", "1", "--batch-size", "2", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_parquet_shards_and_a_second_run_by_the_cli_does_only_what_is_missing(cluster, weights_file, folder,
                                                                             tmp_path):
    out = tmp_path / "out"
    model = mobilenets.load(weights_file)
    first = ray_predict.predict_files(str(folder), str(out), model, shard_size=4, backend="eager", topk=2,
                                      actors=2, threads=1, batch_size=2)  # on the cluster this process is on
    assert (first["images"], first["shards"], first["written"], first["skipped"], first["errors"]) == (13, 4, 4, 0, 1)
    shards = sorted(out.glob("shard-*.parquet"))
    assert [s.name for s in shards] == [ray_predict.shard_name(k) for k in range(4)]
    table = ray_predict.read_results(str(out))
    assert table.column("image").to_pylist() == paths(folder)  # every file once, in input order
    expected = predicted(model, folder, topk=2, backend="eager")
    answers = {r["image"]: r["top"] for r in table.to_pylist() if r["error"] is None}
    assert_same_answers(answers, expected)

    # a run that stopped: one shard never written, and the temporary file a crash mid-write leaves
    kept = {s.name: s.stat().st_mtime_ns for s in shards if s.name != ray_predict.shard_name(2)}
    (out / ray_predict.shard_name(2)).unlink()
    (out / f".tmp-deadbeef-{ray_predict.shard_name(2)}").write_bytes(b"PAR1 half a shard")
    second = run_cli(cluster, weights_file, folder, out)
    assert (second["written"], second["skipped"]) == (1, 3)
    assert {s.name: s.stat().st_mtime_ns for s in out.glob("shard-*.parquet") if s.name in kept} == kept
    assert ray_predict.read_results(str(out)).to_pylist() == table.to_pylist()

    again = run_cli(cluster, weights_file, folder, out)  # nothing left: no cluster work at all
    assert (again["written"], again["skipped"]) == (0, 4)



def test_an_fsspec_url_source_is_listed_and_read_over_its_protocol_by_the_actors(cluster, weights_file, folder,
                                                                               tmp_path):
    # HTTP stands for s3:// and gs:// (the suite reaches no cloud): a protocol fsspec serves, that no node reads
    # as a local path.  The server sees every image asked for by URL; the answers are predict's on the files.
    server = Server(folder.parent)
    try:
        source = f"{server.url}{folder.name}/"
        model = mobilenets.load(weights_file)
        summary = ray_predict.predict_files(source, str(tmp_path / "out"), model, shard_size=5, backend="eager",
                                            topk=2, actors=2, threads=1, batch_size=2)
        asked = set(server.requests)
    finally:
        server.close()
    assert (summary["images"], summary["written"], summary["errors"]) == (13, 3, 1)
    names = [os.path.basename(p) for p in paths(folder)]
    rows = ray_predict.read_results(str(tmp_path / "out")).to_pylist()
    assert [r["image"] for r in rows] == [source + name for name in names]  # every URL once, in input order
    assert {f"/{folder.name}/{name}" for name in names} <= asked  # fetched over HTTP, not found on disk
    check_rows({str(folder / r["image"].rsplit("/", 1)[1]): r for r in rows},
               predicted(model, folder, topk=2, backend="eager"), folder)

def test_cli_refuses_an_out_folder_of_other_inputs_in_one_line(weights_file, folder, tmp_path, capsys):
    from mobilenets import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / ray_predict.MANIFEST).write_text(json.dumps({"shard_size": 4, "files": ["elsewhere.jpg"]}))
    argv = ["predict", "--ray", str(folder), "--out", str(out), "--weights", str(weights_file), "--shard-size", "4"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "Traceback" not in err
    assert cli.main(["predict", "--ray", str(folder), "--weights", str(weights_file)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("exact", [False, True])
def test_an_actor_decodes_large_jpegs_as_predict_does_with_the_same_flags(weights_file, tmp_path, exact):
    # Real camera photos large enough for predict's reduced-scale decoding at this model's resolution (64: a
    # shorter side of 73 suffices, these are 300-512), so the rows would differ from predict's if the actors
    # decoded otherwise. Run in this process: the decoding is the actor's own code, no cluster needed.
    from skimage import data

    for name in ("coffee", "astronaut", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.jpg", quality=92)
    model = mobilenets.load(weights_file)
    classify = ray_predict.Classifier(model, topk=3, precision="fp32", backend="eager", batch_size=4,
                                      threads=torch.get_num_threads(), embedding=False, exact=exact)
    table = classify({"path": np.array(paths(tmp_path))})
    rows = {row["image"]: row["top"] for row in table.to_pylist()}
    assert_same_answers(rows, predicted(model, tmp_path, topk=3, backend="eager", exact=exact))
    # the fixture can show the difference: the other decoding moves the probabilities by more than RTOL
    other = predicted(model, tmp_path, topk=3, backend="eager", exact=not exact)
    with pytest.raises(AssertionError):
        assert_same_answers(rows, other)
