"""The paper's Tables 2-7 recomputed: every cell matches the printed value or carries its explanation."""

import struct

import pytest

from mobilenets import paper
from mobilenets.weights import registry


def cells(table):
    return {(r.row, r.column): r for r in table}


def test_table2_shares_and_the_transposition():
    t = cells(paper.table2())
    assert t["Conv 1x1", "Mult-Adds"].ours == "94.86%"
    assert t["Conv 1x1", "Parameters"].ours == "74.59%"
    assert t["Conv DW 3x3", "Mult-Adds"].ours == "3.06%"
    assert t["Conv DW 3x3", "Parameters"].ours == "1.06%"
    assert t["Conv 3x3", "Parameters"].ours == "0.02%"
    assert t["Fully Connected", "Mult-Adds"].ours == "0.18%"
    assert t["Fully Connected", "Parameters"].ours == "24.33%"
    conv = t["Conv 3x3", "Mult-Adds"]
    assert (conv.paper, conv.ours, conv.matches) == ("1.19%", "1.91%", False)
    assert "transposed" in conv.note


def test_table3_single_layer():
    t = cells(paper.table3())
    expected = {"Convolution": ("462", "2.36"), "Depthwise Separable Conv": ("52.3", "0.27"),
                "alpha = 0.75": ("29.6", "0.15"), "rho = 0.714": ("15.1", "0.15")}
    for row, (ma, p) in expected.items():
        assert t[row, "Million Mult-Adds"].ours == ma
        assert t[row, "Million Parameters"].ours == p


def test_every_difference_is_explained_and_only_three_differ():
    rows = paper.all_tables()
    differing = [(r.table, r.row) for r in rows if not r.matches]
    assert differing == [("Table 2", "Conv 3x3"), ("Table 4", "Conv MobileNet"), ("Table 7", "1.0 MobileNet-160")]
    assert all(r.note for r in rows if not r.matches)
    assert not any(r.note for r in rows if r.matches)


def test_grid_has_16_models_with_costs_and_accuracy():
    g = paper.grid()
    assert len(g) == 16
    one = next(x for x in g if x["model"] == "1.0-224")
    assert (one["mult_adds"], one["params"], one["top1"], one["top1_int8"]) == (568_740_352, 4_210_088, 70.9, 69.7)
    quarter = next(x for x in g if x["model"] == "0.25-128")
    assert quarter["top1"] == 41.5


def test_figures_are_png(tmp_path):
    paths = paper.plot_figures(tmp_path)
    assert [p.name for p in paths] == ["figure4_accuracy_vs_mult_adds.png", "figure5_accuracy_vs_params.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 600 and height >= 400
        assert len(data) > 20_000  # a real plot, not an empty canvas


@pytest.mark.parametrize("alpha", paper.ALPHAS)
def test_published_grid_covers_official_weights(alpha):
    for resolution in paper.RESOLUTIONS:
        entry = registry.get(alpha, resolution)
        top1, int8 = entry.top1, entry.top1_int8
        assert 0 < int8 <= top1 < 100
