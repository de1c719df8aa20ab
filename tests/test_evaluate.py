"""Evaluation: the same numbers as scoring every image by hand, from a run folder or a file, with clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from imagefolders import CLASSES, make_split
from mobilenets import checkpoint, cli
from mobilenets.evaluate import evaluate_checkpoint
from mobilenets.images import IMAGENET, eval_transform, list_images, load_rgb
from mobilenets import mobilenet_v1


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(path, num_classes, labels, resolution=32, normalization=IMAGENET, seed=0):
    torch.manual_seed(seed)
    model = mobilenet_v1(0.25, num_classes=num_classes).eval()
    # give BN running statistics that differ per channel so that predictions are not constant
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(),
                     "state_dict": model.state_dict(),
                     "meta": {"resolution": resolution, "normalization": normalization.to_dict(), "labels": labels,
                              "source": "test"}}, path)
    return model


def by_hand(model, root, labels, resolution, normalization=IMAGENET):
    top1 = top5 = n = 0
    for path in list_images(root):
        x = eval_transform(load_rgb(path), resolution, normalization)[None]
        with torch.no_grad():
            logits = model(x)[0]
        target = labels.index(path.parent.name)
        ranked = logits.argsort(descending=True).tolist()
        top1 += ranked[0] == target
        top5 += target in ranked[:5]
        n += 1
    return 100 * top1 / n, 100 * top5 / n, n


def test_matches_scoring_each_image_by_hand(tmp_path):
    labels = [*CLASSES, *(f"other{i}" for i in range(5))]  # 8 classes, so top-5 is not trivially 100%
    model = save_model(tmp_path / "m.pt", len(labels), labels)
    root = make_split(tmp_path / "val", 6, 3)
    result = evaluate_checkpoint(tmp_path / "m.pt", root, num_workers=0)
    top1, top5, n = by_hand(model, root, labels, 32)
    assert result["images"] == n == 18
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert top5 < 100 or top1 < 100  # the model is not trivially right: the comparison means something
    # a different resolution is honoured, and changes the result's inputs
    at_48 = evaluate_checkpoint(tmp_path / "m.pt", root, resolution=48, num_workers=0)
    assert at_48["resolution"] == 48
    assert (at_48["top1"], at_48["top5"]) == pytest.approx(by_hand(model, root, labels, 48)[:2])


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
