"""The cost accounting reproduces docs/architecture.md section 2 exactly and agrees with a count measured on the module."""

import pytest
import torch

from mobilenets import cost, measure, mobilenet_v1

# docs/architecture.md section 2: (alpha, resolution, options) -> (mult-adds, params without BN, params with BN gamma/beta or None)
SPEC = [
    (1.0, 224, {}, 568_740_352, 4_210_088, 4_231_976),
    (0.75, 224, {}, 325_400_448, 2_569_144, 2_585_560),
    (0.5, 224, {}, 149_497_088, 1_320_648, 1_331_592),
    (0.25, 224, {}, 41_030_272, 464_600, 470_072),
    (1.0, 192, {}, 418_121_728, 4_210_088, None),
    (1.0, 160, {}, 290_675_200, 4_210_088, None),
    (1.0, 128, {}, 186_400_768, 4_210_088, None),
    (1.0, 224, {"full_conv": True}, 4_867_293_184, 29_282_120, None),
    (1.0, 224, {"shallow": True}, 307_323_392, 2_876_328, None),
]


def test_spec_above_is_every_row_of_the_docs_table():
    """SPEC is docs/architecture.md section 2 row for row, so neither can change without the other."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    section = text.split("## 2.", 1)[1].split("## 3.", 1)[0]
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \| ([\d,]+) \| ?([\d,]*) ?\|", section, flags=re.M)
    assert len(rows) == len(SPEC) == 9
    for (name, ma, p, pbn), (alpha, resolution, options, mult_adds, params, params_bn) in zip(rows, SPEC):
        prefix = "full-conv " if options.get("full_conv") else "shallow " if options.get("shallow") else ""
        assert name.startswith(f"{prefix}{alpha}-{resolution}"), name
        assert (int(ma.replace(",", "")), int(p.replace(",", ""))) == (mult_adds, params)
        assert (int(pbn.replace(",", "")) if pbn else None) == params_bn


@pytest.mark.parametrize("alpha,resolution,options,mult_adds,params,params_bn", SPEC)
def test_spec_numbers_exact(alpha, resolution, options, mult_adds, params, params_bn):
    c = cost(alpha, resolution, **options)
    assert c.mult_adds == mult_adds
    assert c.params == params
    if params_bn is not None:
        assert c.trainable_params == params_bn


@pytest.mark.parametrize("alpha,resolution,options,mult_adds,params,params_bn", SPEC)
def test_measured_on_module_equals_spec(alpha, resolution, options, mult_adds, params, params_bn):
    measured = measure(mobilenet_v1(alpha, **options), resolution)
    assert measured["mult_adds"] == mult_adds
    assert measured["params"] == params
    if params_bn is not None:
        assert measured["trainable_params"] == params_bn


@pytest.mark.parametrize(
    "alpha,resolution,options",
    [
        (0.1, 32, {}),
        (0.3, 33, {}),
        (1.3, 97, {}),
        (0.6, (96, 160), {}),
        (0.35, 255, {"full_conv": True}),
        (0.5, 129, {"shallow": True}),
        (0.5, 100, {"output_stride": 8}),
        (0.75, 150, {"output_stride": 16}),
        (0.05, 64, {"min_depth": 1}),
        (0.25, 64, {"num_classes": 0}),
        (0.25, 64, {"num_classes": 7}),
    ],
)
def test_computed_equals_measured_for_any_variant(alpha, resolution, options):
    c = cost(alpha, resolution, **options)
    model_options = dict(options)
    measured = measure(mobilenet_v1(alpha, **model_options), resolution)
    assert measured == {
        "mult_adds": c.mult_adds,
        "params": c.params,
        "bn_params": c.bn_params,
        "trainable_params": c.trainable_params,
    }


def test_cost_with_no_arguments_is_the_baseline_1_0_mobilenet_224():
    """cost() is the paper's baseline: 1.0 MobileNet-224, Table 8's 569 million mult-adds and 4.2 million
    parameters, its first layer a 224 x 224 x 3 input to 32 filters (alpha 2 would be 64, and ~4x the cost)."""
    c = cost()
    assert (c.alpha, c.resolution) == (1.0, (224, 224))
    assert round(c.mult_adds / 1e6) == 569 and round(c.params / 1e5) == 42
    assert (c.layers[0].input_size, c.layers[0].output_size) == ((224, 224, 3), (112, 112, 32))
    # measure() on a built model, with no resolution, counts it at the same 224: 568,740,352 mult-adds
    assert measure(mobilenet_v1(1.0))["mult_adds"] == 568_740_352


def test_per_layer_rows_follow_table1():
    c = cost(1.0, 224)
    assert len([l for l in c.layers if l.kind != "fc"]) == 27  # + the FC = 28 layers
    first = c.layers[0]
    assert (first.type_stride, first.filter_shape, first.input_size, first.output_size) == (
        "Conv / s2", "3x3x3x32", (224, 224, 3), (112, 112, 32))
    last_dw = [l for l in c.layers if l.kind == "depthwise"][-1]
    assert (last_dw.type_stride, last_dw.input_size, last_dw.output_size) == ("Conv dw / s1", (7, 7, 1024), (7, 7, 1024))
    assert [l.stride for l in c.layers if l.kind == "depthwise"] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    fc = c.layers[-1]
    assert (fc.filter_shape, fc.mult_adds, fc.params) == ("1024x1000", 1_024_000, 1_025_000)
    # Table 1's "Filter Shape" column, its first five rows and its last separable pair, as printed
    assert [l.filter_shape for l in c.layers[:5]] == ["3x3x3x32", "3x3x32 dw", "1x1x32x64", "3x3x64 dw",
                                                       "1x1x64x128"]
    assert [l.filter_shape for l in c.layers[-3:-1]] == ["3x3x1024 dw", "1x1x1024x1024"]


def test_separable_factorisation_ratio():
    # docs/architecture.md section 1: a separable kxk conv costs 1/N + 1/k^2 of the standard one
    full = cost(1.0, 224, full_conv=True).layers
    separable = cost(1.0, 224).layers
    std = next(l for l in full if l.name == "Conv2d_7")
    dw = next(l for l in separable if l.name == "Conv2d_7_depthwise")
    pw = next(l for l in separable if l.name == "Conv2d_7_pointwise")
    assert (dw.mult_adds + pw.mult_adds) / std.mult_adds == pytest.approx(1 / 512 + 1 / 9)


def test_measure_leaves_training_mode_alone():
    model = mobilenet_v1(0.25).train()
    measure(model, 64)
    assert model.training
    assert all(h == {} for h in (m._forward_hooks for m in model.modules()))


def test_timm_agrees_on_parameter_count():
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("mobilenetv1_100", pretrained=False)
    assert sum(p.numel() for p in theirs.parameters()) == cost(1.0, 224).trainable_params
    with torch.no_grad():
        assert theirs(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_the_package_cost_stays_the_function_whatever_is_imported_first():
    # the function shares its module's name: importing the module later must not replace it on the package
    import subprocess
    import sys

    script = "import mobilenets.benchmark, mobilenets; print(mobilenets.cost(alpha=0.5, resolution=160).mult_adds)"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "76524800"  # docs/architecture.md: 0.5-160


@pytest.mark.parametrize("alpha, resolution", [(1.0, 224), (0.5, 160)])
def test_the_kinds_partition_the_network_whatever_string_names_them(alpha, resolution):
    """Kinds read at run time (from JSON here, as from a command line) are not the interned literals of the
    table: every layer counts in exactly one kind, and the kinds add up to the whole (measured on the module)."""
    import json

    c = cost(alpha, resolution)
    kinds = [c.by_kind(k) for k in json.loads('["conv", "depthwise", "pointwise", "fc"]')]
    whole = measure(mobilenet_v1(alpha), resolution)
    assert sum(k.mult_adds for k in kinds) == whole["mult_adds"]
    assert sum(k.params for k in kinds) == whole["params"] and sum(k.bn_params for k in kinds) == whole["bn_params"]
    assert kinds[3].mult_adds == kinds[3].params - 1000 == int(alpha * 1024) * 1000  # the FC: weights + 1000 biases


def test_cost_rows_are_values_that_can_be_kept_in_sets_and_never_change():
    """A Cost and its rows are frozen values: hashable (kept in sets, used as keys) and equal by content;
    assigning to one is an error instead of silently changing a table others hold."""
    import dataclasses

    a, b = cost(0.5, 160), cost(0.5, 160)
    assert a == b and hash(a) == hash(b) and len({*a.layers, *b.layers}) == len(a.layers)
    for value in (a, a.layers[0], a.by_kind("fc")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.mult_adds = 0
