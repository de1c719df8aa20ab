"""mobilenets.quantize: equalization keeps the float model, bias correction removes the int8 shift, and on
the real ImageNet weights the int8-ready pipeline keeps far more float answers than plain post-training int8."""

from __future__ import annotations

import json

import pytest
import torch

from mobilenets import deploy, load, mobilenet_v1, quantize
from mobilenets.metadata import Metadata

from mobilenets.quantize import calibrate, sim


def kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    p, q = reference.log_softmax(1), logits.log_softmax(1)
    return float((p.exp() * (p - q)).sum(1).mean())


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return float((reference.argmax(1) == logits.argmax(1)).float().mean())


@pytest.fixture(scope="module")
def small():
    """A TF-SAME model whose BatchNorm statistics differ by channel, as trained ones do (ranges over 2 decades)."""
    torch.manual_seed(0)
    model = mobilenet_v1(0.25, num_classes=10, padding="tf_same", bn_eps=1e-3).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 64, 64, generator=g).clamp(-1, 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(10 ** torch.empty(n).uniform_(-1.5, 0.3, generator=g))
                m.bias.copy_(torch.empty(n).uniform_(-0.2, 0.5, generator=g) * m.weight)
                m.momentum = None  # running statistics = the plain average over the batches below
                m.reset_running_stats()
        model.train()
        for b in x.split(16):
            model(b)
    model.eval()
    return model, list(x[:32].split(8)), x[32:]


def test_equalization_keeps_the_float_model(small):
    model, calib, x = small
    folded = deploy.fold_batchnorm(model)
    equalized, scales = calibrate.equalize(folded, calib)
    with torch.no_grad():
        before, after = folded(x), equalized(x)
    # float rounding only: scales up to 256 over 27 layers
    assert (after - before).abs().max() <= 3e-5 * before.abs().max()
    # it did move channels, ReLU6's clip went with them, and the per-channel ranges are now closer
    assert max(float(s.max()) for s in scales) > 4
    assert isinstance(equalized.features[1], sim.ChannelClampConv)
    assert torch.allclose(equalized.features[1].channel_clamp.flatten(), 6 * scales[1])
    # into a depthwise layer (outputs of layers 0, 2, 4, ...) equalization is free: every live channel gets
    # the tensor's range (channels under 1/256 of it are dead ReLUs and stay)
    def spread(m):
        live = m[m > m.max() / calibrate.MAX_SCALE]
        return float(live.max() / live.min())

    before_eq = [spread(m) for m in calibrate.channel_maxima(folded, calib)[0:-1:2]]
    after_eq = [spread(m) for m in calibrate.channel_maxima(equalized, calib)[0:-1:2]]
    assert min(before_eq) > 2 and max(after_eq) < 1.001, (before_eq, after_eq)
    # without the per-channel clip (a single ReLU6 of 6), the equalized model is a different function
    broken = calibrate.unapply_scales(equalized, [torch.ones_like(s) for s in scales])
    for i, layer in enumerate(broken.features):
        layer.channel_clamp.fill_(6.0)
    with torch.no_grad():
        assert (broken(x) - before).abs().max() > 1e-3 * before.abs().max()


@pytest.fixture(scope="module")
def real():
    """The real ImageNet weights and photo crops (tests/real_data.py), crops at 128 px to keep the test short."""
    real_data = pytest.importorskip("real_data")

    def crops(nhwc):
        x = real_data.inception_input(nhwc)
        return torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear", antialias=True)

    return real_data.real_model(), list(crops(real_data.calibration_crops(32)).split(16)), \
        crops(real_data.heldout_crops(32))


def test_bias_correction_removes_the_mean_output_shift(real):
    # (weights rounded to nearest, so the whole shift is there to correct)
    # the released weights' first depthwise layer has filters of -28 +- 4 (folded BatchNorm) on dead input
    # channels: int8 rounding shifts their constant output, and every layer after it
    model, calib, x = real
    folded = deploy.fold_batchnorm(model)
    with torch.no_grad():
        reference = folded(x)
        shifts = {}
        for correct in (False, True):
            adjusted, ranges = calibrate.calibrate(folded, calib, method="minmax", bias_correction=correct,
                                                   rounding="nearest")
            # the mean error of the int8 logits over held-out crops, per class
            shifts[correct] = float((sim.simulate(adjusted, ranges, x) - reference).mean(0).abs().mean())
    assert shifts[True] < 0.5 * shifts[False], shifts


def _mean_errors(adjusted, folded, ranges, batches):
    """Per layer, the largest per-channel mean (over images and positions) of the int8 path's pre-activation
    minus the float model's, relative to the float pre-activation's mean size; the int8 path written out with
    sim's quantizers (weights fake-quantized, bias kept float, activations to their ranges), not calibrate's.

    Batch by batch, as calibration ran: a convolution over the batches joined sums in another order (oneDNN
    picks its kernel by batch size and thread count), and a last-bit difference that moves an activation across
    a rounding boundary shifts it by a whole int8 step (with one thread, one layer's mean moved 4e-3)."""
    out = []
    xq = [sim.fake_quant_act(x, ranges["input"]) for x in batches]
    xf = list(batches)
    for i, (q, f) in enumerate(zip(adjusted.features, folded.features)):
        zq = [sim.conv_pre(q, x, sim.fake_quant_weight(q.conv.weight)) for x in xq]
        zf = [sim.conv_pre(f, x) for x in xf]
        d, zf_all = torch.cat([a - b for a, b in zip(zq, zf)]), torch.cat(zf)
        out.append(float(d.mean((0, 2, 3)).abs().max() / zf_all.abs().mean()))
        xq = [sim.fake_quant_act(sim.activate(q, z), ranges[f"features.{i}"]) for z in zq]
        xf = [sim.activate(f, z) for z in zf]
    pq = torch.cat([sim.fake_quant_act(x.mean((2, 3)), ranges["pool"]) for x in xq])
    lq = torch.nn.functional.linear(pq, sim.fake_quant_weight(adjusted.classifier.weight), adjusted.classifier.bias)
    lf = folded.classifier(torch.cat([x.mean((2, 3)) for x in xf]))
    out.append(float((lq - lf).mean(0).abs().max() / lf.abs().mean()))
    return out


def test_bias_correction_zeroes_every_layers_mean_error_on_the_calibration_images(small):
    """What the correction promises, layer by layer: on the calibration images, each channel's mean
    pre-activation on the int8 path equals the float model's. Checked on the int8 path written out here (so a
    correction of the wrong sign or size, which later layers' corrections partly undo at the logits, shows at
    its own layer)."""
    model, calib, _ = small
    folded = deploy.fold_batchnorm(model)
    errors = {}
    with torch.no_grad():
        for correct in (False, True):
            adjusted, ranges = calibrate.calibrate(folded, calib, method="minmax", bias_correction=correct,
                                                   rounding="nearest")
            errors[correct] = _mean_errors(adjusted, folded, ranges, calib)
    # corrected: float summation order only (float32 sums over ~10^5 values: relative 1e-5 at most)
    assert max(errors[True]) < 1e-4, errors[True]
    # uncorrected, rounding shifts the means by far more (so a reversed sign, doubling it, or half a correction
    # cannot pass): at least 1e-3 in most layers and the logits
    assert sum(e > 1e-3 for e in errors[False]) >= len(errors[False]) // 2, errors[False]


def test_calibration_clips_no_logit(small, monkeypatch):
    model, calib, _ = small
    folded = deploy.fold_batchnorm(model)
    search, methods = calibrate.search_range, {}
    def spy(v, method="mse", **kw):
        methods.setdefault(tuple(v.shape), method)
        return search(v, method, **kw)

    monkeypatch.setattr(calibrate, "search_range", spy)
    adjusted, ranges = calibrate.calibrate(folded, calib)
    # the int8 path's logits before their own quantization, over the calibration images
    with torch.no_grad():
        x = sim.fake_quant_act(torch.cat(calib), ranges["input"])
        for i, layer in enumerate(adjusted.features):
            z = sim.conv_pre(layer, x, sim.fake_quant_weight(layer.conv.weight))
            x = sim.fake_quant_act(sim.activate(layer, z), ranges[f"features.{i}"])
        pooled = sim.fake_quant_act(x.mean((2, 3)), ranges["pool"])
        z = torch.nn.functional.linear(pooled, sim.fake_quant_weight(adjusted.classifier.weight),
                                       adjusted.classifier.bias)
    lo, hi = ranges["logits"]
    assert lo == pytest.approx(min(float(z.min()), 0.0), abs=1e-4) and hi == pytest.approx(float(z.max()), abs=1e-4)
    # the logits by min/max, the activations before them by squared error (one by their ranges' rule)
    assert methods[(32, 10)] == "minmax" and methods[(32, 256)] == "mse", methods


@pytest.mark.parametrize("groups", [1, 48])
def test_weights_rounded_by_output_error_stay_on_the_int8_grid(groups):
    from mobilenets.folding import FoldedConv
    from mobilenets.quantize import rounding

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(48, 48, 3 if groups > 1 else 1, groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * torch.rand(48, 1, 1, 1, generator=g))
    layer = FoldedConv(conv, True, 6.0)
    # correlated inputs, as a ReLU network's are: a few shared factors under each channel, and neighbouring
    # pixels alike (what a depthwise filter sees)
    factors = torch.randn(64, 4, 12, 12, generator=g)
    x = torch.relu(torch.einsum("nfhw,fc->nchw", factors, torch.randn(4, 48, generator=g))
                   + 0.3 * torch.randn(64, 48, 12, 12, generator=g))
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    xs = list(x.split(16))
    rounded = rounding.round_weights(conv.weight, rounding.input_hessian(layer, xs))
    # on the grid every runtime uses: the same per-channel step, and rounding to nearest keeps it
    assert torch.allclose(sim.weight_scales(rounded), sim.weight_scales(conv.weight), rtol=1e-6)
    assert torch.allclose(sim.fake_quant_weight(rounded), rounded, atol=1e-6 * float(rounded.abs().max()))
    steps = rounded / sim.weight_scales(rounded).view(-1, 1, 1, 1)
    assert float((steps - steps.round()).abs().max()) < 1e-4 and float(steps.abs().max()) <= 127 + 1e-4
    # the output error (against the float weights) is well under rounding to nearest's
    def output_error(w):
        return float((sim.conv_pre(layer, x, w) - sim.conv_pre(layer, x)).pow(2).mean())
    nearest, ours = output_error(sim.fake_quant_weight(conv.weight)), output_error(rounded)
    assert ours < 0.4 * nearest, (ours, nearest)
    # and no weight moved more than a few steps from where it was
    assert float(((rounded - conv.weight).abs() / sim.weight_scales(conv.weight).view(-1, 1, 1, 1)).max()) < 4


def test_rounding_by_error_needs_enough_calibration_windows():
    from mobilenets.folding import FoldedConv
    from mobilenets.quantize import rounding

    layer = FoldedConv(torch.nn.Conv2d(64, 8, 1), True, 6.0)
    # a 1x1 layer over 64 inputs needs 4 * 64 = 256 windows (pixels) before its Hessian is trusted
    assert rounding.input_hessian(layer, [torch.rand(4, 64, 8, 8)]) is not None  # 256
    assert rounding.input_hessian(layer, [torch.rand(3, 64, 8, 8), torch.rand(1, 64, 7, 9)]) is None  # 255


def test_input_hessian_is_the_mean_outer_product_of_every_window_whatever_the_chunking(monkeypatch):
    """Windows are unfolded a few images at a time (a batch of 112 x 112 inputs took gigabytes); the
    Hessian must still be the mean of p p^T over every window, computed here directly."""
    from mobilenets.folding import FoldedConv
    from mobilenets.quantize import rounding

    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(6, 6, 3, stride=2, groups=3, bias=True)
    layer = FoldedConv(conv, True, 6.0)
    xs = [torch.rand(5, 6, 9, 9, generator=g), torch.rand(3, 6, 9, 9, generator=g)]
    x = torch.cat(xs)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # TF SAME, 3 x 3 at stride 2 on 9 px: 5 outputs, 2 pads
    windows = padded.unfold(2, 3, 2).unfold(3, 3, 2)  # (N, C, 5, 5, 3, 3)
    windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 2 * 9).double()  # per group: 2 channels x 3 x 3
    expected = torch.einsum("ngi,ngj->gij", windows, windows) / len(windows)
    monkeypatch.setattr(rounding, "WINDOW_VALUES", 1)  # one image at a time
    assert torch.allclose(rounding.input_hessian(layer, xs), expected, atol=1e-12)
    monkeypatch.setattr(rounding, "WINDOW_VALUES", 1 << 30)  # every batch whole
    assert torch.allclose(rounding.input_hessian(layer, xs), expected, atol=1e-12)
    # the bound the chunks keep: an image's window values are at most C x H x W x kh x kw (each pixel in up to
    # kh x kw windows); a budget of two images' worth, and a value short of it, chunks each batch by 2 and by 1
    unfolded, windows_of = [], rounding.input_windows
    monkeypatch.setattr(rounding, "input_windows", lambda c, chunk: unfolded.append(len(chunk)) or windows_of(c, chunk))
    for budget, chunks in ((2 * 6 * 9 * 9 * 3 * 3, [2, 2, 1, 2, 1]), (2 * 6 * 9 * 9 * 3 * 3 - 1, [1] * 8)):
        unfolded.clear()
        monkeypatch.setattr(rounding, "WINDOW_VALUES", budget)
        assert torch.allclose(rounding.input_hessian(layer, xs), expected, atol=1e-12)
        assert unfolded == chunks


def test_calibration_rounds_weights_by_error(small):
    model, calib, x = small
    folded = deploy.fold_batchnorm(model)
    with torch.no_grad():
        reference = folded(x)
        divergence = {}
        for mode in ("error", "nearest"):
            adjusted, ranges = calibrate.calibrate(folded, calib, rounding=mode)
            layer = adjusted.features[3].conv.weight
            divergence[mode] = kl(reference, sim.simulate(adjusted, ranges, x))
            on_grid = torch.equal(sim.fake_quant_weight(layer), layer)
            assert on_grid == (mode == "error")  # calibration left the rounded weights in place
    assert divergence["error"] < divergence["nearest"], divergence


def test_rounding_by_error_is_kept_only_where_it_diverges_less(small, monkeypatch):
    from mobilenets.quantize import rounding

    model, calib, x = small
    ready = quantize.prepare_int8(model, calib)
    kl_by_mode = ready.report["rounding_kl"]
    assert set(kl_by_mode) == {"error", "nearest"}
    assert ready.report["rounding_kept"] == min(kl_by_mode, key=kl_by_mode.get)
    # a rounding that wrecks the weights (each moved by ten steps) is measured, and refused
    wreck = rounding.round_weights
    monkeypatch.setattr(calibrate, "round_weights", lambda w, h, qmax: wreck(w, h, qmax) + 10 * sim.weight_scales(
        w).view(-1, *([1] * (w.dim() - 1))))
    refused = quantize.prepare_int8(model, calib)
    assert refused.report["rounding_kept"] == "nearest"
    assert refused.report["rounding_kl"]["error"] > 3 * refused.report["rounding_kl"]["nearest"]
    plain = quantize.prepare_int8(model, calib, rounding="nearest")
    with torch.no_grad():
        assert torch.equal(refused.simulate(x), plain.simulate(x))


def test_preparation_is_the_two_calibrations_and_the_less_divergent_one(small):
    """prepare_int8 shares one float path between the two roundings and reads the float logits off it; the
    result must be, bit for bit, each rounding calibrated alone, compared by the KL of the
    float model's logits and the int8 simulation's, the lower kept, as the file stores it."""
    model, calib, _ = small
    ready = quantize.prepare_int8(model, calib)
    equalized, scales = calibrate.equalize(deploy.fold_batchnorm(model), calib)
    with torch.no_grad():
        teacher = [equalized(x) for x in calib]
        alone = {mode: calibrate.calibrate(equalized, calib, rounding=mode) for mode in ("error", "nearest")}
        divergence = {}
        for mode, (folded, ranges) in alone.items():
            logits = [sim.simulate(folded, ranges, x) for x in calib]
            total = sum(float((p.exp() * (p - q)).sum()) for p, q in
                        ((t.log_softmax(1), z.log_softmax(1)) for t, z in zip(teacher, logits)))
            divergence[mode] = total / sum(len(x) for x in calib)
    assert ready.report["rounding_kl"] == divergence
    kept = min(divergence, key=divergence.get)
    folded, ranges = alone[kept]
    expected = quantize.from_model(quantize.to_model(quantize.Int8Ready(folded, ranges, scales, 64), model))
    assert ready.ranges == expected.ranges
    state, want = ready.folded.state_dict(), expected.folded.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert all(torch.equal(a, b) for a, b in zip(ready.scales, expected.scales))


def test_calibrating_both_roundings_at_once_gives_each_alone_and_the_float_logits(small):
    model, calib, _ = small
    equalized, _ = calibrate.equalize(deploy.fold_batchnorm(model), calib)
    # few samples per range, so that each rounding's range search draws from its generator
    float_logits, results = calibrate.calibrate_roundings(equalized, calib, ("error", "nearest"),
                                                          samples_per_batch=5000)
    with torch.no_grad():
        assert all(torch.equal(z, equalized(x)) for z, x in zip(float_logits, calib))
        for mode, result in zip(("error", "nearest"), results):
            folded, ranges = calibrate.calibrate(equalized, calib, rounding=mode, samples_per_batch=5000)
            assert result.ranges == ranges
            assert all(torch.equal(a, b) for a, b in zip(result.folded.state_dict().values(),
                                                         folded.state_dict().values()))
    assert results[0].ranges != results[1].ranges  # two roundings, two int8 graphs: the test can tell them apart


@pytest.mark.parametrize("method", ["p99", "p99.99"])
def test_a_percentile_range_is_numpys_nearest_percentiles_of_each_sign(method):
    """"p99.99" clips each side at that percentile: the top at numpy's 99.99th percentile (nearest sample), the
    bottom at the 0.01th, so a few outliers do not widen the int8 step; 0 stays inside the range. A
    one-sided (post-ReLU) activation keeps 0 as its bottom."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    v = torch.randn(10001, generator=g) * 2 + 0.5
    v[:3] = torch.tensor([40.0, -30.0, 25.0])  # outliers far beyond the percentiles
    q = float(method[1:]) / 100
    a = v.numpy()
    bottom, top = (float(np.quantile(a, p, method="nearest")) for p in (1 - q, q))
    assert bottom < -1 and top > 1  # both sides clipped well inside the outliers: the fixture can show a side lost
    assert calibrate.search_range(v, method) == (bottom, top)
    relu = v.clamp(min=0)
    assert calibrate.search_range(relu, method) == (0.0, float(np.quantile(relu.numpy(), q, method="nearest")))


def test_fake_quant_values_are_torchs_fake_quantize_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for lo, hi in [(0.0, 6.0), (0.0, 0.37), (-1.0, 1.0), (-2.5, 0.3), (-0.01, 20.0), (0.0, 1e-6)]:
        scale, zero_point = sim.act_qparams(lo, hi)
        v = torch.cat([(torch.rand(50_000, generator=g) * 1.4 - 0.2) * (hi - lo) + lo,  # beyond both ends too
                       (torch.randint(-300, 300, (2000,), generator=g) + 0.5) * scale,  # ties: round half to even
                       torch.tensor([0.0, -0.0, lo, hi])])
        assert torch.equal(sim.fake_quant_values(v, (lo, hi)), sim.fake_quant_act(v, (lo, hi))), (lo, hi)


@pytest.mark.parametrize("lo, hi", [(0.0, 6.0), (0.0, 0.37), (-1.0, 1.5), (-2.5, 0.3), (0.2, 0.5), (-0.6, -0.1)])
def test_activation_qparams_are_torchs_min_max_observers(lo, hi):
    """An activation range's uint8 scale and zero point are what torch's MinMaxObserver (quint8, per tensor,
    affine) computes from the same minimum and maximum: the range widened to hold 0 (ranges all above or all
    below 0 included), 255 steps over it.  (No range whose zero point is a tie, -lo / scale = k + 0.5: torch
    computes in float32 and may round it the other way, as (-1, 1) does.)"""
    from torch.ao.quantization import MinMaxObserver

    observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    observer(torch.tensor([lo, hi]))
    scale, zero_point = observer.calculate_qparams()
    ours = sim.act_qparams(lo, hi)
    assert ours[0] == pytest.approx(float(scale), rel=1e-6) and ours[1] == int(zero_point)


def test_int8_folding_carries_the_prepared_ranges_unless_plain_is_asked(small):
    """folded_for's int8 modes: "prepared" (the default) brings an Int8Ready calibrated on the batches given,
    "plain" only folds BatchNorm (the runtime's own quantizer calibrates), as fp32 does."""
    from mobilenets.deploy.prepare import folded_for

    model, batches, x = small
    prepared = folded_for(model, "int8", batches)
    plain = folded_for(model, "int8", batches, int8="plain")
    fp32 = folded_for(model, "fp32", batches)
    assert prepared.int8_ready is not None and set(prepared.int8_ready.ranges) >= {"input", "logits"}
    assert getattr(plain, "int8_ready", None) is None and getattr(fp32, "int8_ready", None) is None
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-4)


def test_single_clip_gives_each_layer_the_smallest_of_its_channel_clips(small):
    """PT2E and LiteRT fuse one clip per layer: single_clip gives each equalized layer the least of its per-channel
    ReLU6 clips (6 s_i with s_i >= 1, so 6 or more), over the same convolution, and keeps int8_ready."""
    from mobilenets.deploy.prepare import folded_for, single_clip

    model, batches, _ = small
    prepared = folded_for(model, "int8", batches)
    ready = prepared.int8_ready
    one = single_clip(prepared)
    assert one.int8_ready is ready and len(one.features) == len(ready.folded.features) == 27
    for mine, theirs in zip(one.features, ready.folded.features):
        assert mine.conv is theirs.conv
        assert mine.clamp_max == pytest.approx(float(theirs.channel_clamp.min())) and mine.clamp_max >= 6 - 1e-5
    # equalization spread the clips: one scalar per layer is a real choice, not every channel's value
    assert any(float(t.channel_clamp.max()) > float(t.channel_clamp.min()) * 1.01 for t in ready.folded.features)


def test_rounding_by_error_is_the_column_by_column_algorithm():
    """round_weights against the algorithm written plainly here, column by column on (out, K) rows."""
    from mobilenets.quantize import rounding

    g = torch.Generator().manual_seed(2)
    for out, inputs, groups, k in [(24, 40, 1, 1), (16, 16, 16, 3), (12, 6, 3, 3)]:
        weight = torch.randn(out, inputs // groups, k, k, generator=g)
        windows = torch.rand(300, groups, inputs // groups * k * k, generator=g, dtype=torch.float64)
        windows[:, :, 1] = 0  # an input that never fires
        hessian = torch.einsum("ngi,ngj->gij", windows, windows) / len(windows)
        expected = []
        for gi in range(groups):
            h = hessian[gi].clone()
            dead = h.diagonal() <= 0
            h.diagonal().add_(rounding.DAMPING * h.diagonal().mean().clamp_min(1e-12) + dead.double())
            u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
            rows = weight[gi * out // groups:(gi + 1) * out // groups].flatten(1)
            step = (rows.abs().amax(1) / 127).clamp_min(1e-12).double()  # the int8 grid: float32 max|w| / 127
            w = rows.double()
            peak = w.abs().argmax(1)
            original = w.clone()
            q = torch.empty_like(w)
            for j in range(w.shape[1]):
                column = torch.where(peak == j, original[:, j], w[:, j])
                q[:, j] = torch.clamp(torch.round(column / step), -127, 127) * step
                err = (w[:, j] - q[:, j]) / u[j, j]
                w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
            expected.append(q)
        want = torch.cat(expected).reshape(weight.shape).float()
        assert torch.equal(rounding.round_weights(weight, hessian), want), (out, inputs, groups, k)


def test_input_windows_are_unfolds_windows_bit_for_bit():
    from mobilenets.folding import FoldedConv
    from mobilenets.quantize import rounding

    g = torch.Generator().manual_seed(3)
    for k, stride, dilation, groups, padding, tf_pad in [(3, 1, 1, 1, 1, False), (3, 2, 2, 4, 2, False),
                                                         (3, 2, 1, 8, 0, True), (1, 1, 1, 1, 0, False),
                                                         (5, 2, 1, 2, 2, False), (1, 2, 1, 1, 0, True)]:
        conv = torch.nn.Conv2d(8, 8, k, stride=stride, dilation=dilation, groups=groups, padding=padding)
        layer = FoldedConv(conv, tf_pad, 6.0)
        x = torch.rand(2, 8, 13, 11, generator=g)
        cols = torch.nn.functional.unfold(sim.pad_same(layer, x), k, dilation=dilation, padding=padding,
                                          stride=stride)
        want = cols.transpose(1, 2).reshape(-1, groups, cols.shape[1] // groups).double()
        got = rounding.input_windows(layer, x)
        assert torch.equal(got, want) and got.is_contiguous(), (k, stride, dilation, groups, padding, tf_pad)


def test_int8_ready_file_round_trips(small, tmp_path):
    model, calib, x = small
    ready = quantize.prepare_int8(model, calib)
    path = quantize.save(ready, model, tmp_path / "ready.safetensors")
    loaded = load(path)
    assert loaded.meta.int8["ranges"]["features.0"] == [float(v) for v in ready.ranges["features.0"]]
    back = quantize.from_model(loaded)
    with torch.no_grad():
        assert torch.equal(back.simulate(x), ready.simulate(x))
        # the file's float model is the adjusted float model (equalization undone: one ReLU6 clip per layer)
        assert torch.allclose(loaded(x), ready.folded(x), rtol=1e-4, atol=1e-4 * float(ready.folded(x).abs().max()))
    assert quantize.from_model(model) is None


def test_simulation_computes_what_onnx_runtime_runs(small, tmp_path):
    """ONNX Runtime runs our QDQ file as integer kernels: int8 x int8 summed in int32 with an int32 bias, then
    requantized.  The simulation is that arithmetic, the biases' int32 rounding included.  On a CPU without VNNI
    the weights are prepared 7-bit, as deploy prepares them there, so that no int16 pair sum saturates."""
    model, calib, x = small
    ready = quantize.prepare_int8(model, calib, weight_qmax=deploy.machine.int8_weight_qmax())
    assert ready.resolution == 64  # what it was calibrated at (the model's metadata names none), so the file's input
    ours = ready.simulate(x)
    theirs = _ort(quantize.to_qdq_onnx(ready, tmp_path / "int8.onnx"))(x)
    steps = ((ours - theirs) / sim.act_qparams(*ready.ranges["logits"])[0]).round().abs()
    # measured: 17 of 160 logits 1-2 steps apart (float32 sums landing on the other side of a rounding tie,
    # then amplified), cosine 0.99996.  With float biases in the simulation: 149 of 160, up to 23 steps, 0.985
    assert deploy.parity(ours, theirs)["cosine"] >= 0.9995 and float(steps.max()) <= 4, steps.max()


@pytest.mark.skipif(not deploy.machine.int8_saturates(),
                    reason="only x86 CPUs without VNNI add u8 x s8 pairs into saturating int16")
def test_full_range_int8_weights_saturate_here_and_7_bit_ones_do_not(small, tmp_path):
    """Why deploy prepares 7-bit weights on this CPU: ONNX Runtime's AVX2 kernels (vpmaddubsw) add each pair of
    u8 x s8 products into int16, which weights up to 127 overflow.  Measured here (AMD EPYC, AVX2 only): full
    range, 158 of 160 logits off the simulation, by up to 78 steps, cosine 0.760; 7-bit: all 160 equal."""
    model, calib, x = small
    for qmax in (sim.WEIGHT_QMAX, sim.REDUCED_WEIGHT_QMAX):
        ready = quantize.prepare_int8(model, calib, weight_qmax=qmax)
        ours = ready.simulate(x)
        theirs = _ort(quantize.to_qdq_onnx(ready, tmp_path / f"int8-{qmax}.onnx"))(x)
        steps = float(((ours - theirs) / sim.act_qparams(*ready.ranges["logits"])[0]).round().abs().max())
        cosine = deploy.parity(ours, theirs)["cosine"]
        if qmax == sim.WEIGHT_QMAX:  # the bar of the test above, failed by far
            assert cosine < 0.99 and steps > 4, (cosine, steps)
        else:
            assert cosine >= 0.9995 and steps <= 4, (cosine, steps)


def test_bad_input_is_refused_with_what_works(small):
    model, calib, _ = small
    with pytest.raises(quantize.QuantizeError, match="steps must be"):
        quantize.prepare_int8(model, calib, steps=-1)
    with pytest.raises(quantize.QuantizeError, match=r"\(N, 3, H, W\)"):
        quantize.prepare_int8(model, [torch.zeros(2, 64, 64)])
    with pytest.raises(quantize.QuantizeError, match="method must be one of"):
        quantize.prepare_int8(model, calib, method="entropy")
    with pytest.raises(quantize.QuantizeError, match=r"rounding must be one of \('error', 'nearest'\)"):
        quantize.prepare_int8(model, calib, rounding="adaround")
    with pytest.raises(quantize.QuantizeError, match=r"weight_qmax must be one of \(127, 64\)"):
        quantize.prepare_int8(model, calib, weight_qmax=100)
    with pytest.raises(ValueError):  # MobilenetsError is a ValueError
        quantize.prepare_int8(torch.nn.Linear(2, 2), calib)


def _ort(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _ort_ops(path, tmp_path) -> dict:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops: dict = {}
    for node in onnx.load(options.optimized_model_filepath).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_real_weights_int8_keeps_the_float_answers(tmp_path):
    """Plain PTQ (ONNX Runtime's own calibration) against ours, same crops, in ONNX Runtime."""
    real_data = pytest.importorskip("real_data")
    model = real_data.real_model()
    calib = list(real_data.inception_input(real_data.calibration_crops(48)).split(16))
    x = real_data.inception_input(real_data.heldout_crops(96))
    with torch.no_grad():
        reference = torch.cat([model(b) for b in x.split(32)])
    plain = deploy.compile(model, "int8", calibration=calib, batch_size=32, backend="onnxruntime", int8="plain")
    plain_logits = torch.cat([plain(b) for b in x.split(32)])
    # as deploy prepares int8 for this CPU: 7-bit weights where the CPU has no VNNI (what full range costs there:
    # test_full_range_int8_weights_saturate_here_and_7_bit_ones_do_not; on these crops, ONNX Runtime kept 42%)
    ready = quantize.prepare_int8(model, calib, weight_qmax=deploy.machine.int8_weight_qmax())
    path = quantize.to_qdq_onnx(ready, tmp_path / "int8.onnx")
    ops = _ort_ops(path, tmp_path)
    # every convolution (27 + the classifier) runs as an integer kernel, not float on dequantized weights
    assert ops.get("QLinearConv") == 28 and "Conv" not in ops, ops
    ours = torch.cat([_ort(path)(b) for b in x.split(32)])

    plain_scores = agreement(reference, plain_logits), kl(reference, plain_logits)
    our_scores = agreement(reference, ours), kl(reference, ours)
    assert our_scores[0] >= plain_scores[0] + 0.1, (our_scores, plain_scores)
    assert our_scores[1] <= plain_scores[1] / 5, (our_scores, plain_scores)
    assert our_scores[0] >= 0.85 and our_scores[1] <= 0.035, our_scores
    # every other int8 backend runs the same int8-ready weights and ranges, from the saved file; the issue's
    # bar is >= 85% / <= 0.035 nats (measured on these 96 crops: OpenVINO, PT2E, LiteRT 92-94%, 0.010-0.014)
    loaded = load(quantize.save(ready, model, tmp_path / "ready.safetensors"))
    for backend in ("openvino", "torch", "litert"):
        run = deploy.compile(loaded, "int8", calibration=calib, batch_size=32, backend=backend)
        logits = torch.cat([run(b) for b in x.split(32)])
        scores = agreement(reference, logits), kl(reference, logits)
        assert scores[0] >= 0.85 and scores[1] <= 0.035, (backend, scores)


def test_cli_quantize_writes_int8_ready_weights(small, tmp_path, capsys):
    from imagefolders import make_split

    from mobilenets import cli, weights
    from mobilenets.images import INCEPTION

    model, _, x = small
    source = weights.save(weights.Converted(model.state_dict(), model.config,
                                            Metadata(resolution=64, normalization=INCEPTION, source="test")),
                          tmp_path / "w.safetensors")
    folder = make_split(tmp_path / "photos", per_class=6, seed=3)
    out = tmp_path / "ready.safetensors"
    code = cli.main(["quantize", "--weights", str(source), "--calib-data", str(folder), "--out", str(out), "-q"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["images"] == 18
    ready = quantize.from_model(load(out))
    assert set(ready.ranges) == {"input", "pool", "logits", *(f"features.{i}" for i in range(27))}
    assert cli.main(["quantize", "--weights", str(source), "--calib-data", str(folder), "--out", str(out),
                     "--steps", "-1"]) == 2
    assert "steps" in capsys.readouterr().err
    # the library call behind it, with its defaults: no fine-tuning steps, the same file as the command's
    from mobilenets.deploy.prepare import quantize_file

    again = quantize_file(source, folder, tmp_path / "again.safetensors")
    assert (again["steps"], again["images"]) == (0, 18) and again["top1_agreement"] == report["top1_agreement"]
    assert quantize.from_model(load(tmp_path / "again.safetensors")).ranges == ready.ranges


def test_distillation_moves_each_channel_in_its_own_weight_step(small):
    from mobilenets.quantize import qat

    # the learning-rate factor: a linear warm-up over the first fifth of the steps, then a cosine decay
    assert qat.schedule(0, 100) == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(0.0)).item()))
    assert qat.schedule(19, 100) == pytest.approx(0.5 * (1 + float(torch.cos(torch.tensor(19 / 100 * torch.pi)))))
    assert qat.schedule(9, 100) == pytest.approx(0.5 * 0.5 * (1 + float(torch.cos(torch.tensor(9 / 100 * torch.pi)))))
    assert qat.schedule(0, 1) == 1.0
    model, calib, _ = small
    ready = quantize.prepare_int8(model, calib)
    teacher = deploy.fold_batchnorm(model)
    lr = 0.01
    tuned = qat.distill(ready.folded, teacher, ready.ranges, calib, steps=1, lr=lr, augment=False)
    # Adam's first step moves every value with a gradient by lr in its sign: here lr of its own output
    # channel's int8 weight step (and of its layer's activation step, for a bias), whatever the channel's scale
    pairs = [(a.conv, b.conv, ready.ranges[f"features.{i}"])
             for i, (a, b) in enumerate(zip(ready.folded.features, tuned.features))]
    pairs.append((ready.folded.classifier, tuned.classifier, ready.ranges["logits"]))
    for before, after, rng in pairs:
        step = sim.weight_scales(before.weight).reshape(-1, *([1] * (before.weight.dim() - 1)))
        moved = (after.weight - before.weight).abs() / (lr * step)
        # (a weight without gradient, of a dead channel, stays; a few with gradients near Adam's eps move less)
        moved = moved[moved > 0.5]
        assert moved.numel() > 0 and float(moved.max()) < 1.02, (moved.min(), moved.max())
        assert float(moved.median()) > 0.9
        bias = (after.bias - before.bias).abs() / (lr * sim.act_qparams(*rng)[0])
        bias = bias[bias > 0.5]
        assert float(bias.max()) < 1.02 and float(bias.median()) > 0.9
