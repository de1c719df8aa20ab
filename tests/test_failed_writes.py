"""A write that fails (a file-size limit, a full disk) loses nothing: the old file stays, no partial file appears.

The failure is real, not mocked: each case runs in a subprocess under
``RLIMIT_FSIZE`` (SIGXFSZ ignored, so a write past the limit fails with EFBIG,
as it does for a quota or a full disk) below the size of the file being
written.  The limit is a soft one, so the subprocess first writes the "old"
files at full size, then lowers it and writes again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagefolders import make_dataset

# below every file written here (the smallest, an alpha 0.25 model, is ~0.9 MB), above what Python needs to start
LIMIT = 64 * 1024

PRELUDE = f"""
import json, os, resource, signal, sys, traceback
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
HARD = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
def limited():
    resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, HARD))
def unlimited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (HARD, HARD))
"""


def _run(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# formats that write a file this machine can run; Core ML (a folder) goes through the same replacing()
FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt", "exported-program": ".pt2", "tflite": ".tflite"}


def test_a_failed_export_keeps_the_old_file_of_every_format_and_leaves_no_partial_one(tmp_path):
    done = _run("""
        import torch, mobilenets
        from mobilenets import deploy
        from mobilenets.errors import MobilenetsError
        folder, formats = Path(sys.argv[1]), json.loads(sys.argv[2])
        torch.manual_seed(0)
        old = mobilenets.mobilenet_v1(alpha=0.25, num_classes=10).eval()
        new = mobilenets.mobilenet_v1(alpha=0.25, num_classes=10).eval()  # other weights: a file that would differ
        for fmt, suffix in formats.items():
            deploy.export(old, folder / f"old{suffix}", fmt, resolution=32)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        limited()
        errors = {}
        for fmt, suffix in formats.items():
            for name in ("old", "new"):
                try:
                    deploy.export(new, folder / f"{name}{suffix}", fmt, resolution=32)
                    errors[f"{fmt} {name}"] = "written"
                except MobilenetsError as e:
                    errors[f"{fmt} {name}"] = str(e)
        unlimited()
        after = {p.name: p.read_bytes() for p in folder.iterdir()}
        print(json.dumps({"errors": errors, "same": before == after, "files": sorted(after)}))
        """, str(tmp_path), json.dumps(FORMATS))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for fmt, suffix in FORMATS.items():
        for name, kept in (("old", "the previous file is untouched"), ("new", "no partial file was left")):
            error = result["errors"][f"{fmt} {name}"]
            assert error.startswith(f"cannot write {tmp_path / (name + suffix)}: File too large") and kept in error, \
                (fmt, name, error)
    assert result["same"], "a failed write changed an old file"
    written = sorted(f"old{s}" for s in FORMATS.values()) + ["old.bin"]  # OpenVINO's weights beside its .xml
    assert result["files"] == sorted(written)  # no new file, no temporary file


def test_failed_writes_of_converted_weights_metrics_plots_and_json_keep_the_old_files(tmp_path):
    done = _run("""
        import torch, mobilenets
        from mobilenets import benchmark, checkpoint, weights
        from mobilenets.errors import MobilenetsError
        from mobilenets.train import plots, rundir
        folder = Path(sys.argv[1])
        torch.manual_seed(0)
        model = mobilenets.mobilenet_v1(alpha=0.25, num_classes=10)
        big = "x" * 200_000  # a metrics line and a JSON report larger than the limit
        writers = {
            "weights": lambda: mobilenets.save(model, folder / "w.safetensors"),
            "checkpoint": lambda: checkpoint.save(checkpoint.model_checkpoint(model.config.to_dict(),
                                                  model.state_dict(), {"note": big}), folder / "best.pt"),
            "metrics": lambda: rundir.write_metrics(folder, [{"epoch": 1, "train_loss": 1.0, "note": big}]),
            "plot": lambda: benchmark.save_figure(__import__("matplotlib.pyplot").pyplot.figure(figsize=(40, 40),
                                                  dpi=200), folder / "plot.png"),
        }
        for write in writers.values():
            write()
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        torch.manual_seed(1)
        model = mobilenets.mobilenet_v1(alpha=0.25, num_classes=10)
        limited()
        errors = {}
        for name, write in writers.items():
            try:
                write()
                errors[name] = "written"
            except MobilenetsError as e:
                errors[name] = str(e)
        unlimited()
        after = {p.name: p.read_bytes() for p in folder.iterdir()}
        print(json.dumps({"errors": errors, "same": before == after}))
        """, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, error in result["errors"].items():
        assert "File too large (the previous file is untouched)" in error, (name, error)
    assert result["same"]


def test_the_cli_reports_a_failed_write_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """`train --resume` past the limit: one line, status 2, last.pt and best.pt as the earlier run left them."""
    data = make_dataset(tmp_path / "data", train_per_class=4, val_per_class=2)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--alpha", "0.25", "--resolution", "32", "-b", "8", "-j", "0",
            "--no-progress", "--no-plot", "--out", str(out)]
    code = """
        from mobilenets import cli
        if sys.argv[1] == "limited":
            limited()
        sys.exit(cli.main(sys.argv[2:]))
    """
    first = _run(code, "unlimited", *args, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _listing(out)
    resumed = _run(code, "limited", "train", "--resume", str(out), "--epochs", "2", "--no-progress")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    *progress, last = resumed.stderr.splitlines()  # train's first stderr line says how it uses the cores
    assert last.startswith(f"mobilenets: error: cannot write {out / 'last.pt'}: File too large"), resumed.stderr
    assert len(progress) <= 1 and "Traceback" not in resumed.stderr, resumed.stderr
    after = _listing(out)
    assert after["last.pt"] == before["last.pt"] and after["best.pt"] == before["best.pt"]
    assert not [n for n in after if n.endswith(".tmp")]

