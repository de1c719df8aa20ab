"""The command line: summary and paper, JSON output, plots, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from mobilenets.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_json_has_the_paper_convention_totals(capsys):
    code, out, _ = run(capsys, "summary", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["mult_adds"], data["params"], data["trainable_params"]) == (568_740_352, 4_210_088, 4_231_976)
    assert len(data["layers"]) == 28
    assert data["layers"][0]["filter_shape"] == "3x3x3x32"


@pytest.mark.parametrize(
    "argv,mult_adds,params",
    [
        (["--alpha", "0.5", "--resolution", "160"], None, 1_320_648),
        (["--full-conv"], 4_867_293_184, 29_282_120),
        (["--shallow"], 307_323_392, 2_876_328),
        (["--resolution", "128"], 186_400_768, 4_210_088),
    ],
)
def test_summary_variants(capsys, argv, mult_adds, params):
    code, out, _ = run(capsys, "summary", "--json", *argv)
    data = json.loads(out)
    assert code == 0 and data["params"] == params
    if mult_adds is not None:
        assert data["mult_adds"] == mult_adds


def test_summary_table_is_readable(capsys):
    code, out, _ = run(capsys, "summary", "--alpha", "0.75", "--resolution", "128")
    assert code == 0
    assert "MobileNet v1 0.75-128" in out
    assert "Conv dw / s2" in out and "3x3x24 dw" in out
    assert "total" in out


def test_paper_json_and_plots(capsys, tmp_path):
    code, out, _ = run(capsys, "paper", "--json", "--plot", str(tmp_path))
    assert code == 0
    data = json.loads(out)
    assert len(data["grid"]) == 16
    differing = [r for r in data["tables"] if not r["matches"]]
    assert {r["table"] for r in differing} == {"Table 2", "Table 4", "Table 7"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "figure4_accuracy_vs_mult_adds.png", "figure5_accuracy_vs_params.png"]


def test_paper_human_output_marks_differences(capsys):
    code, out, _ = run(capsys, "paper")
    assert code == 0
    assert "1.19%" in out and "1.91%" in out and "differs: transposed" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["summary", "--alpha", "0"], "must be a number in (0, 4]"),
        (["summary", "--alpha", "-1"], "must be a number in (0, 4]"),
        (["summary", "--alpha", "abc"], "must be a number in (0, 4]"),
        (["summary", "--alpha", "nan"], "must be a number in (0, 4]"),
        (["summary", "--alpha", "1e308"], "must be a number in (0, 4]"),
        (["summary", "--resolution", "31"], "must be an integer in [32, 2048]"),
        (["summary", "--resolution", "20000"], "must be an integer in [32, 2048]"),
        (["summary", "--resolution", "big"], "must be an integer in [32, 2048]"),
        (["summary", "--colour"], "unrecognized arguments"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_module_entry_point_and_error_without_traceback():
    ok = subprocess.run([sys.executable, "-m", "mobilenets", "summary", "--json", "--alpha", "0.25"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["mult_adds"] == 41_030_272
    bad = subprocess.run([sys.executable, "-m", "mobilenets", "summary", "--resolution", "8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_summary_grid_is_the_readme_table(capsys):
    code, out, _ = run(capsys, "summary", "--grid")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 18
    assert lines[2] == "| 1.0-224 | 568,740,352 | 4,210,088 | 4,231,976 | 70.9 | 69.7 |"
    code, out, _ = run(capsys, "summary", "--grid", "--json")
    assert [g["model"] for g in json.loads(out)][-1] == "0.25-128"


def test_version():
    from mobilenets import __version__

    run = subprocess.run([sys.executable, "-m", "mobilenets", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"mobilenets {__version__}"


def test_closed_pipe_is_quiet():
    # `mobilenets paper | head -c 1`: the reader is gone before we write; no BrokenPipeError traceback
    read_end, write_end = os.pipe()
    os.close(read_end)
    run = subprocess.run([sys.executable, "-m", "mobilenets", "paper", "--json"], stdout=write_end,
                         stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert run.returncode == 141, run.stderr
    assert run.stderr == ""


def test_cli_starts_without_torch_and_waits_passively():
    # OpenMP reads OMP_WAIT_POLICY once, when PyTorch loads it: the CLI must set it before importing torch
    script = ("import sys, os, mobilenets.cli; assert 'torch' not in sys.modules; "
              "mobilenets.cli.main(['summary', '--alpha', '0.25']); print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "PASSIVE"


def test_int8_export_warns_when_it_loses_answers(tmp_path, capsys, monkeypatch):
    # the warning's logic, with parity forced low: still written, exit 0, one warning line on stderr
    from mobilenets import deploy

    real = deploy.parity

    def low(reference, logits, labels=None):
        return {**real(reference, logits, labels), "top1_agreement": 0.5}

    monkeypatch.setattr(deploy, "parity", low)
    code = main(["export", "--alpha", "0.25", "--resolution", "32", "--calib-images", "8", "--precision", "int8",
                 "--out", str(tmp_path / "m.onnx"), "--quiet"])  # progress off: the warning is all stderr holds
    out, err = capsys.readouterr()
    assert code == 0 and (tmp_path / "m.onnx").is_file()
    assert "keeps only 50.0% of the float model's top-1 answers" in err and err.count("\n") == 1
