"""benchmarks/gpu_check.py must not rot while no GPU is lent: its --dry-run runs every part on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_reports_every_part(tmp_path):
    pytest.importorskip("timm")
    report_file, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json",
                           str(report_file), "--md", str(md)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["dry_run"] and set(report["models"]) == {"mobilenets", "timm"}
    for entry in report["models"].values():
        assert entry["train_images_per_s"] > 0 and entry["infer_bf16_images_per_s"] > 0
        # same start, batches and dropout masks on both sides (both on the CPU here): the same losses
        assert entry["loss_parity"]["max_relative_difference"] < 1e-5
    decoding = report["gpu_jpeg_decoding"]
    # torchvision's decoder and float resize against the project's: the same image to a grey level or so
    assert decoding["images"] == 4 and decoding["logits_cosine_min"] > 0.99
    assert report["ddp"]["backend"] == "gloo" and report["ddp"]["train_images_per_s"] > 0
    assert md.read_text().startswith("# GPU check (dry run")
