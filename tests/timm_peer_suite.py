"""timm's own generic model tests, run on mobilenets' models: the functions of timm's ``tests/test_models.py``.

Not collected by the suite itself (no ``test_`` prefix): ``test_peer_timm.py``
runs it with pytest in a subprocess, with ``$TIMM_TESTS`` the folder holding
``test_models.py`` taken from timm's source release of the installed version
(never copied into this repository).  Each generic test function, one that
timm parametrizes over its registry (``list_models``), runs with its body and
assertions as timm wrote them; only the model names change, to ours.  The
two tables below are the one place that says which run and why the others
do not apply; a generic test that timm adds later fails here until it is
put in one of them.
"""

import os
import sys
import types

import pytest

import mobilenets.timm  # noqa: F401  (registers our names before timm's test module lists the registry)

sys.path.insert(0, os.environ["TIMM_TESTS"])
import test_models as timm_tests  # noqa: E402

NAMES = ["mobilenets_v1_025", "mobilenets_v1_100"]
# every pretrained tag of each name (test_model_default_cfgs walks the tags, as timm's does)
TAGGED = [f"{name}.keras_in1k_r{r}" for name in NAMES for r in (224, 128)]
# only the 1.0-224 weights are at hand offline: the suite builds them from the real release (tests/real_data.py)
PRETRAINED = ["mobilenets_v1_100.keras_in1k_r224"]

RUN = {
    "test_model_forward": NAMES,
    "test_model_backward": NAMES,
    "test_model_default_cfgs": TAGGED,
    "test_model_load_pretrained": PRETRAINED,
    "test_model_features_pretrained": PRETRAINED,
    "test_model_forward_torchscript": NAMES,
    "test_model_forward_features": NAMES,
    "test_model_forward_intermediates_features": NAMES,
    "test_model_forward_intermediates": NAMES,
    "test_prune_intermediate_layers_contract": NAMES,
    "test_model_forward_fx": NAMES,
    "test_model_backward_fx": NAMES,
    "test_model_forward_fx_torchscript": NAMES,
}
NOT_APPLICABLE = {
    "test_model_inference": "compares timm's own test_* models with reference tensors fetched from the Hugging "
                            "Face hub; there are none for other models (our real-weights check: test_peer_timm.py)",
    "test_model_default_cfgs_non_std": "the same checks as test_model_default_cfgs, loosened for transformer-like "
                                       "models (timm's NON_STD_FILTERS); ours runs the strict one",
}
# timm's listings hold hundreds of names; a hand-written list of a few of timm's models is a model-specific test
GENERIC_MIN_NAMES = 50


def _generic_tests() -> dict:
    found = {}
    for name, fn in vars(timm_tests).items():
        if name.startswith("test_") and callable(fn):
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "parametrize" and mark.args[0] == "model_name" and len(mark.args[1]) >= GENERIC_MIN_NAMES:
                    found[name] = fn
    return found


def _ours(fn, names):
    """``fn`` with its body, defaults and other marks as they are, parametrized over ``names``."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.pytestmark = [m for m in fn.pytestmark if not (m.name == "parametrize" and m.args[0] == "model_name")]
    return pytest.mark.parametrize("model_name", names)(copy)


GENERIC = _generic_tests()
cfg_device = timm_tests.cfg_device  # the fixture timm's config tests use

for _name, _fn in GENERIC.items():
    if _name in RUN:
        globals()[_name] = _ours(_fn, RUN[_name])


def test_every_generic_timm_test_is_run_or_has_a_reason():
    undecided = sorted(set(GENERIC) - set(RUN) - set(NOT_APPLICABLE))
    assert not undecided, f"timm's test_models.py has generic tests not in RUN or NOT_APPLICABLE: {undecided}"
    gone = sorted(set(RUN) - set(GENERIC))
    assert not gone, f"RUN names tests timm's test_models.py no longer has (or no longer generic): {gone}"
