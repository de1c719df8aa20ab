"""Fuzzing the command line: every bad argument list is one line on stderr and exit status 2, never a traceback.

A seeded generator makes the cases: for each numeric flag of every subcommand,
values outside its documented range (zero, negatives, 1e308, nan, inf, empty,
words, huge integers), then bad paths (missing, a folder for a file, /dev/null,
a file for a folder, junk bytes), bad choices and bad combinations. The rest of
each argument list is valid and cheap (alpha 0.25 at 32 px, one epoch), so a
case whose check were missing would run quickly, exit 0 and fail here rather
than hang. The ranges are the documented ones (README, --help): alpha in
(0, 4], resolution in [32, 2048], benchmark batches in [1, 1024], the matmul
floor's n in [1, 8192], workers in [0, 256].
"""

import atexit
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import mobilenets
from mobilenets.cli import main
from mobilenets.train import fields
from mobilenets.train.config import field_type

SESSION_CACHE = Path(os.environ["MOBILENETS_CACHE"])  # read before any test's monkeypatch: conftest's own
SESSION_TMP = Path(tempfile.mkdtemp(prefix="pytest-tmp-of-mobilenets-"))  # removed when this process exits
atexit.register(shutil.rmtree, SESSION_TMP, ignore_errors=True)

SEED = 20260412
VALUES = ["0", "-4", "1e308", "nan", "inf", "-inf", "", "abc", "99999999999999999999", "1.5", "-0", "1e-400", "0x10"]

# paths, filled in per test: a missing one, an empty folder, a text file, junk bytes named .jpg, a device
PATHS = {"missing": "{tmp}/missing.bin", "folder": "{tmp}/folder", "file": "{tmp}/file.txt", "junk": "{tmp}/junk.jpg",
         "null": "/dev/null", "under_file": "{tmp}/file.txt/x"}


def _parse(kind, text):
    try:
        return kind(text)
    except ValueError:
        return None


def _in(kind, low, high):
    """The documented range as a predicate on the text a user types."""
    def ok(text):
        v = _parse(kind, text)
        return v is not None and math.isfinite(v) and low <= v <= high and not (kind is float and v == low == 0)
    return ok


def _open_low(kind, low, high):
    def ok(text):
        v = _parse(kind, text)
        return v is not None and math.isfinite(v) and low < v <= high
    return ok


alpha = _open_low(float, 0, 4)
resolution = _in(int, 32, 2048)
positive = _open_low(float, 0, math.inf)

# (command, the valid cheap rest of the argument list, {flag: range predicate})
NUMERIC = [
    ("summary", [], {"--alpha": alpha, "--resolution": resolution}),
    ("evaluate", ["--checkpoint", "{good}", "--device", "cpu"],
     {"--resolution": resolution, "-b": _in(int, 1, math.inf), "-j": _in(int, 0, 256)}),
    ("export", ["--out", "{tmp}/m.onnx", "--weights", "{good}", "--calib-images", "4"],
     {"--alpha": alpha, "--resolution": resolution, "--calib-images": _in(int, 1, math.inf)}),
    ("benchmark", ["--weights", "{good}", "--resolution", "32", "--no-peers", "-q", "--rounds", "1", "--min-time",
                   "0.01", "--floor-size", "16"],
     {"-b": _in(int, 1, 1024), "--floor-size": _in(int, 1, 8192), "--rounds": _in(int, 1, math.inf),
      "--min-time": positive, "--alpha": alpha, "--resolution": resolution}),
    ("pick", ["--latency-ms", "1"], {"--latency-ms": positive, "--batch": _in(int, 1, 1024)}),
    ("convert", ["{missing}", "--from", "timm", "--out", "{tmp}/o.safetensors"], {"--resolution": resolution}),
    ("predict", ["{image}", "--weights", "{good}", "--workers", "0"],
     {"--alpha": alpha, "--resolution": resolution, "--topk": _in(int, 1, math.inf),
      "--batch-size": _in(int, 1, math.inf), "--workers": _in(int, 0, 256)}),
]
TRAIN_BASE = ["--out", "{tmp}/run", "--epochs", "1", "--alpha", "0.25", "--resolution", "32", "-b", "8", "-j", "0",
              "--no-progress", "--no-plot"]


def _train_numeric():
    """Every bounded number of the training config, with the range --help documents for it."""
    flags = {}
    for name, f in fields().items():
        bound = f.metadata["bound"]
        if bound is None or f.metadata["cli"] != "value":
            continue
        kind = field_type(name)
        low = -math.inf if bound.low is None else bound.low
        high = math.inf if bound.high is None else bound.high

        def ok(text, kind=kind, low=low, high=high, bound=bound):
            v = _parse(kind, text)
            if v is None or not math.isfinite(v):
                return False
            return (v > low if bound.low_open else v >= low) and (v < high if bound.high_open else v <= high)
        flags[(f.metadata["flags"] or ("--" + name.replace("_", "-"),))[-1]] = ok
    return flags


def _cases():
    rng = random.Random(SEED)
    cases = []
    for command, rest, flags in NUMERIC + [("train", TRAIN_BASE, _train_numeric())]:
        for flag, ok in flags.items():
            bad = [v for v in VALUES if not ok(v)]
            huge = [v for v in ("1e308", "99999999999999999999") if v in bad]  # the ones that found bugs
            others = [v for v in bad if v not in huge]
            for value in huge + rng.sample(others, min(len(others), 2 if command != "train" else 1)):
                cases.append([command, *rest, flag, value])
    p = {k: v for k, v in PATHS.items()}
    for key in ("missing", "folder", "null", "junk"):
        cases += [["evaluate", "--checkpoint", p[key]],
                  ["predict", "{image}", "--weights", p[key]],
                  ["export", "--out", "{tmp}/m.onnx", "--weights", p[key]],
                  ["export", "--out", "{tmp}/m.onnx", "--checkpoint", p[key]],
                  ["benchmark", "--weights", p[key], "--no-peers", "-q"],
                  ["train", *TRAIN_BASE, "--finetune", p[key]],
                  ["plot", p[key]]]
    for key in ("missing", "folder", "null", "file"):
        cases += [["predict", p[key], "--weights", "{good}"],
                  ["train", *TRAIN_BASE, "--data", p[key]],
                  ["train", *TRAIN_BASE, "--resume", p[key]],
                  ["evaluate", "--checkpoint", "{good}", "--data", p[key]],
                  ["export", "--out", "{tmp}/m.onnx", "--weights", "{good}", "--calib-data", p[key]]]
    for source in ("keras", "tf-slim", "tf-frozen", "timm"):
        cases += [["convert", p[key], "--from", source, "--out", "{tmp}/o.safetensors"]
                  for key in rng.sample(["missing", "folder", "null", "file", "junk"], 3)]
    cases += [
        ["train", *TRAIN_BASE, "--out", p["file"]], ["train", *TRAIN_BASE, "--out", p["null"]],
        ["train", *TRAIN_BASE, "--out", p["under_file"]],
        ["train", *TRAIN_BASE, "--device", "foo"], ["train", *TRAIN_BASE, "--device", "cuda:99"],
        ["train", *TRAIN_BASE, "--recipe", "fast"], ["train", *TRAIN_BASE, "--opt", "lbfgs"],
        ["train", *TRAIN_BASE, "--lr-scheduler", "step"], ["train", *TRAIN_BASE, "--lr", "0.01", "--lr-min", "0.1"],
        ["train", *TRAIN_BASE, "--resume"],
        ["evaluate", "--checkpoint", "{good}", "--device", "foo"],
        ["evaluate", "--checkpoint", "{good}", "--device", "tpu:0"],
        ["evaluate"],
        ["export", "--out", "{tmp}/m.onnx", "--format", "openvino"],
        ["export", "--out", "{tmp}/m.xml", "--format", "torchscript"],
        ["export", "--out", "{tmp}/m.onnx", "--format", "tflite"],
        ["export", "--out", "{tmp}/m.onnx", "--precision", "fp64"],
        ["export", "--out", "{tmp}/m.onnx", "--weights", "{good}", "--checkpoint", "{good}"],
        ["export", "--out", p["under_file"] + ".onnx", "--weights", p["missing"]],
        ["benchmark", "--precision", "fp64"], ["benchmark", "--precision", ""], ["benchmark", "--backend", "tensorrt"],
        ["benchmark", "-b", "1,,0"], ["benchmark", "-b", "1,2,x"],
        ["benchmark", "--weights", "{good}", "--checkpoint", "{good}"],
        ["pick", "--latency-ms", "5", "--precision", "int4"], ["pick", "--latency-ms", "5", "--backend", "tvm"],
        ["pick"],
        ["convert", "{good}", "--out", "{tmp}/o.safetensors"],
        ["convert", p["missing"], "--from", "caffe", "--out", "{tmp}/o.safetensors"],
        ["predict", "{image}", "--weights", "{good}", "--precision", "int8"],
        ["predict", "{image}", "--weights", "{good}", "--precision", "fp16"],
        ["predict", "{image}", "--weights", "{good}", "--backend", "tvm"],
        ["predict", "{image}", "--weights", "imagenet", "--alpha", "0.3"],
        ["predict", "{image}", "--weights", "imagenet", "--resolution", "100"],
        ["predict", "{image}"],
        ["paper", "--plot", p["file"]], ["paper", "--plot", p["null"]], ["paper", "--plot", p["under_file"]],
        ["summary", "--alpha"], ["summary", "--colour"], ["summary", "--full-conv", "yes"],
        [], ["fly"], [""], ["--alpha", "1"],
    ]
    return cases


CASES = _cases()
# a few as real processes: no traceback at the process level either (interpreter exit, atexit, stdout flush)
PROCESS_CASES = random.Random(SEED).sample(range(len(CASES)), 8)  # processes at once: each imports torch; 8 keep a 2-core CI quick


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    good = mobilenets.save(mobilenets.mobilenet_v1(0.25, num_classes=10), root / "good.safetensors")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "image.png")
    return {"good": str(good), "image": str(root / "image.png")}


def _fill(argv, tmp, inputs):
    return [a.format(tmp=tmp, **inputs, **{k: v.format(tmp=tmp) for k, v in PATHS.items()}) for a in argv]


def _tree(root: Path) -> set:
    return {(str(p.relative_to(root)), p.is_dir(), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")}


def _outside() -> dict:
    """What a stray write would change outside the test folder: the working tree, the cache a command would use
    without the test's $MOBILENETS_CACHE (this process's own, set by conftest: no other process writes in it,
    unlike the user's, which the suite never touches), mobilenets* entries in the temp folder (this process's own,
    SESSION_TMP: the machine's is shared, and other processes' entries came and went during a test; entries
    of other names are the runtimes', e.g. an exporter's .ses)."""
    repo = Path(__file__).resolve().parents[1]
    cache = SESSION_CACHE
    return {"repo": sorted(p.name for p in repo.iterdir()),
            "cache": sorted(p.name for p in cache.iterdir()) if cache.is_dir() else [],
            "tmp": sorted(p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("mobilenets"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A test folder holding the bad paths, which is also the working directory, cache and temporary folder."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not an image, not weights, not a folder\n")
    (tmp_path / "junk.jpg").write_bytes(bytes(range(256)) * 4)
    for name in ("cache", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    # the temp folder is one that lives as long as this process, not the test: pointing it at one deleted after
    # the test left runtimes with paths into it, and the test process crashed (SIGSEGV) later; its entries are
    # compared before and after instead (_outside)
    monkeypatch.delenv("MOBILENETS_DEBUG", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(SESSION_TMP))
    monkeypatch.setenv("TMPDIR", str(SESSION_TMP))
    return tmp_path


def test_the_generator_covers_every_subcommand_with_about_150_cases():
    commands = {c[0] for c in CASES if c}
    assert commands >= {"summary", "paper", "train", "evaluate", "plot", "export", "benchmark", "pick", "convert",
                        "predict"}
    assert 150 <= len(CASES) <= 300
    assert len({tuple(c) for c in CASES}) == len(CASES)  # no case twice


@pytest.mark.parametrize("index", range(len(CASES)))
def test_bad_arguments_exit_2_with_one_line(index, workdir, inputs, capsys):
    argv = _fill(CASES[index], workdir, inputs)
    before, outside = _tree(workdir), _outside()
    code = main(argv)  # anything but a user error propagates here, and the test shows its traceback
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("mobilenets: error: "), (argv, err)
    assert "Traceback" not in err and out == ""
    assert _tree(workdir) == before, (argv, "left files behind", _tree(workdir) - before)
    assert _outside() == outside, argv


def test_bad_arguments_in_a_real_process_print_no_traceback(tmp_path, inputs):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("text\n")
    (tmp_path / "junk.jpg").write_bytes(bytes(range(256)) * 4)
    env = {**os.environ, "MOBILENETS_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("MOBILENETS_DEBUG", None)
    procs = []
    for i in PROCESS_CASES:  # all at once: each spends most of its time importing torch
        argv = _fill(CASES[i], tmp_path, inputs)
        procs.append((argv, subprocess.Popen([sys.executable, "-m", "mobilenets", *argv], cwd=tmp_path, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for argv, proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.returncode, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("mobilenets: error: ") and "Traceback" not in err, (argv, err)


def test_the_suite_uses_a_cache_of_its_own_not_the_users():
    """conftest gives each test process an empty cache: the user's is neither read nor written by the suite."""
    from mobilenets.cache import cache_dir

    users = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilenets"
    assert cache_dir() == SESSION_CACHE and SESSION_CACHE.resolve() != users.resolve()
    assert SESSION_CACHE.is_relative_to(tempfile.gettempdir())
