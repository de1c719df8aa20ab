"""Published Pixel 3 latencies: the table, the docs generated from it, and the picks it gives.

Expected cells and picks are read off the table of the LiteRT hosted-models page (as transcribed in the
project's spec, section 4b), by hand, not computed by the code under test.
"""

import json
from pathlib import Path

import pytest

from mobilenets import cli, device_latency, pick
from mobilenets.errors import MobilenetsError

DOC = Path(__file__).resolve().parents[1] / "docs" / "device-latency.md"

# (model): (float top-1, CPU, GPU, NNAPI, int8 top-1, int8 CPU, int8 NNAPI), a few rows of the page
PAGE_ROWS = {
    "0.25-128": (41.4, 1.2, 1.6, 3.0, 39.5, 0.8, 2.0),
    "0.75-128": (62.0, 5.5, 2.6, 5.1, 55.9, 3.1, 3.2),
    "0.75-160": (65.2, 8.2, 3.1, 6.3, 62.4, 4.7, 3.8),
    "1.0-128": (65.2, 9.0, 4.4, 6.3, 63.3, 4.8, 3.8),
    "1.0-192": (69.9, 18.1, 6.3, 10.6, 69.1, 9.9, 5.2),
    "1.0-224": (71.0, 24.0, 6.5, 13.8, 70.0, 13.0, 6.0),
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))


def test_the_table_holds_the_page_s_numbers():
    models = {m.model: m for m in device_latency.PIXEL_3.models}
    assert len(models) == 16 and {m.alpha for m in models.values()} == {0.25, 0.5, 0.75, 1.0}
    for name, (top1, cpu, gpu, nnapi, top1_int8, int8_cpu, int8_nnapi) in PAGE_ROWS.items():
        m = models[name]
        assert (m.top1, m.top1_int8) == (top1, top1_int8), name
        assert [m.latency_ms("fp32", a) for a in ("cpu", "gpu", "nnapi")] == [cpu, gpu, nnapi], name
        assert [m.latency_ms("int8", a) for a in ("cpu", "gpu", "nnapi")] == [int8_cpu, None, int8_nnapi], name


def test_docs_show_the_table_the_code_reads():
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("|")]
    assert "\n".join(lines) == device_latency.markdown_table()
    assert "published, not measured here" in DOC.read_text().lower()


@pytest.mark.parametrize("precision, accelerator, budget, expected", [
    ("fp32", "cpu", 10, "0.75-160"),    # 65.2% at 8.2 ms; 1.0-128 has the same 65.2% but takes 9.0 ms
    ("int8", "cpu", 10, "1.0-192"),     # 69.1% at 9.9 ms
    ("fp32", "cpu", 24, "1.0-224"),     # a budget equal to the latency fits
    ("fp32", "gpu", 5, "0.75-224"),     # 68.3% at 4.9 ms beats 1.0-160's 68.0% at 5.0 ms
    ("fp32", "nnapi", 10, "0.75-224"),  # 9.9 ms
    ("int8", "nnapi", 5, "1.0-160"),    # 66.9% at 4.6 ms; 0.75-224 also 66.9% but 4.8 ms
])
def test_pick_from_published_latencies(precision, accelerator, budget, expected):
    result = pick.pick(budget, pick.published_grid("pixel-3", precision, accelerator))
    assert result["published"] and result["choice"]["model"] == expected


def test_nothing_fits_below_the_fastest_published():
    result = pick.pick(1.1, pick.published_grid("pixel-3", "fp32", "cpu"))
    assert result["choice"] is None and result["fastest"]["model"] == "0.25-128"


def test_a_missing_cell_or_device_is_one_clear_error():
    with pytest.raises(device_latency.DeviceLatencyError, match=r"no published int8 latency on 'gpu'.*"
                                                                r"int8 on cpu, nnapi"):
        pick.published_grid("pixel-3", "int8", "gpu")
    with pytest.raises(MobilenetsError, match="no published bf16 latency.*fp32 on cpu, gpu, nnapi"):
        device_latency.latencies("pixel-3", "bf16", "cpu")
    with pytest.raises(MobilenetsError, match="device 'pixel-9'.*devices: pixel-3"):
        device_latency.get("pixel-9")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pick_command_says_published_not_measured(capsys, tmp_path):
    png = tmp_path / "pick.png"
    code, out, err = run_cli(capsys, "pick", "--device", "pixel-3", "--latency-ms", "10", "--precision", "int8",
                             "--plot", str(png))
    assert code == 0, err
    assert out.startswith("published, not measured here: Google Pixel 3")
    assert "pick: 1.0-192" in out and "9.9 ms" in out and "69.1%" in out
    assert png.stat().st_size > 1000
    assert not (tmp_path / "cache").exists()  # nothing measured, nothing cached

    code, out, err = run_cli(capsys, "pick", "--device", "pixel-3", "--latency-ms", "5", "--accelerator", "gpu",
                             "--json", "--plot", str(png))
    data = json.loads(out)
    assert code == 0 and data["choice"]["model"] == "0.75-224" and data["measured_here"] is False


@pytest.mark.parametrize("argv, words", [
    (["--device", "pixel-3", "--precision", "int8", "--accelerator", "gpu"], "int8 on cpu, nnapi"),
    (["--device", "pixel-4"], "devices: pixel-3"),
    (["--accelerator", "gpu"], "--device"),
    (["--device", "pixel-3", "--batch", "8"], "batch-1"),
    (["--device", "pixel-3", "--runtime", "litert"], "not allowed with"),
])
def test_pick_command_refuses_in_one_line(capsys, tmp_path, argv, words):
    code, out, err = run_cli(capsys, "pick", "--latency-ms", "10", "--plot", str(tmp_path / "p.png"), *argv)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
