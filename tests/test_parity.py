"""Loading the released formats gives the logits the original implementations give.

Each peer is the real implementation, not our expectation of it: Keras 3 (its
PyTorch backend) and Keras 2 (tf_keras) build keras.applications.MobileNet,
TensorFlow runs TF-slim's MobileNet graph, timm builds mobilenetv1_*.  Their
weights (random, with BatchNorm statistics far from the 0/1 defaults) are
written in the released layouts, converted by ``mobilenets convert``'s code,
saved as .safetensors, loaded back with ``mobilenets.load`` and run on the same
input.  The bar: max |ours - theirs| <= 1e-4 * max |theirs|, in float32.

Keras and TensorFlow run in subprocesses (tests/reference_peers.py), so no
backend shares this process.  ``pytest tests/test_parity.py -s`` prints one
line per case with the measured relative difference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mobilenets
from mobilenets import weights

TOLERANCE = 1e-4
PEERS = Path(__file__).with_name("reference_peers.py")

# alpha:resolution[:notop]. Official sizes plus small ones (fast) and 100 px, whose odd
# intermediate maps (25 -> 13) exercise TensorFlow's asymmetric SAME padding.
CASES = {
    "keras3": ["1.0:224", "0.75:128", "0.5:96:notop"],
    "keras2": ["1.0:160", "0.5:96", "0.25:64:notop"],
    "tf-slim": ["1.0:224", "0.5:160", "0.25:100"],
}
NEEDS = {"keras3": "keras", "keras2": "tf_keras", "tf-slim": "tensorflow"}


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def report(peer: str, case: str, rel: float) -> None:
    print(f"\nparity {peer:8} {case:24} max|diff|/max|logit| = {rel:.2e}")


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """Run each peer once per session; returns {peer: (folder, manifest)}."""
    made = {}

    def get(peer):
        if peer not in made:
            if importlib.util.find_spec(NEEDS[peer]) is None:
                pytest.skip(f"{NEEDS[peer]} is not installed (pip install -e '.[test]' installs it)")
            out = tmp_path_factory.mktemp(peer)
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
            env.pop("KERAS_BACKEND", None)
            if peer == "keras3":  # Keras 3 on PyTorch; tf_keras must not see it (it would load torch beside TF)
                env["KERAS_BACKEND"] = "torch"
            run = subprocess.run([sys.executable, str(PEERS), peer, str(out), *CASES[peer]],
                                 capture_output=True, text=True, env=env, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            made[peer] = (out, json.loads((out / f"{peer}.json").read_text()))
        return made[peer]

    return get


def ours(model, x_nhwc: np.ndarray, notop: bool) -> np.ndarray:
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    with torch.no_grad():
        if notop:  # Keras without top returns the last feature map, NHWC
            return model.forward_features(x).permute(0, 2, 3, 1).numpy()
        return model(x).numpy()


def convert_save_load(source: str, src: Path, tmp_path: Path, **kwargs):
    out = tmp_path / (src.name + ".safetensors")
    weights.save(weights.convert(source, src, **kwargs), out)
    return mobilenets.load(out)


@pytest.mark.parametrize("peer", ["keras3", "keras2"])
def test_keras_parity(peer, references, tmp_path):
    folder, manifest = references(peer)
    assert len(manifest["cases"]) == len(CASES[peer])
    for case in manifest["cases"]:
        ref = np.load(folder / case["reference"])
        for name in case["files"]:
            model = convert_save_load("keras", folder / name, tmp_path)
            assert model.config.alpha == case["alpha"]
            assert model.config.num_classes == (0 if case["notop"] else 1000)
            assert model.config.padding == "tf_same" and model.config.bn_eps == 1e-3
            assert model.meta.resolution == case["resolution"]  # from the file name or the model config
            rel = relative_difference(ours(model, ref["x"], case["notop"]), ref["y"])
            report(f"{peer} {manifest['version']}", name, rel)
            assert rel <= TOLERANCE, (name, rel)


def test_keras2_files_use_keras2_names(references):
    """The Keras 2 reference really has the released layout: layer_names and 'layer/weight:0' names."""
    import h5py

    folder, manifest = references("keras2")
    with h5py.File(folder / manifest["cases"][0]["files"][0], "r") as f:
        assert "conv_dw_1" in [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        names = [n.decode() if isinstance(n, bytes) else n for n in f["conv_dw_1"].attrs["weight_names"]]
        assert names == ["conv_dw_1/depthwise_kernel:0"]


def test_tf_slim_parity(references, tmp_path):
    folder, manifest = references("tf-slim")
    for case in manifest["cases"]:
        ref = np.load(folder / case["reference"])
        prefix = folder / case["files"][0]
        model = convert_save_load("tf-slim", prefix, tmp_path)
        assert model.config.alpha == case["alpha"] and model.config.num_classes == 1000
        assert model.meta.resolution == case["resolution"]  # from the folder name mobilenet_v1_<a>_<r>
        assert model.meta.labels[0] == "tench, Tinca tinca"
        # TF-slim's class 0 is "background": dropped by default
        rel = relative_difference(ours(model, ref["x"], False), ref["y"][:, 1:])
        report(f"tf-slim {manifest['version']}", f"{case['alpha']}-{case['resolution']}", rel)
        assert rel <= TOLERANCE, (case, rel)


def test_tf_slim_keep_background(references, tmp_path):
    folder, manifest = references("tf-slim")
    case = manifest["cases"][-1]
    ref = np.load(folder / case["reference"])
    model = convert_save_load("tf-slim", folder / case["files"][0], tmp_path, keep_background=True)
    assert model.config.num_classes == 1001 and model.meta.labels[0] == "background"
    assert relative_difference(ours(model, ref["x"], False), ref["y"]) <= TOLERANCE


def test_tf_checkpoint_reader_matches_tensorflow(references):
    """Every variable our reader decodes equals what TensorFlow's own reader returns."""
    folder, manifest = references("tf-slim")
    prefix = str(folder / manifest["cases"][-1]["files"][0])
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "r = tf.train.load_checkpoint(sys.argv[1])\n"
        "np.savez(sys.argv[2], **{k.replace('/', '|'): r.get_tensor(k) for k in r.get_variable_to_shape_map()})\n"
    )
    out = Path(prefix).with_name("tf_reader.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("KERAS_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", script, prefix, str(out)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    from mobilenets.weights.tf_checkpoint import CheckpointReader

    with CheckpointReader(prefix) as reader:
        assert reader.names() == sorted(theirs)  # global_step (int64) included
        for name in reader.names():
            mine = reader.read(name)
            assert mine.dtype == theirs[name].dtype and mine.shape == theirs[name].shape, name
            np.testing.assert_array_equal(mine, theirs[name])


# ---------------------------------------------------------------- timm (in process: it is PyTorch)


def _timm_model(alpha: float):
    timm = pytest.importorskip("timm")
    if alpha == 1.0:
        return timm.create_model("mobilenetv1_100", pretrained=False)
    if alpha == 1.25:
        return timm.create_model("mobilenetv1_125", pretrained=False)
    from timm.models.efficientnet import _gen_mobilenet_v1  # the generator behind mobilenetv1_100 / _125

    return _gen_mobilenet_v1("mobilenetv1_100", channel_multiplier=alpha, pretrained=False)


def _randomise_bn(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.3
            m.running_var = torch.rand(n, generator=g) * 1.7 + 0.3


@pytest.mark.parametrize("alpha,resolution,suffix", [
    (1.0, 224, ".pth"), (1.25, 96, ".bin"), (0.75, 128, ".safetensors"), (0.25, 64, ".pth"),
])
def test_timm_parity(alpha, resolution, suffix, tmp_path):
    theirs = _timm_model(alpha).eval()
    _randomise_bn(theirs, seed=int(alpha * 100) + resolution)
    src = tmp_path / f"mobilenetv1{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(src))
    else:
        torch.save(theirs.state_dict(), src)
    model = convert_save_load("timm", src, tmp_path)
    assert model.config.alpha == alpha and model.config.padding == "symmetric" and model.config.bn_eps == 1e-5
    assert model.meta.normalization.to_dict() == {"mean": [0.5] * 3, "std": [0.5] * 3}
    x = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected, got = theirs(x).numpy(), model(x).numpy()
    rel = relative_difference(got, expected)
    report("timm", f"{alpha}-{resolution} ({suffix})", rel)
    assert rel <= TOLERANCE


def test_corrupted_tf_checkpoint_is_detected(references, tmp_path):
    import shutil

    folder, manifest = references("tf-slim")
    src = (folder / manifest["cases"][-1]["files"][0]).parent
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    shard = copy / "model.ckpt.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC-32C"):
        weights.convert("tf-slim", copy / "model.ckpt")


def test_tf_slim_released_archive_converts_like_its_checkpoint(references, tmp_path):
    """The releases are .tgz archives holding model.ckpt.* beside other files; convert reads them as they are."""
    import tarfile

    folder, manifest = references("tf-slim")
    prefix = folder / manifest["cases"][-1]["files"][0]
    archive = tmp_path / f"{prefix.parent.name}.tgz"
    (tmp_path / "info.txt").write_text("not a checkpoint")
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(prefix.parent.iterdir()):
            tar.add(f, arcname=f"./{f.name}")
        tar.add(tmp_path / "info.txt", arcname="./info.txt")
    a, b = weights.convert("tf-slim", archive), weights.convert("tf-slim", prefix)
    assert a.meta.resolution == b.meta.resolution == manifest["cases"][-1]["resolution"]
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
