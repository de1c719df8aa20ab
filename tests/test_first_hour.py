"""A new user's first hour, from their side: what ships, what the commands refuse and say, what training shows.

Each test names the trap it guards (issue 22): a file the package must carry, a setting that used to be
ignored or misapplied without a word, a message that named the wrong fix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import matplotlib
import pytest
import torch

import mobilenets
from imagefolders import make_dataset
from mobilenets import cli, train
from mobilenets.deploy import BACKENDS
from mobilenets.deploy.backend import get

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mobilenets: error: "), err
    return err


@pytest.fixture(scope="module")
def weights_1000(tmp_path_factory) -> Path:
    """A small 1000-class model file with no digit labels: weights made for other images than the digits."""
    torch.manual_seed(0)
    model = mobilenets.mobilenet_v1(0.25, num_classes=1000)
    return mobilenets.save(model, tmp_path_factory.mktemp("w") / "w.safetensors")


# ---------------------------------------------------------------- what a library carries


def test_the_wheel_carries_the_license_text_and_py_typed(tmp_path):
    source = tmp_path / "clone"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name if source.exists() else (source.mkdir() or source / name))
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mobilenets-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mobilenets/py.typed" in names  # PEP 561: type checkers read the package's annotations
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    text = zipfile.ZipFile(wheel).read(license_file).decode()
    # pyproject declares Apache-2.0: the file must be its full text (the terms and the appendix), not a stub
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.split()) > 1500


def test_the_changelog_names_the_current_version():
    assert f"## {PYPROJECT['project']['version']}" in (ROOT / "CHANGELOG.md").read_text()


def test_each_runtime_names_the_extra_that_installs_it_and_the_readme_lists_every_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    base = {r.split(">")[0].split("=")[0].split("[")[0].replace("-", "_") for r in PYPROJECT["project"]["dependencies"]}
    for name in BACKENDS:
        backend = get(name)
        packages = {r.split(">")[0].split("=")[0].replace("-", "_") for r in extras[backend.extra]} | base
        for module in backend.requires:
            assert module.split(".")[0] in packages, (name, backend.extra, module)
    readme = (ROOT / "README.md").read_text()
    for extra in extras:
        assert f"'.[{extra}]'" in readme, extra
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU-only install


# ---------------------------------------------------------------- what the commands refuse, in one line


def test_int8_export_of_weights_not_made_for_the_digits_asks_for_calibration_images(capsys, weights_1000, tmp_path):
    out = tmp_path / "m.onnx"
    err = _one_line_error(capsys, ["export", "--weights", str(weights_1000), "--precision", "int8", "--out", str(out)])
    assert "--calib-data DIR" in err and "mobilenets quantize" in err
    assert not out.exists()


@pytest.mark.parametrize("command", [["export", "--out", "m.onnx"], ["benchmark"], ["predict", str(GRACE_HOPPER)]])
def test_alpha_beside_weights_is_refused_not_ignored(capsys, weights_1000, command):
    err = _one_line_error(capsys, [*command, "--weights", str(weights_1000), "--alpha", "0.5"])
    assert "--alpha" in err and "drop --alpha" in err


def test_the_program_is_named_once_in_an_error(capsys):
    err = _one_line_error(capsys, ["summary", "--no-such-flag"])
    assert err.count("mobilenets") == 2, err  # "mobilenets: error: " and the --help hint, not "error: mobilenets:"
    assert "unrecognized arguments: --no-such-flag" in err


def test_an_image_given_as_weights_says_images_are_inputs_and_other_files_point_to_convert(capsys, tmp_path):
    err = _one_line_error(capsys, ["predict", str(GRACE_HOPPER), "--weights", str(GRACE_HOPPER)])
    assert "is an image, not weights" in err and "mobilenets predict" in err
    (tmp_path / "w.bin").write_bytes(b"\x00" * 64)
    err = _one_line_error(capsys, ["predict", str(GRACE_HOPPER), "--weights", str(tmp_path / "w.bin")])
    assert "mobilenets convert" in err


def test_an_unknown_export_suffix_names_the_format_flag(capsys, weights_1000, tmp_path):
    err = _one_line_error(capsys, ["export", "--weights", str(weights_1000), "--out", str(tmp_path / "m.weird")])
    assert "--format" in err


def test_unreadable_files_are_one_line_each_and_the_run_goes_on(capsys, weights_1000, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(GRACE_HOPPER, folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    named = tmp_path / "named.jpg"
    named.write_bytes(b"\xff\xd8\xff truncated")
    code = cli.main(["predict", str(named), str(GRACE_HOPPER), str(folder), "--weights", str(weights_1000),
                     "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 1  # some inputs failed: not success, but every readable image was answered
    answered = [line.split('"image": "')[1].split('"')[0] for line in captured.out.splitlines()]
    assert answered == [str(GRACE_HOPPER), str(folder / "a.jpg")]
    lines = captured.err.strip().splitlines()  # one line per unreadable file, in input order, and nothing else
    assert len(lines) == 2 and all(line.startswith("mobilenets: error: ") for line in lines), lines
    assert str(named) in lines[0] and str(folder / "b.jpg") in lines[1]
    assert "Warning" not in captured.err and "Traceback" not in captured.err
    # nothing readable at all: an error like any other (2), still one line
    assert _one_line_error(capsys, ["predict", str(named), "--weights", str(weights_1000), "-q"]).count(str(named))


# ---------------------------------------------------------------- training a small folder


def test_default_lr_scales_with_the_batch_size_and_help_says_what_it_assumes(capsys):
    # the paper's 0.045 is for 64 images per step; torchvision and timm scale their lr linearly the same way
    assert train.make_config("paper").lr == pytest.approx(0.045)
    assert train.make_config("paper", batch_size=16).lr == pytest.approx(0.045 * 16 / 64)
    assert train.make_config("modern", batch_size=256).lr == pytest.approx(2e-3 * 256 / 64)
    assert train.make_config("paper", batch_size=16, lr=0.03).lr == 0.03  # a given lr is used as given
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "64 images per step" in " ".join(capsys.readouterr().out.split())


def test_a_warm_up_of_two_steps_does_not_spend_one_at_a_hundredth_of_lr():
    c = train.make_config("paper", lr=0.01, lr_warmup_epochs=1, epochs=10, lr_scheduler="constant")
    s = train.Schedule(c, steps_per_epoch=2, epochs=10)
    assert [s.lr(k) for k in range(3)] == pytest.approx([0.005, 0.01, 0.01])


def test_top5_is_shown_only_with_more_than_five_classes(tmp_path, capsys):
    data = make_dataset(tmp_path / "three", train_per_class=4, val_per_class=2)  # three classes
    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(data), "--out", str(out), "--alpha", "0.25", "--resolution", "32",
                     "--epochs", "1", "-b", "4", "-j", "0", "--no-plot"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "top-1" in captured.err and "top-5" not in captured.err  # the epoch line
    assert "val_top5" not in captured.out and "val_top1" in captured.out  # the final JSON line
    assert "val_top5" not in (out / "metrics.jsonl").read_text()
    assert cli.main(["evaluate", "--checkpoint", str(out), "--data", str(data / "val"), "-j", "0"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" not in printed


# ---------------------------------------------------------------- pick


def test_pick_writes_no_chart_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pick", "--device", "pixel-3", "--latency-ms", "10"]) == 0
    assert list(tmp_path.iterdir()) == [] and "wrote" not in capsys.readouterr().out


def test_pick_names_the_larger_models_timed_faster_than_smaller_ones():
    from mobilenets import pick

    def row(alpha, resolution, ms):  # mult-adds grow with the pixels at one width: enough to order them here
        return {"model": f"{alpha:g}-{resolution}", "alpha": alpha, "resolution": resolution, "median_ms": ms,
                "mult_adds": int(alpha * 1e6 * resolution ** 2), "top1": resolution / 4, "backend": "onnxruntime"}

    grid = {"precision": "fp32", "rows": [row(1.0, 160, 22.8), row(1.0, 224, 12.9), row(0.5, 128, 1.0),
                                          row(0.5, 160, 1.5)]}  # the run the issue saw on a loaded machine
    assert pick.pick(30, grid)["out_of_order"] == [("1-224", "1-160")]
    listed = [line.split()[0] for line in pick.format_pick(pick.pick(30, grid)).splitlines()[1:]]
    assert listed == ["0.5-128", "0.5-160", "1-160", "1-224"]  # size order, whatever the timings said
    grid["rows"][0]["median_ms"] = 9.0  # in order: nothing to say
    assert pick.pick(30, grid)["out_of_order"] == []


# ---------------------------------------------------------------- benchmark


def test_benchmark_auto_is_the_fastest_of_its_runtimes_in_the_same_run_and_a_missing_timm_leaves_a_note(
        tmp_path, monkeypatch):
    from mobilenets import benchmark, deploy

    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, as where it is missing
    torch.manual_seed(0)
    model = mobilenets.mobilenet_v1(1.0, num_classes=10)
    result = benchmark.benchmark(model, resolution=32, batch_sizes=(2,), backends=("auto",), rounds=1,
                                 min_time=0.01, floor_size=64)
    (row,) = [r for r in result["rows"] if r["name"] == "mobilenets auto"]
    (entry,) = json.loads((tmp_path / "auto-backend.json").read_text()).values()
    # the row is the fastest runtime of this run's own rounds, and auto's cache now holds that choice
    assert row["median_ms"] == min(entry["timings"].values())
    assert row["detail"].endswith(f"-> {entry['backend']}") and entry["timings"][entry["backend"]] == row["median_ms"]
    assert set(entry["timings"]) == set(deploy.auto.tried(deploy.fold_batchnorm(model), "fp32", []))
    assert result["notes"] == [benchmark.timm_note(model)] and "pip install timm" in result["notes"][0]
    assert benchmark.format_table(result).splitlines()[-1] == "note: " + result["notes"][0]


def test_many_models_compiled_in_one_process_each_get_compiled(monkeypatch, caplog):
    """pick's grid compiles 16 models in one process; at torch's default recompile_limit of 8 the later ones
    printed warnings and ran uncompiled. A counting backend stands in for Inductor (minutes here)."""
    from mobilenets.deploy import backend
    from mobilenets.folding import fold_batchnorm

    compiled = []

    def counting(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, **{**kw, "backend": counting}))
    torch._dynamo.reset()
    runs = []
    for resolution in range(64, 64 + 8 * 9, 8):  # nine models, each its own shape: one over the default
        folded = fold_batchnorm(mobilenets.mobilenet_v1(0.25, num_classes=10).eval())
        runs.append(backend.build("torch", folded, "fp32", [], 1, resolution))
    assert len(compiled) == 9
    assert "recompile_limit" not in caplog.text
