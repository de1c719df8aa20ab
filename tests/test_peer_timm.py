"""timm as a peer: our models pass timm's own generic model tests and keep timm's model contract.

- :func:`test_timm_runs_its_own_model_tests_on_ours` runs the functions of
  timm's ``tests/test_models.py`` on our registered names
  (``tests/timm_peer_suite.py``, which holds the table of what runs and why
  the rest does not apply).  The file comes from timm's source release of the
  installed version on PyPI, whose sdist ships ``tests/``: it is fetched with
  ``pip download --no-deps --no-binary :all: timm==<version>`` once into the
  test cache (``mobilenets.cache.cache_dir() / "test-data"``), never copied
  into this repository.
- Pretrained models come from the real 1.0-224 ImageNet weights the suite
  builds from Google's released graph (``tests/real_data.py``), placed in a
  temporary mobilenets cache as the converted download; the download URL
  points at a closed local port, so nothing is fetched from the internet.
- The rest pins the contract users rely on, with expected values from
  outside the code under test: torchvision's ``create_feature_extractor``
  reading the layers, timm's own ``adapt_input_conv``, the paper's widths and
  strides written out.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from mobilenets import mobilenet_v1, save
from mobilenets.checkpoint import atomic_write
from mobilenets.errors import MobilenetsError
from mobilenets.weights import WEIGHTS
from real_data import data_dir, heldout_crops, inception_input, pip_download, real_converted

timm = pytest.importorskip("timm")

SUITE = Path(__file__).with_name("timm_peer_suite.py")
REAL = "mobilenets_v1_100.keras_in1k_r224"
# Table 1 at alpha 1: the widths and strides at the ends of the five resolutions (rows 1, 3, 5, 11, 13)
LEVEL_ROWS = (1, 3, 5, 11, 13)
LEVEL_CHANNELS = [64, 128, 256, 512, 1024]
LEVEL_REDUCTIONS = [2, 4, 8, 16, 32]


def timm_tests_folder() -> Path:
    """A folder holding ``test_models.py`` of the installed timm's source release, fetched once."""
    version = timm.__version__
    folder = data_dir() / f"timm-{version}-tests"
    target = folder / "test_models.py"
    if not target.is_file():
        with tempfile.TemporaryDirectory(prefix="pip-download-") as tmp:
            sdist = pip_download(Path(tmp), f"timm=={version}", f"timm-{version}.tar.gz", "timm's model tests")
            with tarfile.open(sdist) as tar:
                member = tar.getmember(f"timm-{version}/tests/test_models.py")
                data = tar.extractfile(member).read()  # read in memory: no path from the archive is used
        atomic_write(target, lambda f: f.write(data))
    return folder


@pytest.fixture(scope="module")
def timm_tests():
    # module-scoped, so it runs before imagenet_cache moves MOBILENETS_CACHE: the download is cached for good
    return timm_tests_folder()


@pytest.fixture
def imagenet_cache(tmp_path, monkeypatch):
    """A mobilenets cache holding the real 1.0-224 weights where the download would put them; no URL works."""
    converted = real_converted()  # before MOBILENETS_CACHE moves: the real graph lives in the usual test cache
    cache = tmp_path / "cache"
    save(converted.model(), cache / Path(WEIGHTS[(1.0, 224)].keras_file).with_suffix(".safetensors"))
    monkeypatch.setenv("MOBILENETS_CACHE", str(cache))
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", "http://127.0.0.1:9/")  # the discard port: a fetch fails
    return cache


def test_timm_runs_its_own_model_tests_on_ours(timm_tests, imagenet_cache):
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_ACTIONS"}  # it hides the pretrained tests
    env["TIMM_TESTS"] = str(timm_tests)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "ignore::pytest.PytestUnknownMarkWarning", str(SUITE)],
                          cwd=SUITE.parent.parent, env=env, capture_output=True, text=True, timeout=1800)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, f"timm's model tests failed on our models: {summary}\n{done.stdout[-6000:]}"
    assert "skipped" not in summary and "deselected" not in summary, summary


@pytest.fixture(scope="module")
def photos():
    return inception_input(heldout_crops(4, 224))


def test_pretrained_features_only_are_the_layers_outputs(imagenet_cache, photos):
    from torchvision.models.feature_extraction import create_feature_extractor

    backbone = timm.create_model(REAL, pretrained=True, features_only=True)
    assert backbone.feature_info.channels() == LEVEL_CHANNELS
    assert backbone.feature_info.reduction() == LEVEL_REDUCTIONS
    reference = real_converted().model().eval()
    # torchvision reads the layers' outputs from the traced graph: no code of ours picks them
    nodes = {f"features.{row}": str(row) for row in LEVEL_ROWS}
    expected = create_feature_extractor(reference, return_nodes=nodes)(photos)
    with torch.no_grad():
        got = backbone.eval()(photos)
        endpoints = reference.forward_endpoints(photos, list(LEVEL_ROWS))
        _, intermediates = reference.forward_intermediates(photos)
    assert [tuple(g.shape[1:]) for g in got] == [(c, 224 // r, 224 // r) for c, r in zip(LEVEL_CHANNELS,
                                                                                        LEVEL_REDUCTIONS)]
    # the same layers on the same input: wrong weights or a wrong layer differ by O(1), float rounding by 1e-6
    for g, row, inter in zip(got, LEVEL_ROWS, intermediates):
        torch.testing.assert_close(g, expected[str(row)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(endpoints[row], expected[str(row)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inter, expected[str(row)], rtol=1e-5, atol=1e-5)
    # and the classifier is the released one: the same logits as the model built from the graph
    with torch.no_grad():
        logits = timm.create_model(REAL, pretrained=True).eval()(photos)
        torch.testing.assert_close(logits, reference(photos), rtol=1e-5, atol=1e-4)


def test_pretrained_grey_input_gives_the_rgb_answer(imagenet_cache, photos):
    """in_chans=1 adapts the first conv as timm does: a grey image gives what its RGB copy gives."""
    rgb = timm.create_model(REAL, pretrained=True).eval()
    grey = timm.create_model(REAL, pretrained=True, in_chans=1).eval()
    weight = rgb.features[0].conv.weight.detach()
    torch.testing.assert_close(grey.features[0].conv.weight.detach(),
                               timm.models.adapt_input_conv(1, weight), rtol=0, atol=0)
    six = timm.create_model(REAL, pretrained=True, in_chans=6).eval()
    torch.testing.assert_close(six.features[0].conv.weight.detach(), timm.models.adapt_input_conv(6, weight))
    x = photos.mean(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(six(photos.repeat(1, 2, 1, 1)), rgb(photos), rtol=1e-4, atol=1e-4)
    assert grey.pretrained_cfg["input_size"] == (1, 224, 224) and grey.in_chans == 1


def test_reset_classifier_keeps_the_cfg_true_and_eval_mode():
    model = mobilenet_v1(0.25, resolution=160).eval()
    assert model.pretrained_cfg["pool_size"] == (5, 5)  # 160 / 32
    model.reset_classifier(10)
    assert model.pretrained_cfg["num_classes"] == 10 and model.default_cfg["num_classes"] == 10
    assert model.num_classes == 10 and not any(m.training for m in model.modules())
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 10)
    model.train().reset_classifier(3)
    assert model.classifier.training


def test_unpooled_maps_and_per_position_logits():
    torch.manual_seed(0)
    model = mobilenet_v1(0.25).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        maps = model.forward_features(x)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 256, 3, 3) and torch.equal(model(x), maps)  # ceil(96 / 32) = 3
        model.reset_classifier(5)  # keeps no pooling: the classifier at every position, a 1x1 convolution
        w, b = model.classifier.weight, model.classifier.bias
        expected = torch.einsum("nchw,kc->nkhw", maps, w) + b[:, None, None]
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), maps.mean((2, 3)))
    fresh = mobilenet_v1(0.25, num_classes=0, global_pool="")
    assert fresh.pretrained_cfg["num_classes"] == 0 and fresh.eval()(x).shape == (2, 256, 3, 3)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        mobilenet_v1(0.25, global_pool="max")


def test_unknown_arguments_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="colour"):
        mobilenet_v1(0.25, colour="red")
    with pytest.raises(TypeError, match="weights='imagenet'"):
        mobilenet_v1(0.25, pretrained=True)
    path = save(mobilenet_v1(0.25), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="colour"):
        mobilenet_v1(0.25, weights=path, colour="red")
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("mobilenets_v1_025", not_a_model_arg=1)
    with pytest.raises(MobilenetsError, match="dropout or drop_rate"):
        mobilenet_v1(0.25, dropout=0.1, drop_rate=0.2)
    model = mobilenet_v1(0.25, drop_rate=0.3, device="meta", dtype=torch.float64)
    assert model.drop_rate == 0.3 and model.config.dropout == 0.3
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}


def test_feature_levels_and_pruning_follow_table_1():
    torch.manual_seed(0)
    model = mobilenet_v1(0.5, output_stride=16).eval()
    half = [c // 2 for c in LEVEL_CHANNELS]
    assert [f["num_chs"] for f in model.feature_info] == half
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 16]  # 1/32 dilated to 1/16
    assert [f["module"] for f in model.feature_info] == [f"features.{row}" for row in LEVEL_ROWS]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(t.shape[-2:]) for t in taps] == [(32, 48), (16, 24), (8, 12), (4, 6), (4, 6)]
        endpoints = model.forward_endpoints(x, list(LEVEL_ROWS))
        assert all(torch.equal(t, endpoints[row]) for t, row in zip(taps, LEVEL_ROWS))
        assert torch.equal(model.forward_intermediates(x, indices=2, intermediates_only=True)[0], taps[3])
        assert torch.equal(model.forward_intermediates(x, indices=[-4], stop_early=True,
                                                       intermediates_only=True)[0], taps[1])
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(x, indices=[5])
        backbone = mobilenet_v1(0.5, output_stride=16, features_only=True, out_indices=(1, 3))
        backbone.load_state_dict({k: v for k, v in model.state_dict().items() if k in backbone.state_dict()})
        got = backbone.eval()(x)
        assert backbone.feature_info.channels() == [64, 256] and backbone.feature_info.reduction() == [4, 16]
        assert torch.equal(got[0], taps[1]) and torch.equal(got[1], taps[3])
        assert len(backbone.features) == 12  # rows 12 and 13 are dropped: nothing after the last level runs
        model.prune_intermediate_layers([2])
        assert torch.equal(model.forward_features(x), taps[2]) and model.num_classes == 0
    with pytest.raises(MobilenetsError, match="pruned backbone"):
        save(backbone, Path(tempfile.mkdtemp()) / "b.safetensors")


def test_import_mobilenets_leaves_timm_alone_and_registers_in_either_order():
    code = ("import sys, mobilenets; assert 'timm' not in sys.modules and 'torch' not in sys.modules; "
            "import timm; print(sorted(timm.list_models('mobilenets_v1_*')))")
    names = "['mobilenets_v1_025', 'mobilenets_v1_050', 'mobilenets_v1_075', 'mobilenets_v1_100']"
    for program in (code, "import timm, mobilenets; print(sorted(timm.list_models('mobilenets_v1_*')))"):
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == names, done.stderr[-2000:]
    tags = timm.list_pretrained("mobilenets_v1_075.*")
    assert sorted(tags) == [f"mobilenets_v1_075.keras_in1k_r{r}" for r in (128, 160, 192, 224)]
