"""torchvision's contract for classification models, held by ours (mobilenets.models).

Three parts:

- Our weights enum and transforms against what torchvision's own code does
  with them: ``torchvision.models.get_model_weights`` finds the enum, the
  ``meta`` schema its test_extended_models.py validates (the fields written
  out below), ``num_params`` and ``_ops`` recounted by PyTorch on a built
  model, pickle / copy identity, the transforms scripting and giving the
  eval preprocessing's pixels, the builders taking members and their names.
- ``create_feature_extractor`` then ``torch.jit.script`` on the real 1.0-224
  ImageNet weights (tests/real_data.py), equal to ``forward_endpoints``.
- torchvision's own test functions (test/test_models.py,
  test/test_extended_models.py of its release) called with our builder, when
  their sources are at hand: ``$MOBILENETS_TORCHVISION_TESTS`` names the
  ``test/`` folder of a torchvision source tree of the installed version.
  No package registry carries those files (torchvision 0.29.1 is on PyPI
  as wheels only, whose ``torchvision/`` package has no tests; its last
  sdist is 0.1.6; Debian has 0.14.1, npm nothing), so without the variable
  these are skipped, saying so.  :data:`NOT_APPLICABLE` lists the ones that
  cannot apply to a model outside ``torchvision.models``, with why.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mobilenets
from mobilenets.images import IMAGENET, EvalTransform, eval_transform
from mobilenets.weights import WeightsError, registry
from weights_helpers import Server, write_keras2_h5

torchvision_models = pytest.importorskip("torchvision.models")
from mobilenets.models import MobileNet_V1_Weights, mobilenet_v1  # noqa: E402 (after torchvision is known)

# torchvision's test_extended_models.py, test_schema_meta_validation: the fields a classification entry must
# have, and all it may have
REQUIRED = {"categories", "num_params", "min_size", "recipe", "_metrics", "_docs", "_ops", "_file_size"}
PERMITTED = {"backend", "categories", "keypoint_names", "license", "_metrics", "min_size", "min_temporal_size",
             "num_params", "recipe", "unquantized", "_docs", "_ops", "_file_size"}

# torchvision's tests that cannot apply to a model outside torchvision.models, with why: the one place they
# are listed.  Run with our builder (below): test_models.py::test_classification_model,
# test_extended_models.py::test_naming_conventions and ::test_transforms_jit.
NOT_APPLICABLE = {
    "test_extended_models.py::test_schema_meta_validation":
        "needs _file_size, the size of the released file in torch.hub's cache; Keras publishes none and the "
        "file cannot be fetched here (its other checks: test_meta_has_the_classification_schema, "
        "test_num_params_and_ops_are_recounted)",
    "test_extended_models.py::test_get_model, test_get_model_builder, test_get_model_weights, "
    "test_weights_copyable, test_weights_deserializable, test_list_models, test_list_models_filters, "
    "test_get_weight":
        "look names up in torchvision's own registry, which takes entries only through the private "
        "torchvision.models._api.register_model (copy and pickle: test_members_pickle_and_copy_to_themselves)",
    "test_extended_models.py::TestHandleLegacyInterface":
        "tests torchvision's pretrained= decorator on a sentinel builder; no model is passed in",
    "test_backbone_utils.py (every test)":
        "builds torchvision's models by name (resnet_fpn_backbone, mobilenet_backbone, TestFxFeatureExtraction) "
        "or tests create_feature_extractor on its own toy modules (ours: "
        "test_feature_extractor_scripts_and_equals_endpoints)",
    "test_models.py (every test but test_classification_model)":
        "named torchvision models and their options (densenet, resnet dilation, detection, video, quantized, ...)",
}


def alpha_of(weights) -> float:
    return next(e.alpha for e in registry.WEIGHTS.values() if e.enum_name == weights.name)


# ---------------------------------------------------------------- the enum


def test_torchvision_finds_the_enum_and_its_default():
    assert torchvision_models.get_model_weights(mobilenet_v1) is MobileNet_V1_Weights
    assert len(MobileNet_V1_Weights) == 16  # the released alpha x resolution grid; DEFAULT is an alias
    assert MobileNet_V1_Weights.DEFAULT is MobileNet_V1_Weights.IMAGENET1K_1_0_224
    assert MobileNet_V1_Weights.verify("MobileNet_V1_Weights.IMAGENET1K_0_5_160") is \
        MobileNet_V1_Weights.IMAGENET1K_0_5_160
    assert all(w.name.isupper() for w in MobileNet_V1_Weights)


def test_meta_has_the_classification_schema():
    for w in MobileNet_V1_Weights:
        entry = registry.get(alpha_of(w), int(w.name.rsplit("_", 1)[1]))
        # _file_size is the one field left out (NOT_APPLICABLE says why)
        assert REQUIRED - set(w.meta) == {"_file_size"} and set(w.meta) <= PERMITTED
        assert w.meta["_metrics"] == {"ImageNet-1K": {"acc@1": entry.top1, "acc@5": entry.top5}}
        # the same 1000 classes in the same order as torchvision's ImageNet models (the oracle), which keep
        # only the first name of each synset and rename its two duplicates (crane, maillot)
        theirs = torchvision_models.ResNet18_Weights.DEFAULT.meta["categories"]
        differ = [(o, t) for o, t in zip(w.meta["categories"], theirs) if o.split(", ")[0] != t]
        assert len(w.meta["categories"]) == 1000 and len(differ) == 2, differ
        assert w.url.endswith(f"/{entry.keras_file}")
    # the published table (research/slim/nets/mobilenet_v1.md), two cells written out here
    assert MobileNet_V1_Weights.IMAGENET1K_0_75_160.meta["_metrics"]["ImageNet-1K"] == {"acc@1": 65.3, "acc@5": 86.0}
    assert MobileNet_V1_Weights.IMAGENET1K_0_25_128.meta["_metrics"]["ImageNet-1K"] == {"acc@1": 41.5, "acc@5": 66.3}


@pytest.mark.parametrize("name", ["IMAGENET1K_1_0_224", "IMAGENET1K_0_5_160", "IMAGENET1K_0_25_128"])
def test_num_params_and_ops_are_recounted(name):
    """torchvision's schema test recounts both on the built model: parameters() and one FLOP per
    multiply-add of the convolutions and the classifier at the transforms' crop (PyTorch's FlopCounterMode
    counts 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    w = MobileNet_V1_Weights[name]
    model = mobilenets.mobilenet_v1(alpha_of(w)).eval()
    assert w.meta["num_params"] == sum(p.numel() for p in model.parameters())
    x = w.transforms()(torch.rand(1, 3, 512, 512))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert w.meta["_ops"] == round(counter.get_total_flops() / 2 / 1e9, 3)


def test_members_pickle_and_copy_to_themselves():
    for w in MobileNet_V1_Weights:
        assert pickle.loads(pickle.dumps(w)) is w
        assert copy.copy(w) is w and copy.deepcopy(w) is w


# ---------------------------------------------------------------- the transforms


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(500, 375), (131, 517)])  # odd sides: the crop's rounding shows
def test_transforms_script_and_give_the_eval_preprocessing(size):
    resolution, normalization = 160, IMAGENET  # not the defaults: normalisation and size must be passed on
    transform = EvalTransform(resolution, normalization)
    scripted = torch.jit.script(transform)
    image = photo(*size)
    expected = eval_transform(image, resolution, normalization)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(transform(image), expected)
    assert torch.equal(transform(pixels), expected)
    assert torch.equal(scripted(pixels), expected)
    assert torch.equal(scripted(torch.stack([pixels, pixels]))[1], expected)
    # a float image in [0, 1] is resized before rounding to 8 bits: within one grey level of uint8 pixels
    as_float = scripted(pixels.float() / 255)
    assert float((as_float - expected).abs().max()) <= 1.01 / 255 / min(normalization.std)


@pytest.mark.parametrize("shape", [(3, 375, 501), (2, 3, 517, 133)])  # crop offsets x.5: rounding shows
def test_transforms_equal_torchvisions_image_classification_on_tensors(shape):
    """torchvision's ImageClassification with the same sizes (the oracle): the same sizes and crop offsets and
    the same antialiased bilinear filter.  On a float image they agree up to the normalising arithmetic
    ((x / 255 - mean) / std against our x * scale - shift: float32 ulps of values up to 2.7); on uint8 pixels
    torchvision resizes in float and rounds, ours with PyTorch's uint8 kernel: one grey level apart at most
    (a wrong size or a crop one pixel off moves values by far more on this noise image)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    from mobilenets.images import resize_size

    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    theirs = ImageClassification(crop_size=160, resize_size=resize_size(160), mean=IMAGENET.mean,
                                 std=IMAGENET.std, interpolation=InterpolationMode.BILINEAR, antialias=True)
    ours = torch.jit.script(EvalTransform(160, IMAGENET))
    grey_level = 1 / 255 / min(IMAGENET.std)
    assert float((ours(pixels) - theirs(pixels)).abs().max()) <= grey_level + 1e-5
    floats = pixels.float() / 255
    torch.testing.assert_close(ours(floats), theirs(floats), rtol=0, atol=1e-5)


def test_member_transforms_are_modules_that_script():
    w = MobileNet_V1_Weights.IMAGENET1K_0_75_192
    transform = w.transforms()
    assert isinstance(transform, torch.nn.Module)
    x = torch.rand(2, 3, 300, 256)
    out = torch.jit.script(transform)(x)
    assert out.shape == (2, 3, 192, 192) and torch.allclose(out, transform(x), atol=1e-6)
    assert torch.equal(transform(photo(300, 256)), eval_transform(photo(300, 256), 192))


# ---------------------------------------------------------------- the builders take members and their names


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """Keras files in the released layout (random values) on 127.0.0.1, under the released names."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = Server(folder)
    monkeypatch.setenv("MOBILENETS_WEIGHTS_URL", server.url)
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    server.folder = folder
    yield server
    server.close()


def test_builders_take_a_member_its_name_or_imagenet(served):
    write_keras2_h5(served.folder / "mobilenet_5_0_160_tf.h5", 0.5, seed=4)
    w = MobileNet_V1_Weights.IMAGENET1K_0_5_160
    x = torch.rand(1, 3, 160, 160)
    reference = mobilenets.mobilenet_v1(0.5, weights="imagenet", resolution=160).eval()(x)
    name = "MobileNet_V1_Weights.IMAGENET1K_0_5_160"
    for model in (mobilenet_v1(weights=w), mobilenet_v1(weights=name), mobilenets.mobilenet_v1(weights=w),
                  mobilenets.mobilenet_v1(weights=name), mobilenets.mobilenet_v1(0.5, weights=w, resolution=160)):
        assert model.config.alpha == 0.5 and model.meta.resolution == 160
        assert torch.equal(model.eval()(x), reference)
    assert served.requests == ["/mobilenet_5_0_160_tf.h5"]  # one download, converted once


def test_builders_refuse_a_member_that_contradicts_alpha_or_resolution():
    with pytest.raises(WeightsError, match="0.5-160 weights, not alpha 1.0"):
        mobilenets.mobilenet_v1(1.0, weights=MobileNet_V1_Weights.IMAGENET1K_0_5_160)
    with pytest.raises(WeightsError, match="not resolution 224"):
        mobilenets.mobilenet_v1(weights="MobileNet_V1_Weights.IMAGENET1K_0_5_160", resolution=224)
    with pytest.raises(WeightsError, match="names no released weights; choose one of .*IMAGENET1K_1_0_224"):
        mobilenets.mobilenet_v1(weights="MobileNet_V1_Weights.IMAGENET1K_V1")
    with pytest.raises(TypeError, match="expected MobileNet_V1_Weights"):
        mobilenet_v1(weights=torchvision_models.ResNet18_Weights.DEFAULT)


def test_fresh_models_keep_the_old_defaults():
    assert mobilenets.mobilenet_v1().config.alpha == 1.0
    assert mobilenet_v1(alpha=0.25, num_classes=50).config.num_classes == 50


# ---------------------------------------------------------------- feature extraction on the real weights


def test_feature_extractor_scripts_and_equals_endpoints():
    """create_feature_extractor's graph module, scripted, gives the model's own forward_endpoints on the
    real 1.0-224 weights; equal to float rounding (the same kernels, in the same order)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    real_data = pytest.importorskip("real_data")
    model = real_data.real_model().eval()
    nodes = {"features.3.pointwise": "Conv2d_3_pointwise", "features.11": "Conv2d_11", "features.13": "Conv2d_13"}
    scripted = torch.jit.script(create_feature_extractor(model, return_nodes=nodes))
    x = real_data.inception_input(real_data.heldout_crops(2))
    with torch.no_grad():
        ours = model.forward_endpoints(x, endpoints=list(nodes.values()))
        theirs = scripted(x)
    assert list(theirs) == list(ours) == list(nodes.values())
    for name in nodes.values():
        assert float(ours[name].abs().max()) > 0.1  # real activations, not an empty map
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-5)
    # and the classifier on top: the scripted full model gives the logits of the eager one
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- torchvision's own test functions


def torchvision_tests():
    """torchvision's test_models and test_extended_models modules, imported from $MOBILENETS_TORCHVISION_TESTS.

    test_models reads EXPECTTEST_ACCEPT once, on import: it is set to 1 for that import, since its stored
    outputs are torchvision's own models' and ours has none (their workflow for a new model), so
    test_classification_model records ours instead of comparing: that one check is vacuous, the others
    (classes, scripting, fx, backprop) run as written.
    """
    folder = os.environ.get("MOBILENETS_TORCHVISION_TESTS")
    if not folder:
        pytest.skip("torchvision's test sources are not here: set MOBILENETS_TORCHVISION_TESTS to the test/ folder "
                    "of a torchvision source tree (no package registry ships them; see this file's docstring)")
    if not (Path(folder) / "test_models.py").is_file():
        pytest.fail(f"MOBILENETS_TORCHVISION_TESTS={folder} holds no test_models.py")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXPECTTEST_ACCEPT", "1")
        import test_extended_models
        import test_models

    return test_models, test_extended_models


def test_torchvision_classification_model():
    test_models, _ = torchvision_tests()
    test_models.test_classification_model(mobilenet_v1, "cpu")


@pytest.mark.parametrize("name", ["test_naming_conventions", "test_transforms_jit"])
def test_torchvision_extended(name):
    _, test_extended_models = torchvision_tests()
    getattr(test_extended_models, name)(mobilenet_v1)
