"""The module: shapes, endpoints, options, gradients, export and clear errors."""

import math

import pytest
import torch
from torch import nn

from mobilenets import MobileNetV1, MobileNetV1Config, architecture, mobilenet_v1
from mobilenets.errors import MobilenetsError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Every endpoint at two sizes, as TF-slim's tests pin them: 224 -> 7x7, 112 -> 4x4 (ceil at every stride 2).
ENDPOINT_SIZES = {
    "Conv2d_0": (32, 112, 56), "Conv2d_1_pointwise": (64, 112, 56), "Conv2d_2_pointwise": (128, 56, 28),
    "Conv2d_3_pointwise": (128, 56, 28), "Conv2d_4_pointwise": (256, 28, 14), "Conv2d_5_pointwise": (256, 28, 14),
    "Conv2d_6_pointwise": (512, 14, 7), "Conv2d_11_pointwise": (512, 14, 7), "Conv2d_12_depthwise": (512, 7, 4),
    "Conv2d_12_pointwise": (1024, 7, 4), "Conv2d_13_pointwise": (1024, 7, 4),
}


@pytest.mark.parametrize("size_index,resolution", [(1, 224), (2, 112)])
def test_endpoint_shapes(size_index, resolution):
    model = mobilenet_v1(1.0).eval()
    with torch.no_grad():
        out = model.forward_endpoints(torch.randn(1, 3, resolution, resolution), list(ENDPOINT_SIZES))
    assert list(out) == list(ENDPOINT_SIZES)
    for name, sizes in ENDPOINT_SIZES.items():
        s = sizes[size_index]
        assert tuple(out[name].shape) == (1, sizes[0], s, s), name


def test_final_feature_maps():
    with torch.no_grad():
        assert mobilenet_v1(1.0).eval().forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1024, 7, 7)
        assert mobilenet_v1(1.0).eval().forward_features(torch.randn(1, 3, 112, 112)).shape == (1, 1024, 4, 4)
        assert mobilenet_v1(0.75).eval().forward_features(torch.randn(1, 3, 128, 128)).shape == (1, 768, 4, 4)


def test_endpoints_by_stage_index_stop_early():
    model = mobilenet_v1(0.5).eval()
    calls = []
    model.features[6].register_forward_hook(lambda *a: calls.append(6))
    with torch.no_grad():
        out = model.forward_endpoints(torch.randn(2, 3, 96, 96), [3, 5])
    assert [tuple(v.shape) for v in out.values()] == [(2, 64, 24, 24), (2, 128, 12, 12)]
    assert calls == []  # nothing after the last endpoint asked for ran


def test_unknown_endpoint_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown endpoint 'Conv2d_14'.*Conv2d_13_pointwise"):
        mobilenet_v1(0.25).forward_endpoints(torch.randn(1, 3, 64, 64), ["Conv2d_14"])


# TF-slim's rule by hand: once the running stride reaches output_stride, each later stride-2 row runs at
# stride 1 with the current rate and doubles the rate for the rows after it.  Stride-2 rows: 0, 2, 4, 6, 12.
#   output_stride 8:  row 6 stride 1 rate 1; rows 7-11 rate 2; row 12 stride 1 rate 2; row 13 rate 4
#   output_stride 16: row 12 stride 1 rate 1; row 13 rate 2
DEPTHWISE_STRIDE_DILATION = {
    8: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 2), (1, 2), (1, 2), (1, 2), (1, 2), (1, 2), (1, 4)],
    16: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 2)],
    32: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (2, 1), (1, 1)],
}


@pytest.mark.parametrize("output_stride,size", [(8, 28), (16, 14), (32, 7)])
def test_output_stride_by_dilation(output_stride, size):
    model = mobilenet_v1(0.25, output_stride=output_stride).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape[-2:] == (size, size)
    depthwise = [model.features[i].depthwise.conv for i in range(1, 14)]
    assert [(c.stride[0], c.dilation[0]) for c in depthwise] == DEPTHWISE_STRIDE_DILATION[output_stride]
    assert all(c.padding[0] == c.dilation[0] for c in depthwise)  # 'same' for a dilated 3x3: pad = rate
    assert all(model.features[i].pointwise.conv.dilation == (1, 1) for i in range(1, 14))
    # same weights shape as the stride-32 model: dilation, not new layers
    assert model.state_dict().keys() == mobilenet_v1(0.25).state_dict().keys()


@pytest.mark.parametrize("alpha,resolution", [(0.25, 32), (0.5, 77), (0.75, 128), (1.0, 160), (1.4, 64), (0.1, 45)])
def test_forward_backward_finite(alpha, resolution):
    model = mobilenet_v1(alpha, num_classes=10).train()
    x = torch.randn(2, 3, resolution, resolution)
    logits = model(x)
    assert logits.shape == (2, 10)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_non_square_input():
    with torch.no_grad():
        assert mobilenet_v1(0.25).eval().forward_features(torch.randn(1, 3, 96, 160)).shape == (1, 256, 3, 5)


def test_num_classes_zero_gives_pooled_features():
    model = mobilenet_v1(0.5, num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 64, 64)).shape == (3, 512)
    assert model.num_features == 512


def test_full_conv_and_shallow_variants():
    full = mobilenet_v1(0.25, full_conv=True)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in full.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in full.modules()) == 14
    shallow = mobilenet_v1(0.25, shallow=True)
    assert list(shallow.features._modules) == ["0", "1", "2", "3", "4", "5", "6", "12", "13"]
    with torch.no_grad():
        assert shallow.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_state_dict_names_are_stable():
    keys = list(mobilenet_v1(0.25).state_dict())
    assert keys[:5] == ["features.0.conv.weight", "features.0.bn.weight", "features.0.bn.bias",
                        "features.0.bn.running_mean", "features.0.bn.running_var"]
    assert "features.1.depthwise.conv.weight" in keys
    assert "features.13.pointwise.bn.running_var" in keys
    assert keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert len([k for k in keys if k.endswith("conv.weight")]) == 27


def test_options_reach_the_layers():
    model = mobilenet_v1(0.25, activation="relu", bn_eps=1e-5, dropout=0.2, bn_momentum=0.01)
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert all(m.eps == 1e-5 and m.momentum == 0.01 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.dropout.p == 0.2
    default = mobilenet_v1(0.25)
    assert sum(isinstance(m, nn.ReLU6) for m in default.modules()) == 27
    assert all(m.eps == 1e-3 for m in default.modules() if isinstance(m, nn.BatchNorm2d))


def test_width_rule_and_min_depth():
    assert architecture.depth(32, 0.25) == 8
    assert architecture.depth(32, 0.1) == 8  # TF-slim's clamp
    assert architecture.depth(32, 0.1, min_depth=1) == 3
    assert architecture.depth(1024, 0.75) == 768
    assert mobilenet_v1(0.1).features[0].conv.out_channels == 8


# TF-slim's rule max(int(c * alpha), 8) worked by hand for c = 32, 64, 128, 256, 512, 1024 (not with
# architecture.depth): 0.35 * 128 = 44.8 -> 44, 0.6 * 128 = 76.8 -> 76, 1.3 * 256 = 332.8 -> 332, and
# 0.125 * 32 = 4 -> clamped to 8.  A round() rule would give 45, 77, 333: these rows tell the two apart.
TF_SLIM_WIDTHS = {
    0.35: (11, 22, 44, 89, 179, 358),
    0.6: (19, 38, 76, 153, 307, 614),
    0.125: (8, 8, 16, 32, 64, 128),
    1.3: (41, 83, 166, 332, 665, 1331),
}
# Table 1's rows as indices into the six widths above: 32, 64, 128 x2, 256 x2, 512 x6, 1024 x2
TABLE1_ROWS = (0, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5)


@pytest.mark.parametrize("alpha", sorted(TF_SLIM_WIDTHS))
def test_width_rule_is_tf_slims_for_any_alpha(alpha):
    widths = TF_SLIM_WIDTHS[alpha]
    model = mobilenet_v1(alpha)
    built = [model.features[0].conv.out_channels] + [model.features[i].pointwise.conv.out_channels
                                                      for i in range(1, 14)]
    assert built == [widths[row] for row in TABLE1_ROWS]
    assert model.classifier.in_features == widths[-1]
    for i in range(1, 14):  # a depthwise conv keeps the width of the row before it
        assert model.features[i].depthwise.conv.out_channels == built[i - 1]


def test_truncated_normal_init():
    model = mobilenet_v1(1.0)
    w = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert w.abs().max() <= 0.18
    # a normal(0, 0.09) truncated at 2 sigma keeps 0.7737 of the variance: std 0.09 * sqrt(0.7737)
    assert w.std().item() == pytest.approx(0.09 * math.sqrt(0.7737), rel=0.02)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Linear))


def test_tf_same_padding_matches_timm_conv2d_same():
    # timm's Conv2dSame is an independent implementation of TensorFlow's SAME padding
    timm_layers = pytest.importorskip("timm.layers")
    model = mobilenet_v1(0.25, padding="tf_same").eval()
    stem = model.features[0]
    ref = timm_layers.create_conv2d(3, 8, 3, stride=2, padding="same", bias=False)
    ref.weight.data.copy_(stem.conv.weight)
    for size in (32, 33, 64, 65):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert torch.allclose(stem.conv(_pad(stem, x)), ref(x), atol=1e-6)
    # the padding really changes the network's output (train mode: BN normalises by the batch, so the
    # signal does not vanish through 27 freshly initialised layers)
    tf, sym = mobilenet_v1(0.25, padding="tf_same", dropout=0.0), mobilenet_v1(0.25, dropout=0.0)
    sym.load_state_dict(tf.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = tf.train()(x), sym.train()(x)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


def _pad(block, x):
    from mobilenets.model import _pad_same

    conv = block.conv
    return _pad_same(x, conv.kernel_size[0], conv.stride[0], conv.dilation[0])


def test_torch_export_and_torchscript():
    model = mobilenet_v1(0.25, padding="tf_same", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), expected, atol=1e-5)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), expected, atol=1e-5)


def test_config_round_trip():
    config = MobileNetV1Config(alpha=0.5, num_classes=3, padding="tf_same", output_stride=16)
    assert MobileNetV1Config.from_dict(config.to_dict()) == config
    model = MobileNetV1(config)
    assert model.config is config
    with pytest.raises(ValueError, match="unknown model options.*'colour'"):
        MobileNetV1Config.from_dict({**config.to_dict(), "colour": "red"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": 0}, r"alpha must be a number in \(0, 4\]"),
        ({"alpha": -0.5}, r"alpha must be a number in \(0, 4\]"),
        ({"alpha": math.nan}, r"alpha must be a number in \(0, 4\]"),
        ({"alpha": 50.0}, r"alpha must be a number in \(0, 4\]"),
        ({"alpha": 1e308}, r"alpha must be a number in \(0, 4\]"),
        ({"alpha": "wide"}, r"alpha must be a number in \(0, 4\]"),
        ({"num_classes": -1}, r"num_classes must be in \[0, 100000\]"),
        ({"num_classes": 10**9}, r"num_classes must be in \[0, 100000\]"),
        ({"num_classes": "10"}, "num_classes must be an integer"),
        ({"activation": "gelu"}, "activation must be one of"),
        ({"activation": ["relu"]}, "activation must be one of"),
        ({"padding": "valid"}, "padding must be one of"),
        ({"output_stride": 4}, "output_stride must be one of"),
        ({"min_depth": 0}, r"min_depth must be an integer in \[1, 4096\]"),
        # 10**9 would be 13 trillion parameters; the widest layer the alpha bound allows is 1024 * 4
        ({"min_depth": 10**9}, r"min_depth must be an integer in \[1, 4096\]"),
        ({"min_depth": 4097}, r"min_depth must be an integer in \[1, 4096\]"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"bn_eps": "1e-3"}, "bn_eps must be in"),
        ({"bn_momentum": math.inf}, "bn_momentum must be in"),
        ({"shallow": "no"}, "shallow must be True or False"),
    ],
)
def test_bad_options_fail_early_with_what_works(kwargs, message):
    # a MobilenetsError, so the command line prints one line: a config read from a file may hold any of these
    with pytest.raises(MobilenetsError, match=message):
        mobilenet_v1(**kwargs)


@pytest.mark.parametrize(
    "shape,dtype,message",
    [
        ((1, 3, 16, 16), torch.float32, "at least 32x32"),
        ((1, 1, 64, 64), torch.float32, r"expected input of shape \(N, 3, H, W\)"),
        ((3, 64, 64), torch.float32, r"expected input of shape \(N, 3, H, W\)"),
        ((1, 3, 64, 64), torch.uint8, "floating-point"),
    ],
)
def test_bad_input_is_a_clear_error(shape, dtype, message):
    model = mobilenet_v1(0.25).eval()
    with pytest.raises(MobilenetsError, match=message):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("padding", ["symmetric", "tf_same"])
def test_fx_traceable_and_feature_extractor(padding):
    # torchvision's feature extraction traces with torch.fx: the input check and TF-SAME padding must not break it
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    m = mobilenet_v1(0.25, padding=padding).eval()
    x = torch.randn(2, 3, 96, 96)
    assert torch.equal(torch.fx.symbolic_trace(m)(x), m(x))
    features = create_feature_extractor(m, return_nodes={"features.5": "c5", "features.13": "c13"})(x)
    expected = m.forward_endpoints(x, [5, 13])
    assert torch.equal(features["c5"], expected[5]) and torch.equal(features["c13"], expected[13])
    # tracing must not switch the check off for real calls
    with pytest.raises(ValueError, match="at least"):
        m(torch.randn(1, 3, 16, 16))


def test_reset_classifier_and_forward_head():
    torch.manual_seed(0)
    m = mobilenet_v1(0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    features = m.forward_features(x)
    pooled = m.forward_head(features, pre_logits=True)
    assert torch.allclose(pooled, features.mean((2, 3)), atol=1e-6)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.config.num_classes == 7 and m.get_classifier().out_features == 7
    assert torch.allclose(m(x), pooled @ m.classifier.weight.T + m.classifier.bias, atol=1e-5)
    m.reset_classifier(0)
    assert torch.equal(m(x), pooled) and m.config.num_classes == 0
    with pytest.raises(ValueError, match="num_classes"):
        m.reset_classifier(-1)
