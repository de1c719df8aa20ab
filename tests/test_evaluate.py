"""Evaluation: the same numbers as scoring every image by hand, from a run folder or a file, with clear errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagefolders import CLASSES, make_split
from mobilenets import checkpoint, cli
from mobilenets.evaluate import evaluate_checkpoint
from mobilenets.images import IMAGENET, Normalization, eval_transform, list_images, load_rgb
from mobilenets import mobilenet_v1


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _fitted_state() -> dict:
    """A 0.25 MobileNet briefly fitted to the built-in digits (mobilenets.benchmark.make_model): its features
    respond to strokes and edges, so its logits differ from image to image. A freshly initialised one's do not
    (BatchNorm statistics of the init saturate every ReLU6: identical logits on every image), and with those
    no preprocessing bug could change a score."""
    from mobilenets.benchmark import make_model

    return make_model(0.25, num_classes=10, steps=12, resolution=32).state_dict()


def save_model(path, num_classes, labels, resolution=32, normalization=IMAGENET, seed=0):
    torch.manual_seed(seed)
    model = mobilenet_v1(0.25, num_classes=num_classes).eval()
    fitted = _fitted_state()
    state = {k: v for k, v in fitted.items() if not k.startswith("classifier.")}
    rows = min(num_classes, 10)  # the fitted head's rows for the first classes, random ones beyond
    for name in ("classifier.weight", "classifier.bias"):
        state[name] = model.state_dict()[name].clone()
        state[name][:rows] = fitted[name][:rows]
    model.load_state_dict(state)
    checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(),
                     "state_dict": model.state_dict(),
                     "meta": {"resolution": resolution, "normalization": normalization.to_dict(), "labels": labels,
                              "source": "test"}}, path)
    return model


def by_hand(model, root, labels, resolution, normalization=IMAGENET):
    """Top-1, top-5 (%), image count and mean cross-entropy of ``model`` on ``root/<class>/*``, scored by a plain
    PyTorch loop over torchvision's transforms (PIL decode, Resize(floor(R / 0.875)) with antialiasing,
    CenterCrop(R), Normalize): nothing of mobilenets' preprocessing or evaluation code. On uint8 tensors
    torchvision resizes with PyTorch's kernel, as mobilenets does, so the pixels agree to float rounding (7e-7
    measured): a MobileNet amplifies even one grey level (PIL's own kernel, one level off on 4% of pixels,
    moved these logits by up to 1.4)."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize(int(resolution / 0.875), antialias=True),
                            v2.CenterCrop(resolution), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(normalization.mean, normalization.std)])
    top1 = top5 = n = 0
    losses, all_logits = [], []
    for path in sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        with Image.open(path) as im:
            x = transform(im.convert("RGB"))[None]
        with torch.no_grad():
            logits = model(x)[0]
        target = labels.index(path.parent.name)
        ranked = logits.argsort(descending=True).tolist()
        top1 += ranked[0] == target
        top5 += target in ranked[:5]
        losses.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))))
        all_logits.append(logits)
        n += 1
    logits = torch.stack(all_logits)
    # the fixture can show a preprocessing error only if the logits depend on the image
    assert float((logits - logits.mean(0)).abs().max()) > 0.05 * float(logits.abs().max()), "constant logits"
    return 100 * top1 / n, 100 * top5 / n, n, sum(losses) / n


def test_matches_scoring_each_image_by_hand(tmp_path):
    """evaluate's top-1, top-5 and loss against a plain PyTorch loop over torchvision's transforms, at 32 and 48
    pixels, on images that are not square (the crop offset matters) with structure at several scales."""
    labels = [*CLASSES, *(f"other{i}" for i in range(5))]  # 8 classes, so top-5 is not trivially 100%
    model = save_model(tmp_path / "m.pt", len(labels), labels)
    root = make_split(tmp_path / "val", 6, 3)
    rng = np.random.default_rng(7)
    for k, kind in enumerate(CLASSES):  # a non-square one per class: 57 x 43, 43 x 61, 70 x 50
        w, h = [(57, 43), (43, 61), (70, 50)][k]
        y, x = np.mgrid[0:h, 0:w]
        pixels = 128 + 60 * np.sin(x / (2 + k)) * np.cos(y / 5) + rng.normal(0, 25, (h, w, 3)).transpose(2, 0, 1)
        Image.fromarray(np.clip(pixels.transpose(1, 2, 0), 0, 255).astype(np.uint8)).save(root / kind / "odd.png")
    result = evaluate_checkpoint(tmp_path / "m.pt", root, num_workers=0)
    top1, top5, n, loss = by_hand(model, root, labels, 32)
    assert result["images"] == n == 21
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    # the loss is a continuous function of every input pixel: one grey level on 4% of the pixels moved these
    # logits by up to 1.4 (by_hand's docstring), so any preprocessing error shows; 1e-5 leaves room for float
    # summation order only (the pixels agree to 7e-7)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < top1 < 100 and top5 < 100  # the model is neither always right nor always wrong
    # a different resolution is honoured, and changes the result's inputs
    at_48 = evaluate_checkpoint(tmp_path / "m.pt", root, resolution=48, num_workers=0)
    assert at_48["resolution"] == 48
    top1_48, top5_48, _, loss_48 = by_hand(model, root, labels, 48)
    assert (at_48["top1"], at_48["top5"]) == pytest.approx((top1_48, top5_48))
    assert at_48["loss"] == pytest.approx(loss_48, rel=1e-5) and abs(loss_48 - loss) > 1e-3


def test_non_default_normalization_is_the_one_stored(tmp_path):
    """A checkpoint whose stored normalization is neither INCEPTION nor IMAGENET is scored with that one."""
    labels = list(CLASSES)
    odd = Normalization((0.3, 0.6, 0.45), (0.15, 0.35, 0.25))
    model = save_model(tmp_path / "m.pt", 3, labels, normalization=odd)
    root = make_split(tmp_path / "val", 4, 5)
    result = evaluate_checkpoint(tmp_path / "m.pt", root, num_workers=0)
    loss = by_hand(model, root, labels, 32, odd)[3]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert abs(by_hand(model, root, labels, 32, IMAGENET)[3] - loss) > 1e-3  # the fixture tells them apart


def test_a_folder_may_hold_some_of_the_classes(tmp_path):
    labels = list(CLASSES)
    model = save_model(tmp_path / "m.pt", 3, labels)
    root = make_split(tmp_path / "val", 4, 2, classes=("vertical",))
    result = evaluate_checkpoint(tmp_path / "m.pt", root, num_workers=0)
    assert result["images"] == 4
    assert result["top1"] == pytest.approx(by_hand(model, root, labels, 32)[0])  # targets use the model's indices
    assert result["top5"] == 100.0  # three classes: the top "5" is all of them


def test_cli_run_folder_json_and_skipped_files(tmp_path, capsys):
    run = tmp_path / "run"
    save_model(run / "best.pt", 3, list(CLASSES))
    root = make_split(tmp_path / "val", 3, 2)
    (root / "vertical" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="broken.png"):
        assert cli.main(["evaluate", "--checkpoint", str(run), "--data", str(root), "--json", "-j", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["images"] == 9 and result["skipped"] == 1 and result["checkpoint"].endswith("best.pt")
    assert 0 <= result["top1"] <= result["top5"] <= 100


def test_builtin_digits_are_the_default_data(tmp_path):
    save_model(tmp_path / "digits.pt", 10, [str(i) for i in range(10)])
    result = evaluate_checkpoint(tmp_path / "digits.pt", num_workers=0)
    assert result["images"] == 359 and "digits" in result["data"]
    save_model(tmp_path / "patterns.pt", 3, list(CLASSES))
    with pytest.raises(ValueError, match="not trained on the built-in digits.*pass data_dir"):
        evaluate_checkpoint(tmp_path / "patterns.pt", num_workers=0)
    # the digits 0-2 only, or 0-9 in another order: other classes than the digits' ten, refused as well
    for name, labels in (("three.pt", ["0", "1", "2"]), ("shuffled.pt", [str(i) for i in (1, 0, *range(2, 10))])):
        save_model(tmp_path / name, len(labels), labels)
        with pytest.raises(ValueError, match="not trained on the built-in digits.*pass data_dir"):
            evaluate_checkpoint(tmp_path / name, num_workers=0)


def test_clear_errors(tmp_path, capsys):
    save_model(tmp_path / "m.pt", 3, list(CLASSES))
    root = make_split(tmp_path / "ds" / "train", 1, 0)
    make_split(tmp_path / "ds" / "val", 1, 0)
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pt")], "does not exist"),
        (["--checkpoint", str(tmp_path / "ds")], "without best.pt or last.pt"),
        (["--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path / "ds")],
         "looks like a data set root: pass"),
        (["--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path / "missing")], "is not a directory"),
        (["--checkpoint", str(tmp_path / "m.pt"), "--resolution", "16"], "--resolution: must be an integer in [32, 2048]"),
    ]
    for args, message in cases:
        assert cli.main(["evaluate", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mobilenets: error:") and message in err, (args, err)
    (tmp_path / "pickle.pt").write_bytes(b"not a checkpoint at all")
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "pickle.pt"), "--data", str(root)]) == 2
    assert "mobilenets: error:" in capsys.readouterr().err


def test_imagenet_wordnet_id_folders(tmp_path):
    # ImageNet's own val layout: val/n01440764/*.JPEG is class 0 (tench), n01443537 class 1 (goldfish)
    from mobilenets.labels import imagenet_labels

    labels = list(imagenet_labels())
    model = save_model(tmp_path / "m.pt", 1000, labels)
    root = tmp_path / "val"
    make_split(root, 3, 4, classes=("horizontal", "vertical"))
    (root / "horizontal").rename(root / "n01440764")
    (root / "vertical").rename(root / "n01443537")
    result = evaluate_checkpoint(tmp_path / "m.pt", root, num_workers=0)
    top1 = top5 = 0
    for target, wnid in enumerate(["n01440764", "n01443537"]):
        for path in list_images(root / wnid):
            with torch.no_grad():
                ranked = model(eval_transform(load_rgb(path), 32, IMAGENET)[None])[0].argsort(descending=True).tolist()
            top1 += ranked[0] == target
            top5 += target in ranked[:5]
    assert result["images"] == 6
    assert result["top1"] == pytest.approx(100 * top1 / 6) and result["top5"] == pytest.approx(100 * top5 / 6)


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_a_cuda_device_is_checked_against_the_gpus_this_machine_has(monkeypatch, tmp_path, gpus):
    """With n GPUs (torch.cuda's answers replaced, so any machine runs this), cuda:0 .. cuda:n-1 are accepted and
    cuda:n and beyond are refused in one line naming the count; with none, cuda itself is refused."""
    from mobilenets import evaluate
    from mobilenets.errors import ParameterError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for index in range(gpus):
        assert evaluate._device(f"cuda:{index}") == torch.device("cuda", index)
    # the fix offered names only devices that exist: cuda:0 where there is a GPU, cpu alone where there is none
    fix = "use device 'cpu' or cuda:0" if gpus else "use device 'cpu'"
    for index in (gpus, gpus + 3):  # the first index past the last GPU, and one further on
        with pytest.raises(ParameterError, match=rf"this machine has {gpus} CUDA GPU\(s\); {fix}$"):
            evaluate._device(f"cuda:{index}")
    if gpus == 0:
        with pytest.raises(ParameterError, match="use device 'cpu'"):
            evaluate._device("cuda")
    assert evaluate._device(None) == torch.device("cuda" if gpus else "cpu")


@pytest.mark.parametrize("option,value,message", [
    ("num_workers", -1, "num_workers must be an integer in [0, "),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("resolution", 8, "resolution must be ")])
def test_bad_arguments_are_refused_before_the_weights_are_read(tmp_path, option, value, message):
    """The arguments are checked first: with a checkpoint that does not exist, a bad value is what is reported
    (the lowest allowed worker count is 0, the lowest batch 1), in one ParameterError line."""
    from mobilenets.errors import ParameterError

    with pytest.raises(ParameterError) as raised:
        evaluate_checkpoint(tmp_path / "missing.pt", **{option: value})
    assert str(raised.value).startswith(message) and str(raised.value).endswith(f"got {value!r}")


@pytest.mark.parametrize("folders, hinted", [
    (["train", "val"], True), (["train", "val", "test"], True), (["train"], False), (["val", "other"], False)])
def test_a_data_set_root_is_named_as_one_only_when_it_holds_train_and_val(tmp_path, folders, hinted):
    """Class folders that are not the model's classes: "pass ROOT/val" is said only where ROOT/val and ROOT/train
    both exist (a test/ beside them changes nothing); otherwise the labels are listed without the hint."""
    from mobilenets.data import DataError
    from mobilenets.evaluate import _Labelled

    for name in folders:
        make_split(tmp_path / name, 1, 0)
    with pytest.raises(DataError) as raised:
        _Labelled(tmp_path, None, list(CLASSES))
    assert ("looks like a data set root: pass" in str(raised.value)) == hinted, str(raised.value)
    assert str(raised.value).startswith(f"class folders {sorted(folders)[:5]} in {tmp_path} are not among")


def test_weights_of_other_classes_are_not_scored_on_the_digits_and_the_error_shows_ten_labels(tmp_path, capsys):
    labels = [f"class{i}" for i in range(12)]
    save_model(tmp_path / "m.pt", 12, labels)
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"was not trained on the built-in digits (its labels are {labels[:10]}); pass" in err, err
