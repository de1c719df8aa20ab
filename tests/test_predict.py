"""Classifying images: preprocessing from the weights' metadata, any image mode, batching, top-k, CLI output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mobilenets
from mobilenets import checkpoint, cli, weights
from mobilenets.errors import MobilenetsError
from mobilenets.images import IMAGENET, INCEPTION, Normalization, eval_transform, load_rgb
from mobilenets.predict import predict

from weights_helpers import Server, small_converted, write_keras2_h5


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return small_converted(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images in every mode a user may have, one in a subfolder, one of them odd-sized."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (70, 90), dtype=np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.tiff")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 200)).save(folder / "deep16.png")
    (folder / "sub").mkdir()
    Image.fromarray(rgb[:40, :33]).save(folder / "sub" / "small.bmp")
    return folder


def expected_probabilities(model, path, resolution, normalization):
    x = eval_transform(load_rgb(path), resolution, normalization)[None]
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0]


def test_folder_in_every_mode_with_preprocessing_from_metadata(weights_file, images):
    model = mobilenets.load(weights_file)
    assert model.meta.resolution == 64
    results = list(predict(model, [images], topk=3, batch_size=4))
    assert len(results) == 7
    assert [r.image for r in results] == sorted(r.image for r in results)  # folder order, recursive
    for r in results:
        p = expected_probabilities(model, r.image, 64, INCEPTION)
        values, indices = p.topk(3)
        assert [t["class_index"] for t in r.top] == indices.tolist()
        assert np.allclose([t["probability"] for t in r.top], values.tolist(), atol=1e-6)
        assert [t["label"] for t in r.top] == [model.meta.labels[i] for i in indices.tolist()]
        probs = [t["probability"] for t in r.top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_batching_does_not_change_results(weights_file, images):
    model = mobilenets.load(weights_file)
    one = list(predict(model, [images], topk=5, batch_size=1))
    many = list(predict(model, [images], topk=5, batch_size=3))
    for a, b in zip(one, many):
        assert a.image == b.image
        assert [t["class_index"] for t in a.top] == [t["class_index"] for t in b.top]
        assert np.allclose([t["probability"] for t in a.top], [t["probability"] for t in b.top], atol=1e-5)


def trained_like(weights_file, num_classes):
    """A model whose outputs depend on its input: the helper file's body (a fresh init gives near-uniform
    probabilities whatever the preprocessing), a fresh head of ``num_classes``."""
    torch.manual_seed(0)  # the head's initialisation
    model = mobilenets.mobilenet_v1(0.25, num_classes=num_classes, padding="tf_same")
    body = {k: v for k, v in mobilenets.load(weights_file).state_dict().items() if not k.startswith("classifier")}
    model.load_state_dict(body, strict=False)
    with torch.no_grad():
        model.classifier.weight.mul_(3)  # confident but not saturated answers
    return model.eval()


def test_checkpoint_metadata_drives_resolution_normalization_and_labels(tmp_path, images, weights_file):
    model = trained_like(weights_file, 3)
    labels = ["cat", "dog", "fish"]
    checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(),
                     "state_dict": model.state_dict(),
                     "meta": {"resolution": 80, "normalization": IMAGENET.to_dict(), "labels": labels, "source": "t"}},
                    tmp_path / "c.pt")
    loaded = mobilenets.load(tmp_path / "c.pt")
    [r] = predict(loaded, [images / "rgb.jpg"], topk=10)
    assert len(r.top) == 3  # top-k is clipped to the number of classes
    p = expected_probabilities(loaded, images / "rgb.jpg", 80, IMAGENET)
    assert np.allclose([t["probability"] for t in r.top], p.sort(descending=True).values.tolist(), atol=1e-6)
    # the preprocessing matters to this model: another normalisation gives answers 100x beyond the tolerance
    assert (expected_probabilities(loaded, images / "rgb.jpg", 80, INCEPTION) - p).abs().max() > 1e-4
    assert {t["label"] for t in r.top} == set(labels)


def test_a_model_without_metadata_uses_224_px_and_x_over_127_5_minus_1(images, weights_file):
    """A model that lost its meta (empty): predict falls back to the official weights' preprocessing."""
    model = trained_like(weights_file, 4)
    del model.meta
    [r] = predict(model, [images / "rgb.jpg"], topk=4)
    p = expected_probabilities(model, images / "rgb.jpg", 224, Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert np.allclose([t["probability"] for t in r.top], p.sort(descending=True).values.tolist(), atol=1e-6)
    assert (expected_probabilities(model, images / "rgb.jpg", 224, IMAGENET) - p).abs().max() > 1e-4


def test_no_top_weights_cannot_classify(tmp_path, images):
    src = write_keras2_h5(tmp_path / "mobilenet_2_5_128_tf_no_top.h5", 0.25, include_top=False)
    model = weights.convert("keras", src).model()
    with pytest.raises(ValueError, match="no classifier"):
        list(predict(model, [images]))


def test_cli_json_one_object_per_image(weights_file, images, capsys):
    assert cli.main(["predict", str(images / "rgb.jpg"), str(images / "sub"), "--weights", str(weights_file),
                     "--topk", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    objs = [json.loads(line) for line in lines]
    assert [o["image"] for o in objs] == [str(images / "rgb.jpg"), str(images / "sub" / "small.bmp")]
    for o in objs:
        assert set(o) == {"image", "top"} and len(o["top"]) == 2
        assert all(set(t) == {"class_index", "label", "probability"} for t in o["top"])
        assert isinstance(o["top"][0]["class_index"], int) and 0 < o["top"][0]["probability"] <= 1


@pytest.mark.parametrize("name", ["absolute", "a.safetensors", "z.safetensors"])
def test_cli_predict_classifies_with_the_weights_file_it_names(weights_file, images, tmp_path, monkeypatch, capsys,
                                                              name):
    """``--weights FILE`` answers with that file's model (0.25 wide, 64 px, Inception scaling), whether its path
    sorts before or after the word "imagenet" (which alone means the released weights)."""
    arg = str(weights_file)
    if name != "absolute":
        (tmp_path / name).write_bytes(weights_file.read_bytes())
        monkeypatch.chdir(tmp_path)
        arg = name
    assert cli.main(["predict", str(images / "rgb.jpg"), "--weights", arg, "--topk", "3", "--json"]) == 0
    [answer] = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    values, indices = expected_probabilities(mobilenets.load(weights_file), images / "rgb.jpg", 64, INCEPTION).topk(3)
    assert [t["class_index"] for t in answer["top"]] == indices.tolist()
    assert np.allclose([t["probability"] for t in answer["top"]], values.tolist(), atol=1e-6)


def test_cli_table_is_readable(weights_file, images, capsys):
    assert cli.main(["predict", str(images / "gray.png"), "--weights", str(weights_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(images / "gray.png") and len(out) == 6  # the image, then the default top 5
    rank, index, percent, *label = out[1].split()
    assert rank == "1" and index.isdigit() and percent.endswith("%") and label


def test_cli_int8_with_int8_ready_weights_needs_no_calibration_images(weights_file, images, tmp_path, capsys,
                                                                      monkeypatch):
    from mobilenets import deploy, quantize

    model = mobilenets.load(weights_file)
    calibration, _ = deploy.image_batches(images, 64)
    ready = quantize.save(quantize.prepare_int8(model, calibration), model, tmp_path / "ready.safetensors")
    argv = ["predict", str(images / "rgb.jpg"), "--precision", "int8", "--backend", "onnxruntime", "--json"]
    assert cli.main([*argv, "--weights", str(weights_file)]) == 2  # float weights: nothing to take ranges from
    assert "--calib-data" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated although the weights carry their int8 ranges")

    monkeypatch.setattr(quantize, "prepare_int8", refuse)
    assert cli.main([*argv, "--weights", str(ready)]) == 0
    answer = json.loads(capsys.readouterr().out)
    calibrated = next(predict(mobilenets.load(ready), images / "rgb.jpg", precision="int8", backend="onnxruntime",
                              calibration=images))
    assert answer["top"] == calibrated.to_dict()["top"]  # the file's ranges, with or without calibration images


def test_cli_int8_prepares_once_then_reads_the_cache(weights_file, images, tmp_path, capsys, monkeypatch):
    """The second predict --precision int8 of the same weights and calibration folder prepares nothing (it
    says so on stderr, unless --quiet) and answers as the first."""
    from mobilenets import quantize

    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    argv = ["predict", str(images / "rgb.jpg"), "--weights", str(weights_file), "--precision", "int8",
            "--backend", "onnxruntime", "--calib-data", str(images), "--json"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert "int8: preparing the weights on" in first.err and str(tmp_path / "cache" / "int8") in first.err

    def refuse(*args, **kwargs):
        raise AssertionError("prepared again although the cache holds this preparation")

    monkeypatch.setattr(quantize, "prepare_int8", refuse)
    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert "int8: the preparation of these weights on these calibration images, from" in second.err
    assert json.loads(second.out) == json.loads(first.out)
    assert cli.main([*argv, "--quiet"]) == 0 and capsys.readouterr().err == ""


def test_cli_bad_inputs_fail_in_one_line(weights_file, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    for argv, needle in [
        ([str(broken)], "cannot decode image"),
        ([str(tmp_path / "missing.png")], "does not exist"),
        ([str(images / "rgb.jpg"), "--topk", "0"], "integer >= 1"),
    ]:
        assert cli.main(["predict", *argv, "--weights", str(weights_file)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0, err


def test_a_broken_file_in_a_folder_is_skipped_with_a_warning(weights_file, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((images / "rgb.jpg").read_bytes())
    (folder / "b.jpg").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping .*b.jpg"):
        results = list(predict(mobilenets.load(weights_file), [folder]))
    assert [r.image for r in results] == [str(folder / "a.jpg")]


@pytest.mark.parametrize("alpha, served_name", [(["--alpha", "0.25"], "mobilenet_2_5_128_tf"),
                                                ([], "mobilenet_1_0_128_tf")])
def test_cli_imagenet_weights_from_the_server(tmp_path, images, monkeypatch, capsys, alpha, served_name):
    """``--weights imagenet`` fetches the release of the width asked for, 1.0 when none is (the README's
    command), converts it once into the cache, and answers as that model does."""
    served = tmp_path / "served"
    served.mkdir()
    write_keras2_h5(served / f"{served_name}.h5", 0.25 if alpha else 1.0, seed=9)
    server = Server(served)
    try:
        monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
        monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
        # a real command line's words are new strings, never the literal "imagenet" object: built so here
        argv = ["predict", str(images / "rgb.jpg"), "--weights", "".join(["image", "net"]), *alpha,
                "--resolution", "128", "--json", "-q"]
        assert cli.main(argv) == 0
        first = json.loads(capsys.readouterr().out)
        assert cli.main(argv) == 0  # the second run uses the cached conversion
        assert json.loads(capsys.readouterr().out) == first
        assert server.requests == [f"/{served_name}.h5"]
    finally:
        server.close()
    model = mobilenets.load(tmp_path / "cache" / f"{served_name}.safetensors")
    assert model.config.alpha == (0.25 if alpha else 1.0)
    p = expected_probabilities(model, images / "rgb.jpg", 128, INCEPTION)
    assert first["top"][0]["class_index"] == int(p.argmax())


# ---------------------------------------------------------------- inputs of every kind, the worker pipeline


def test_a_single_path_a_pil_image_and_tensors_are_one_image_each(weights_file, images):
    model = mobilenets.load(weights_file)
    path = images / "rgb.jpg"
    (by_path,) = predict(model, str(path), topk=3)  # a string is a path, not a list of characters
    assert by_path.image == str(path)
    pil = load_rgb(path)
    (by_pil,) = predict(model, pil, topk=3)
    uint8 = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # as torchvision.io.read_image gives
    by_uint8 = list(predict(model, torch.stack([uint8, uint8]), topk=3))
    prep = eval_transform(pil, 64, INCEPTION)
    (by_float,) = predict(model, prep, topk=3)
    for r in [by_pil, *by_uint8, by_float]:
        assert [t["class_index"] for t in r.top] == [t["class_index"] for t in by_path.top]
        assert np.allclose([t["probability"] for t in r.top], [t["probability"] for t in by_path.top], atol=1e-6)
    mixed = list(predict(model, [path, pil, prep], topk=3))
    assert [r.image for r in mixed] == [str(path), "<image 1>", "<tensor 2>"]
    with pytest.raises(ValueError, match="3 x 64 x 64"):
        list(predict(model, torch.zeros(3, 32, 32)))
    with pytest.raises(ValueError, match="cannot classify a int"):
        list(predict(model, [3]))


def test_each_answer_names_an_input_given_in_memory_by_its_position(weights_file, images):
    """A result names its image: the path, or for an image given in memory its position among all the inputs,
    "<image k>" for a PIL image and "<tensor k>" for each image of a uint8 or float tensor, counted across the
    whole list (the answers come in input order)."""
    model = mobilenets.load(weights_file)
    path = images / "rgb.jpg"
    pil = load_rgb(path)
    uint8 = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    prep = eval_transform(pil, 64, INCEPTION)
    alone = [r.image for r in predict(model, torch.stack([uint8] * 3), topk=1)]
    assert alone == ["<tensor 0>", "<tensor 1>", "<tensor 2>"]
    mixed = [r.image for r in predict(model, [path, torch.stack([uint8] * 3), pil, torch.stack([prep] * 2)], topk=1)]
    assert mixed == [str(path), "<tensor 1>", "<tensor 2>", "<tensor 3>", "<image 4>", "<tensor 5>", "<tensor 6>"]
    # a non-finite input is named by that same position: the second image of the last tensor here
    bad = torch.stack([prep] * 2)
    bad[1, 0, 5, 5] = float("nan")
    with pytest.raises(MobilenetsError, match=r"^input tensor 6 holds NaN or infinite values"):
        list(predict(model, [path, torch.stack([uint8] * 3), pil, bad], topk=1))


def test_predicts_progress_counts_every_image_answered_or_skipped(weights_file, images, tmp_path, monkeypatch):
    """Five photos and one file that is no image, in batches of two: predict's progress counts all six, the
    skipped one too, batch by batch, and its line ends at 6/6 images."""
    from mobilenets import progress

    folder = tmp_path / "mixed"
    folder.mkdir()
    for k in range(5):
        (folder / f"{k}.jpg").write_bytes((images / "rgb.jpg").read_bytes())
    (folder / "5.jpg").write_bytes(b"not a jpeg")
    seen = []
    advance = progress.Progress.advance

    def recorded(self, n=1):
        advance(self, n)
        seen.append((self.what, self.done, self.line()))

    monkeypatch.setattr(progress.Progress, "advance", recorded)
    with pytest.warns(UserWarning, match="skipping"):
        answered = list(predict(mobilenets.load(weights_file), [folder], batch_size=2, log=lambda line: None))
    done = [d for what, d, _ in seen if what == "predict"]
    assert len(answered) == 5 and done[-1] == 6 and done == sorted(done) and len(set(done)) >= 3, seen
    assert " 6/6 images" in seen[-1][2]


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 3, 8, 8, 1)])
def test_a_tensor_that_is_not_one_image_or_a_batch_of_them_is_refused_saying_which_shapes_work(weights_file, shape):
    message = f"a tensor must be (3, H, W) or (N, 3, H, W), got {shape}"
    with pytest.raises(MobilenetsError, match="^" + re.escape(message)):
        list(predict(mobilenets.load(weights_file), torch.rand(shape)))


@pytest.mark.parametrize("count", [1, 255, 400])
def test_fp32_with_no_backend_asks_auto_with_the_number_of_images(weights_file, monkeypatch, count):
    """With no backend named, predict leaves the choice to deploy.compile's "auto" and tells it the job's size
    (auto keeps eager PyTorch when no build would pay for itself: test_progress); batches no larger than the job.
    The stand-in runtime is the eager model, so the answers are checked too."""
    from mobilenets import deploy

    model = mobilenets.load(weights_file)
    calls = []

    def compile(m, **kwargs):
        calls.append((kwargs["backend"], kwargs["work"], kwargs["batch_size"]))
        return deploy.Predictor(lambda x: m(x).detach(), backend="eager", precision="fp32",
                                batch_size=kwargs["batch_size"], resolution=kwargs["resolution"])

    monkeypatch.setattr(deploy, "compile", compile)
    x = torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = list(predict(model, x, topk=1, batch_size=128, workers=0))
    assert calls == [("auto", count, min(128, count))]
    with torch.inference_mode():
        assert [r.top[0]["class_index"] for r in got] == model.eval()(x).argmax(1).tolist()


@pytest.mark.skipif(not __import__("importlib.util").util.find_spec("openvino"), reason="needs the deploy extra")
def test_streamed_runtime_keeps_order_around_batches_that_all_fail(weights_file, tmp_path):
    """OpenVINO runs several batches at once (Predictor.stream): answers, and the files skipped, still come in
    input order, batches of nothing but broken files in the middle and at the end included; each
    answer is the eager model's on the same image (fp32, OpenVINO normalising the uint8 pixels in its graph)."""
    model = mobilenets.load(weights_file)
    rng = np.random.default_rng(3)
    names = [f"{i:02d}.jpg" for i in range(16)]
    # batches of 3: two of nothing but broken files in a row (03-08), and the last, of one broken file (15)
    broken = {f"{i:02d}.jpg" for i in (3, 4, 5, 6, 7, 8, 15)}
    for name in names:
        if name in broken:
            (tmp_path / name).write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 256, (40 + int(name[:2]), 56, 3), dtype=np.uint8)).save(tmp_path / name)
    skipped = []
    got = list(predict(model, tmp_path, topk=3, batch_size=3, workers=2, backend="openvino",
                       on_skip=lambda image, why: skipped.append(Path(image).name)))
    expected = list(predict(model, tmp_path, topk=3, batch_size=3, workers=0, backend="eager",
                            on_skip=lambda image, why: None))
    assert skipped == sorted(broken)
    assert [r.image for r in got] == [r.image for r in expected] == [str(tmp_path / n) for n in names
                                                                      if n not in broken]
    for g, e in zip(got, expected):
        assert [t["class_index"] for t in g.top] == [t["class_index"] for t in e.top]
        assert [t["probability"] for t in g.top] == pytest.approx([t["probability"] for t in e.top], abs=1e-4)


def test_workers_and_batching_equal_the_per_image_path(weights_file, tmp_path):
    # 23 JPEGs and one broken file in a folder, 3 workers, batches of 4: same labels, order and probabilities
    model = mobilenets.load(weights_file)
    rng = np.random.default_rng(1)
    for i in range(23):
        Image.fromarray(rng.integers(0, 256, (50 + i, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.jpg")
    (tmp_path / "10b.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="10b.jpg"):
        results = list(predict(model, tmp_path, topk=2, batch_size=4, workers=3, exact=True))
    assert [r.image for r in results] == [str(tmp_path / f"{i:02d}.jpg") for i in range(23)]
    for r in results:
        p = expected_probabilities(model, r.image, 64, INCEPTION)
        values, indices = p.topk(2)
        assert [t["class_index"] for t in r.top] == indices.tolist()
        assert np.allclose([t["probability"] for t in r.top], values.tolist(), atol=1e-6)


def test_decoding_workers_start_before_the_model_is_built_and_end_with_a_failed_build(weights_file, tmp_path,
                                                                                       monkeypatch):
    """The workers decode while the runtime is built (setup overlaps); if building fails, none is left."""
    import multiprocessing

    from mobilenets import predict as predict_module

    model = mobilenets.load(weights_file)
    rng = np.random.default_rng(2)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.jpg")
    real_runner, alive = predict_module.runner, []

    def runner(*args, **kwargs):
        alive.append(len(multiprocessing.active_children()))
        return real_runner(*args, **kwargs)

    monkeypatch.setattr(predict_module, "runner", runner)
    assert len(list(predict(model, tmp_path, batch_size=2, workers=2))) == 12
    assert alive == [2]

    def broken(*args, **kwargs):
        raise mobilenets.MobilenetsError("no runtime")

    monkeypatch.setattr(predict_module, "runner", broken)
    with pytest.raises(mobilenets.MobilenetsError, match="no runtime"):
        list(predict(model, tmp_path, batch_size=2, workers=2))
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


def test_large_blocks_are_mapped_whole_once_the_pipeline_runs(weights_file, tmp_path, monkeypatch):
    """Batches of tens of megabytes fragmented glibc's heap in 2 runs of 3 (predict grew to 3.2 GB over 4,000
    images, benchmarks/predict_memory.py): the pipeline fixes the mmap threshold for them, once a process."""
    from mobilenets import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "bound_heap", lambda: calls.append(1))
    Image.new("RGB", (40, 50)).save(tmp_path / "a.png")
    assert len(list(pipeline.batches([tmp_path / "a.png"], resolution=32, workers=0))) == 1 and calls == [1]
    monkeypatch.undo()
    if sys.platform.startswith("linux"):  # glibc: the call is real here, and what it sets is the threshold
        import ctypes

        set_params = []
        monkeypatch.setattr(ctypes, "CDLL", lambda name: type("libc", (), {
            "mallopt": staticmethod(lambda param, value: set_params.append((param, value)) or 1)}))
        pipeline.bound_heap.cache_clear()
        assert pipeline.bound_heap() and set_params == [(-3, 1 << 20)]  # M_MMAP_THRESHOLD, 1 MiB
        pipeline.bound_heap.cache_clear()


def test_a_compiled_runtime_gives_the_eager_answers(weights_file, images):
    pytest.importorskip("onnxruntime")
    model = mobilenets.load(weights_file)
    eager = list(predict(model, images, topk=3, batch_size=3, backend="eager"))
    compiled = list(predict(model, images, topk=3, batch_size=3, backend="onnxruntime"))
    assert [r.image for r in compiled] == [r.image for r in eager]
    for a, b in zip(eager, compiled):
        assert [t["class_index"] for t in a.top] == [t["class_index"] for t in b.top]
        assert np.allclose([t["probability"] for t in a.top], [t["probability"] for t in b.top], atol=1e-4)


def test_decode_predictions_matches_softmax_topk():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    top = mobilenets.predict.decode_predictions(logits, k=2, labels=["a", "b", "c"])
    e = np.exp([0.0, 2.0, 1.0])
    assert [t["label"] for t in top[0]] == ["b", "c"] and top[1][0]["label"] == "a"
    assert np.isclose(top[0][0]["probability"], e[1] / e.sum())
    imagenet = mobilenets.predict.decode_predictions(torch.eye(1000)[[281]] * 10, k=1)
    assert imagenet[0][0]["label"] == weights.imagenet_labels()[281]
    # one image's logits, 1-d (what model(x)[0] gives): one row of answers, the same as its batch of one
    single = mobilenets.predict.decode_predictions(logits[0], k=2, labels=["a", "b", "c"])
    assert single == top[:1]


@pytest.mark.parametrize("count", [2, 4])
def test_labels_that_do_not_name_each_class_once_are_refused(count):
    # three classes: two labels leave one unnamed, four name a class the logits do not have
    with pytest.raises(MobilenetsError, match=f"labels must name each of the 3 classes, got {count} labels"):
        mobilenets.predict.decode_predictions(torch.zeros(1, 3), labels=[str(i) for i in range(count)])


def test_a_named_file_that_is_no_image_is_an_error_while_one_in_a_folder_is_skipped(weights_file, images,
                                                                                  tmp_path):
    """The user named the file: not decoding it is an error that names it.  Found in a folder, it is skipped
    with a warning and the folder's other images are answered."""
    from mobilenets.images import ImageError

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((images / "rgb.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    model = mobilenets.load(weights_file)
    with pytest.raises(ImageError, match="broken.jpg"):
        list(predict(model, folder / "broken.jpg"))
    with pytest.warns(UserWarning, match="skipping .*broken.jpg"):
        assert [r.image for r in predict(model, folder)] == [str(folder / "a.jpg")]


def test_int8_from_float_weights_without_calibration_images_says_what_would_work(weights_file, images):
    with pytest.raises(MobilenetsError, match=r"^int8 needs calibration images \(--calib-data DIR.*or weights made "
                                              r"int8-ready by 'mobilenets quantize'"):
        list(predict(mobilenets.load(weights_file), images / "rgb.jpg", precision="int8", backend="onnxruntime"))


def test_the_table_gives_each_class_its_softmax_probability_in_percent():
    """Logits ln 6, ln 3, ln 1 have softmax 0.6, 0.3, 0.1 (written out: e^l / sum e^l = 6/10, 3/10, 1/10): the
    table shows rank, class index, 60.00% etc. and the label, one line per class under the image's name."""
    import math

    logits = torch.tensor([[math.log(3), math.log(1), math.log(6)]])
    top = mobilenets.predict.decode_predictions(logits, k=3, labels=["tench", "goldfish", "great white shark"])
    table = list(mobilenets.predict.format_table([mobilenets.predict.Prediction("fish.jpg", top[0])]))
    assert table == ["fish.jpg",
                     "   1     2   60.00%  great white shark",
                     "   2     0   30.00%  tench",
                     "   3     1   10.00%  goldfish"]


def test_a_long_strip_is_classified_in_bounded_memory(tmp_path):
    # a 1 x 100000 PNG is a few hundred bytes; resizing its short side to 256 before cropping asked ~20 GB
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 100_000, 3), 200, np.uint8)).save(strip)
    assert strip.stat().st_size < 2000
    script = ("import resource, sys; from mobilenets import images; im = images.load_rgb(sys.argv[1]); "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              "x = images.eval_transform(im, 224); assert tuple(x.shape) == (3, 224, 224); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    run = subprocess.run([sys.executable, "-c", script, str(strip)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 100_000  # kB: under 100 MB


def test_eval_transform_equals_resize_then_crop_by_torchvision():
    # torchvision's Resize + CenterCrop on the same PIL image; sizes where both centre the crop alike (torchvision
    # rounds an odd margin up, TF-slim and we down)
    from torchvision import transforms

    rng = np.random.default_rng(2)
    for h, w in [(300, 450), (256, 256), (200, 300), (144, 96)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
                                        transforms.CenterCrop(224), transforms.PILToTensor()])(image)
        ours = eval_transform(image, 224, IMAGENET.__class__((0, 0, 0), (1 / 255, 1 / 255, 1 / 255)))
        assert (ours - reference.float()).abs().max() <= 1.0 + 1e-4  # at most one grey level (8-bit rounding)


def test_interrupting_predict_leaves_no_worker(weights_file, tmp_path):
    rng = np.random.default_rng(3)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    proc = subprocess.Popen([sys.executable, "-m", "mobilenets", "predict", str(tmp_path), "--weights",
                             str(weights_file), "--workers", "2", "--backend", "eager", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # it has started classifying
    children = _children(proc.pid)
    assert len(children) >= 2  # the decoding workers
    proc.send_signal(signal.SIGINT)
    # both pipes drained while waiting: the test reads one line of ~110 KB of output, and a child blocked writing
    # to a full pipe nobody reads (seen at the moment of SIGINT: wchan anon_pipe_write) is the test's hang, not
    # predict's. From SIGINT, main returns in under a second; the rest is the interpreter's own teardown of torch
    # (gdb: Py_FinalizeEx's garbage collection), seconds on a loaded machine.
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    time.sleep(1)
    assert [c for c in children if os.path.exists(f"/proc/{c}")] == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_large_jpegs_decode_at_the_coarsest_dct_scale_keeping_the_resize_size_unless_exact(
        weights_file, tmp_path, decoded_sizes):
    """At resolution 64 the resize size is 73 (64 / 0.875): by default a 640 x 480 photo decodes at 1/4
    (160 x 120, 120 >= 73), not 1/8 (80 x 60, short of it) nor 1/2 (twice the resize size, the earlier rule);
    with ``exact=True`` it decodes whole.  The answer stays."""
    from real_data import photos

    model = mobilenets.load(weights_file)
    Image.fromarray(photos()[0][1]).resize((640, 480), Image.BICUBIC).save(tmp_path / "photo.jpg", quality=95)
    reduced = list(predict(model, tmp_path / "photo.jpg", topk=5, workers=0))
    exact = list(predict(model, tmp_path / "photo.jpg", topk=5, workers=0, exact=True))
    assert decoded_sizes == [(160, 120), (640, 480)]
    p_reduced = [t["probability"] for t in reduced[0].top]
    p_exact = [t["probability"] for t in exact[0].top]
    assert reduced[0].top[0]["class_index"] == exact[0].top[0]["class_index"]
    assert np.allclose(p_reduced, p_exact, atol=0.02)


def test_cli_exact_decodes_every_pixel(weights_file, tmp_path, decoded_sizes, capsys):
    """``predict --exact`` decodes the whole JPEG; without it the reduced scale (here 1/8 of 1200 x 900)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg")
    for flags in ([], ["--exact"]):
        assert cli.main(["predict", str(tmp_path / "photo.jpg"), "--weights", str(weights_file), *flags]) == 0
    assert decoded_sizes == [(150, 113), (1200, 900)]
