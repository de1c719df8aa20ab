"""The official ImageNet weights: convert, load and fetch them; the public ``mobilenet_v1`` builder.

Three released sources map onto our state dict (``model.py`` names):

- **keras**: legacy HDF5 files (``mobilenet_1_0_224_tf.h5`` and ``_no_top``),
  written by Keras 2 (``conv_dw_1/depthwise_kernel:0``) or by Keras 3's legacy
  writer (``conv_dw_1/kernel``).  TF "same" padding, BN epsilon 1e-3.
- **tf-slim**: TensorFlow checkpoints (``model.ckpt.index`` + ``.data-*``),
  read by :mod:`mobilenets.tf_checkpoint` without TensorFlow.  1001 classes,
  class 0 is "background" and is dropped unless asked to keep it.
- **timm**: ``mobilenetv1_100``-style state dicts (.pth/.bin/.safetensors).
  Symmetric padding, BN epsilon 1e-5.

A converted file is a ``.safetensors`` whose metadata (str -> str, values
JSON) carries the architecture options, alpha, the resolution the weights
were trained at, the preprocessing, the labels, the source and a sha256 of
the tensors.  :func:`load` reads such files and training checkpoints; neither
path ever unpickles code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .images import INCEPTION, Normalization
from .model import MobileNetV1, MobileNetV1Config

SOURCES = ("keras", "tf-slim", "timm", "tflite")

# The released Keras files: keras.applications.mobilenet names alpha 0.75 "7_5" and so on.
KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
KERAS_ALPHAS = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}
KERAS_RESOLUTIONS = (224, 192, 160, 128)
DEFAULT_RESOLUTION = 224

FORMAT = "mobilenets"
VERSION = 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Options that are properties of a set of weights; a caller may not override them when loading.
FIXED_OPTIONS = ("alpha", "activation", "padding", "bn_eps", "min_depth", "full_conv", "shallow")

_BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")
_BN_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


class WeightsError(ValueError):
    """Weights that cannot be converted, loaded or fetched; the message says why and what would work."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in the order every released MobileNet uses (synset order)."""
    text = resources.files("mobilenets").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    labels = text.splitlines()
    assert len(labels) == 1000, "the packaged imagenet_classes.txt must list 1000 classes"
    return labels


@dataclass
class Converted:
    """Weights in our layout: a state dict, the config that fits it and the metadata of the weights."""

    state_dict: dict[str, torch.Tensor]
    config: MobileNetV1Config
    meta: dict

    def model(self) -> MobileNetV1:
        model = _empty_model(self.config)
        checkpoint.load_state_dict(model, self.state_dict, path=self.meta.get("source", "<converted>"))
        model.meta = dict(self.meta)
        return model.eval()


def _empty_model(config: MobileNetV1Config) -> MobileNetV1:
    """The model with uninitialised storage, for weights that will overwrite every tensor (skips the init)."""
    with torch.device("meta"):
        model = MobileNetV1(config)
    return model.to_empty(device="cpu")


# ---------------------------------------------------------------- assembling our state dict

# A source yields, per layer of Table 1, a kernel in TF layout (HWIO; depthwise HWC1) or PyTorch
# layout, and its BatchNorm; these helpers put them under our names.


def _conv_from_hwio(kernel: np.ndarray, depthwise: bool) -> torch.Tensor:
    k = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32))
    # HWIO -> OIHW; a depthwise kernel is H, W, C, multiplier -> C, multiplier, H, W
    return (k.permute(2, 3, 0, 1) if depthwise else k.permute(3, 2, 0, 1)).contiguous()


def _bn(prefix: str, bn: dict, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in _BN_KEYS:
        if key not in bn:
            raise WeightsError(f"{name}: BatchNorm {prefix} has no {key} (found {sorted(bn)})")
        out[f"{prefix}.{_BN_TORCH[key]}"] = torch.from_numpy(np.array(bn[key], dtype=np.float32).reshape(-1))
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return out


def _tf_layers_to_state_dict(layers: dict, classifier, name: str) -> dict[str, torch.Tensor]:
    """``layers`` maps our layer prefix (features.0, features.3.depthwise) to (HWIO kernel, bn dict)."""
    sd: dict[str, torch.Tensor] = {}
    for prefix, (kernel, bn) in layers.items():
        sd[f"{prefix}.conv.weight"] = _conv_from_hwio(kernel, depthwise=prefix.endswith("depthwise"))
        sd.update(_bn(f"{prefix}.bn", bn, name))
    if classifier is not None:
        w, b = classifier
        w = np.asarray(w, dtype=np.float32)
        if w.ndim == 4:  # a 1x1 conv head: (1, 1, C, N)
            w = w.reshape(w.shape[-2], w.shape[-1])
        sd["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
        sd["classifier.bias"] = torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1).copy())
    return sd


def _prefix(row: int, part: str | None) -> str:
    return f"features.{row}" if part is None else f"features.{row}.{part}"


def infer_config(state_dict: dict[str, torch.Tensor], *, name: str = "<weights>", **options) -> MobileNetV1Config:
    """The config whose model has exactly these tensor shapes: alpha from the widths, classes from the head."""
    try:
        last = state_dict["features.13.pointwise.conv.weight"].shape[0]
    except KeyError:
        raise WeightsError(f"{name}: no last pointwise layer (features.13.pointwise) found; "
                           f"is this a MobileNet v1 with 13 separable blocks?") from None
    num_classes = state_dict["classifier.weight"].shape[0] if "classifier.weight" in state_dict else 0
    mismatch = ""
    # widths are int(c * alpha), so several alphas fit one file: the 4-digit rounding of the last width
    # over 1024 is exact for the released 1.0, 0.75, 0.5, 0.25 (and timm's 1.25); the raw ratio is the fallback
    for alpha in dict.fromkeys((round(last / 1024, 4), last / 1024)):
        config = MobileNetV1Config(alpha=alpha, num_classes=num_classes, **options)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            own = MobileNetV1(config).state_dict()
        bad = [f"{k}: file has {tuple(state_dict[k].shape)}, alpha {alpha:g} expects {tuple(v.shape)}"
               for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
        if not bad:
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            if missing or unexpected:
                raise WeightsError(f"{name}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
            return config
        mismatch = bad[0]
    raise WeightsError(f"{name}: the layer widths fit no width multiplier alpha ({mismatch})")


def _finish(sd, *, source: str, path, resolution, normalization: Normalization, options: dict,
            labels=None) -> Converted:
    config = infer_config(sd, name=str(path), **options)
    if labels is None and config.num_classes == 1000:
        labels = imagenet_labels()
    meta = {
        "alpha": config.alpha,
        "resolution": int(resolution or DEFAULT_RESOLUTION),
        "normalization": normalization.to_dict(),
        "labels": labels,
        "source": f"{source}:{Path(path).name}",
    }
    return Converted(sd, config, meta)


def _resolution_from_name(path, pattern: str) -> int | None:
    found = re.findall(pattern, str(path))  # the file's or its folder's name, the innermost that fits
    return int(found[-1]) if found else None


# ---------------------------------------------------------------- Keras (legacy HDF5)


def read_keras_h5(path) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {weight name: array} from a legacy Keras HDF5 file.

    Accepts weights-only files and full-model files (weights under
    ``model_weights``), written by Keras 2 (``conv1/kernel:0``,
    ``conv_dw_1/depthwise_kernel:0``) or Keras 3's legacy writer
    (``conv1/kernel``).  Weight names are reduced to their last part without
    ``:0``, and a depthwise kernel is called ``kernel`` either way.
    """
    import h5py

    path = Path(path)
    _check_hdf5(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in g.attrs:
            hint = (" It looks like a Keras 3 '.weights.h5' file, which names layers by class, not by the "
                    "MobileNet names; save with model.save('model.h5') instead." if "layers" in g else "")
            raise WeightsError(f"{path} is an HDF5 file but not a legacy Keras weights file "
                               f"(no 'layer_names' attribute).{hint}")
        for layer in _strings(g.attrs["layer_names"]):
            names = _strings(g[layer].attrs.get("weight_names", []))
            weights = {}
            for wname in names:
                short = wname.split("/")[-1].split(":")[0]
                weights["kernel" if short == "depthwise_kernel" else short] = np.asarray(g[layer][wname])
            if weights:
                out[layer] = weights
    return out


def _strings(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _check_hdf5(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if head != HDF5_SIGNATURE:
        raise WeightsError(f"{path} is not an HDF5 file (it does not start with the HDF5 signature); "
                           f"expected a Keras file such as mobilenet_1_0_224_tf.h5")


def from_keras(path, *, resolution: int | None = None) -> Converted:
    """Convert a Keras MobileNet HDF5 file (with or without top)."""
    layers = read_keras_h5(path)
    names = {(0, None): ("conv1", "conv1_bn")}
    for i in range(1, 14):
        names[(i, "depthwise")] = (f"conv_dw_{i}", f"conv_dw_{i}_bn")
        names[(i, "pointwise")] = (f"conv_pw_{i}", f"conv_pw_{i}_bn")
    tf_layers = {}
    for (row, part), (conv, bn) in names.items():
        if conv not in layers or bn not in layers:
            raise WeightsError(f"{path}: no layer {conv if conv not in layers else bn}; a Keras MobileNet has "
                               f"conv1, conv_dw_1..13, conv_pw_1..13 and their _bn layers (found {list(layers)[:6]}...)")
        tf_layers[_prefix(row, part)] = (layers[conv]["kernel"], layers[bn])
    head = layers.get("conv_preds")
    classifier = (head["kernel"], head["bias"]) if head else None
    sd = _tf_layers_to_state_dict(tf_layers, classifier, str(path))
    # keras.applications names files mobilenet_<alpha>_<resolution>_tf[_no_top].h5
    resolution = resolution or _resolution_from_name(path, r"mobilenet_\d_\d_(\d+)_tf") or _keras_input_size(path)
    return _finish(sd, source="keras", path=path, resolution=resolution, normalization=INCEPTION,
                   options={"padding": "tf_same", "bn_eps": 1e-3, "activation": "relu6"})


def _keras_input_size(path) -> int | None:
    """The input size a full-model file (Keras 3 model.save) records in its model config."""
    import h5py

    with h5py.File(path, "r") as f:
        config = f.attrs.get("model_config")
    if config is None:
        return None
    try:
        for layer in json.loads(config)["config"]["layers"]:
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if layer["class_name"] == "InputLayer" and shape and shape[1] and shape[1] == shape[2]:
                return int(shape[1])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        return None
    return None


# ---------------------------------------------------------------- TF-slim checkpoints


def from_tf_slim(path, *, keep_background: bool = False, resolution: int | None = None) -> Converted:
    """Convert a TF-slim MobileNet v1 checkpoint (prefix, .index file, folder or the released .tgz)."""
    from . import tf_checkpoint

    with tf_checkpoint.open_checkpoint(path) as reader:
        names = set(reader.names())
        scope = "MobilenetV1"

        def get(name):
            if name not in names:
                raise WeightsError(f"{path}: no variable {name} in the checkpoint "
                                   f"(it has {len(names)} variables, e.g. {sorted(names)[:3]})")
            return reader.read(name)

        def bn(layer):
            out = {k: get(f"{layer}/BatchNorm/{k}") for k in ("beta", "moving_mean", "moving_variance")}
            # slim's batch_norm has scale=True in mobilenet_v1_arg_scope; without it gamma is 1
            gamma = f"{layer}/BatchNorm/gamma"
            out["gamma"] = reader.read(gamma) if gamma in names else np.ones_like(out["beta"])
            return out

        tf_layers = {"features.0": (get(f"{scope}/Conv2d_0/weights"), bn(f"{scope}/Conv2d_0"))}
        for i in range(1, 14):
            dw, pw = f"{scope}/Conv2d_{i}_depthwise", f"{scope}/Conv2d_{i}_pointwise"
            tf_layers[f"features.{i}.depthwise"] = (get(f"{dw}/depthwise_weights"), bn(dw))
            tf_layers[f"features.{i}.pointwise"] = (get(f"{pw}/weights"), bn(pw))
        classifier, labels = None, None
        logits = f"{scope}/Logits/Conv2d_1c_1x1"
        if f"{logits}/weights" in names:
            w, b = get(f"{logits}/weights"), get(f"{logits}/biases")
            if w.shape[-1] == 1001:
                if keep_background:
                    labels = ["background"] + imagenet_labels()
                else:  # index 0 is "background", index k the ImageNet class k - 1
                    w, b = w[..., 1:], b[1:]
            classifier = (w, b)
    sd = _tf_layers_to_state_dict(tf_layers, classifier, str(path))
    # the released archives are named mobilenet_v1_<alpha>_<resolution>
    resolution = resolution or _resolution_from_name(path, r"mobilenet_v1_[\d.]+_(\d+)")
    return _finish(sd, source="tf-slim", path=path, resolution=resolution, normalization=INCEPTION,
                   options={"padding": "tf_same", "bn_eps": 1e-3, "activation": "relu6"}, labels=labels)


# ---------------------------------------------------------------- timm


def _read_tensors(path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded weights-only (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    with open(path, "rb") as f:
        if not _is_torch_file(f.read(8)):
            raise WeightsError(f"cannot read {path}: expected a PyTorch state dict (.pth, .bin) or .safetensors")
    obj = checkpoint.load(path)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def from_timm(path, *, resolution: int | None = None) -> Converted:
    """Convert a timm ``mobilenetv1_100``-family state dict (mobilenetv1_100, mobilenetv1_125, other widths)."""
    src = {k.removeprefix("module."): v for k, v in _read_tensors(path).items()}
    if "conv_head.weight" in src:
        raise WeightsError(f"{path} has a conv_head (timm's mobilenetv1_100h): that head is not MobileNet v1's; "
                           f"use mobilenetv1_100 or mobilenetv1_125 weights")
    if "conv_stem.weight" not in src:
        raise WeightsError(f"{path} is not a timm MobileNet v1 state dict (no conv_stem.weight; "
                           f"keys start {sorted(src)[:3]})")
    sd = {}
    bn_names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    sd["features.0.conv.weight"] = src["conv_stem.weight"]
    for n in bn_names:
        sd[f"features.0.bn.{n}"] = src.get(f"bn1.{n}", torch.tensor(0))
    # timm groups the 13 separable blocks into stages: blocks.{stage}.{index}, in network order
    blocks = sorted({tuple(int(x) for x in k.split(".")[1:3]) for k in src if k.startswith("blocks.")})
    if len(blocks) != 13:
        raise WeightsError(f"{path}: expected 13 separable blocks (blocks.s.i), found {len(blocks)}")
    for row, (s, i) in enumerate(blocks, start=1):
        for ours, theirs, bn in (("depthwise", "conv_dw", "bn1"), ("pointwise", "conv_pw", "bn2")):
            sd[f"features.{row}.{ours}.conv.weight"] = src[f"blocks.{s}.{i}.{theirs}.weight"]
            for n in bn_names:
                sd[f"features.{row}.{ours}.bn.{n}"] = src.get(f"blocks.{s}.{i}.{bn}.{n}", torch.tensor(0))
    if "classifier.weight" in src:
        sd["classifier.weight"], sd["classifier.bias"] = src["classifier.weight"], src["classifier.bias"]
    sd = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    return _finish(sd, source="timm", path=path, resolution=resolution, normalization=INCEPTION,
                   options={"padding": "symmetric", "bn_eps": 1e-5, "activation": "relu6"})


def convert(source: str, path, *, keep_background: bool = False, resolution: int | None = None) -> Converted:
    """Convert released weights (``source`` one of "keras", "tf-slim", "timm", "tflite") to our layout."""
    if source == "keras":
        return from_keras(path, resolution=resolution)
    if source == "tf-slim":
        return from_tf_slim(path, keep_background=keep_background, resolution=resolution)
    if source == "timm":
        return from_timm(path, resolution=resolution)
    if source == "tflite":
        from .tflite_import import from_tflite

        return from_tflite(path, keep_background=keep_background, resolution=resolution)
    raise WeightsError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------- our .safetensors files


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A checksum of names, dtypes, shapes and bytes, independent of the file's layout."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(converted: Converted, path) -> Path:
    """Write converted weights as .safetensors with their metadata (JSON values), atomically."""
    from safetensors.torch import save as st_save

    sd = {k: v.detach().contiguous().cpu() for k, v in converted.state_dict.items()}
    meta = converted.meta
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(converted.config.to_dict()),
        "alpha": json.dumps(converted.config.alpha),
        "resolution": json.dumps(meta["resolution"]),
        "normalization": json.dumps(meta["normalization"]),
        "labels": json.dumps(meta.get("labels")),
        "source": meta.get("source", ""),
        "sha256": tensors_sha256(sd),
    }
    if meta.get("int8"):  # int8-ready weights: the activation ranges of their int8 graph
        metadata["int8"] = json.dumps(meta["int8"])
    data = st_save(sd, metadata=metadata)
    return checkpoint.atomic_write(path, lambda f: f.write(data))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _is_torch_file(head: bytes) -> bool:
    """torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle (protocol 2+)."""
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_safetensors(path) -> Converted:
    """Read a file written by :func:`save`, checking its format and its checksum."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path} is a safetensors file without mobilenets metadata; convert the original "
                           f"weights with 'mobilenets convert --from keras|tf-slim|timm SRC --out FILE'")
    if int(metadata.get("version", 0)) > VERSION:
        raise WeightsError(f"{path} has format version {metadata['version']}; this mobilenets reads up to {VERSION}")
    digest = tensors_sha256(sd)
    if metadata.get("sha256") and digest != metadata["sha256"]:
        raise WeightsError(f"{path} is corrupted: its tensors' sha256 {digest[:12]}... does not match the "
                           f"recorded {metadata['sha256'][:12]}...; convert or download it again")
    try:
        config = MobileNetV1Config.from_dict(json.loads(metadata["config"]))
        meta = {
            "alpha": config.alpha,
            "resolution": json.loads(metadata["resolution"]),
            "normalization": json.loads(metadata["normalization"]),
            "labels": json.loads(metadata.get("labels", "null")),
            "source": metadata.get("source", ""),
            "sha256": metadata.get("sha256"),
        }
        if metadata.get("int8"):
            meta["int8"] = json.loads(metadata["int8"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable mobilenets metadata ({e})") from None
    return Converted(sd, config, meta)


# ---------------------------------------------------------------- loading


def read(path) -> Converted:
    """The weights, config and metadata of a converted .safetensors file or a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if _is_safetensors(path):
        return read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == HDF5_SIGNATURE:
        raise WeightsError(f"{path} is a Keras HDF5 file; convert it first: "
                           f"mobilenets convert --from keras {path} --out {path.with_suffix('.safetensors')}")
    if path.name.endswith(".index") or ".data-" in path.name:
        raise WeightsError(f"{path} is part of a TensorFlow checkpoint; convert it first: "
                           f"mobilenets convert --from tf-slim {path} --out model.safetensors")
    if not _is_torch_file(head):
        raise WeightsError(f"cannot read {path}: it is neither a converted .safetensors file nor a mobilenets "
                           f"checkpoint; convert released weights with 'mobilenets convert --from keras|tf-slim|timm'")
    obj = checkpoint.load(path)  # weights-only: refuses pickles that would run code
    if not checkpoint.is_mobilenets_checkpoint(obj):
        raise WeightsError(f"{path} is a PyTorch file but not a mobilenets checkpoint; if it is a timm state "
                           f"dict, convert it: mobilenets convert --from timm {path} --out model.safetensors")
    model, meta = checkpoint.model_from(obj, path=path)
    meta.setdefault("alpha", model.config.alpha)
    return Converted(model.state_dict(), model.config, meta)


def load(path, **options) -> MobileNetV1:
    """The model (eval mode) stored in a converted .safetensors file or a training checkpoint.

    ``model.meta`` holds what the weights need at inference: ``resolution``,
    ``normalization`` ({"mean", "std"}), ``labels`` and ``source``.  Its
    forward takes the same preprocessed NCHW tensor as the source model and
    gives the same logits.  ``options`` may change training-only settings
    (``dropout``, ``bn_momentum``, ``output_stride``) or give a new head
    (``num_classes``; its weights are freshly initialised).
    """
    return _build(read(path), options, path)


def _build(converted: Converted, options: dict, path) -> MobileNetV1:
    fixed = [k for k in options if k in FIXED_OPTIONS and options[k] != getattr(converted.config, k)]
    if fixed:
        raise WeightsError(f"{path}: {', '.join(f'{k}={options[k]!r}' for k in fixed)} conflicts with the weights "
                           f"({', '.join(f'{k}={getattr(converted.config, k)!r}' for k in fixed)}); leave it out")
    options = {k: v for k, v in options.items() if k not in FIXED_OPTIONS}
    config = replace(converted.config, **options)
    new_head = config.num_classes != converted.config.num_classes
    model = MobileNetV1(config) if new_head else _empty_model(config)
    sd = dict(converted.state_dict)
    meta = dict(converted.meta)
    if new_head:
        # a new head for fine-tuning: keep the body, let the classifier start from its initialisation
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
        meta["labels"] = None
    checkpoint.load_state_dict(model, sd, path=path)
    model.meta = meta
    return model.eval()


# ---------------------------------------------------------------- pretrained: fetch, verify, convert once


def cache_dir() -> Path:
    """Where downloads and converted files live: $MOBILENETS_CACHE, else ~/.cache/mobilenets."""
    env = os.environ.get("MOBILENETS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilenets"


def base_url() -> str:
    url = os.environ.get("MOBILENETS_WEIGHTS_URL") or KERAS_BASE_URL
    return url if url.endswith("/") else url + "/"


def keras_filename(alpha: float, resolution: int, *, include_top: bool = True) -> str:
    """The released file name: mobilenet_<alpha>_<resolution>_tf[_no_top].h5."""
    if alpha not in KERAS_ALPHAS or resolution not in KERAS_RESOLUTIONS:
        raise WeightsError(
            f"ImageNet weights exist for alpha in {sorted(KERAS_ALPHAS)} and resolution in "
            f"{list(KERAS_RESOLUTIONS)}; got alpha={alpha!r}, resolution={resolution!r} "
            f"(use weights=None for other sizes, or another pretrained size and a different input size)")
    return f"mobilenet_{KERAS_ALPHAS[alpha]}_{resolution}_tf{'' if include_top else '_no_top'}.h5"


def pretrained(alpha: float = 1.0, resolution: int = 224, *, progress: bool = True) -> Path:
    """The converted .safetensors for the released Keras weights of alpha x resolution, fetched once.

    Downloads ``mobilenet_<a>_<r>_tf.h5`` from $MOBILENETS_WEIGHTS_URL (default
    the Keras applications bucket) into :func:`cache_dir`, atomically; checks
    that it is an HDF5 file holding a MobileNet of that alpha; records its
    sha256 on first download and checks it on every later conversion; converts
    it once and caches the result beside it.
    """
    filename = keras_filename(alpha, resolution)
    folder = cache_dir()
    h5 = folder / filename
    out = h5.with_suffix(".safetensors")
    if out.is_file():
        try:
            read_safetensors(out)
            return out
        except WeightsError:
            out.unlink()  # a damaged cached conversion: redo it from the download
    if not h5.is_file():
        download(base_url() + filename, h5, progress=progress)
    _verify_sha256(h5)
    try:
        converted = from_keras(h5, resolution=resolution)
    except (WeightsError, OSError) as e:
        raise WeightsError(f"{h5} is not a usable MobileNet file ({e}); delete it and try again") from None
    if converted.config.alpha != alpha or converted.config.num_classes != 1000:
        raise WeightsError(f"{h5} holds alpha {converted.config.alpha:g} with {converted.config.num_classes} "
                           f"classes, not alpha {alpha:g} with 1000; delete it and try again")
    save(converted, out)
    return out


def _verify_sha256(path: Path) -> None:
    """Trust on first use: the digest of the first download is recorded and every later use must match it."""
    record = path.parent / "sha256.json"
    known = json.loads(record.read_text()) if record.is_file() else {}
    digest = _file_sha256(path)
    if path.name not in known:
        known[path.name] = digest
        checkpoint.atomic_write(record, lambda f: f.write(json.dumps(known, indent=1, sort_keys=True).encode()))
    elif known[path.name] != digest:
        raise WeightsError(f"{path} has sha256 {digest[:12]}... but its first download had "
                           f"{known[path.name][:12]}...; delete it (and its line in {record}) to fetch it again")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, path, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``path`` through a temp file (never a half-written ``path``); progress on stderr."""
    path = Path(path)

    def fetch(f) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"cannot download {url} ({reason}); download that file yourself and "
                               f"put it at {path} (or set MOBILENETS_CACHE to the folder that has it)") from None
        with response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(1 << 16), b""):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    _progress(path.name, done, total)
        if total and done != total:
            raise WeightsError(f"download of {url} stopped at {done} of {total} bytes; try again")
        if progress:
            print(file=sys.stderr)

    checkpoint.atomic_write(path, fetch, check=_check_hdf5)
    return path


def _progress(name: str, done: int, total: int) -> None:
    if total:
        sys.stderr.write(f"\rdownloading {name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({100 * done // total}%)")
    else:
        sys.stderr.write(f"\rdownloading {name}: {done / 1e6:.1f} MB")
    sys.stderr.flush()


# ---------------------------------------------------------------- the public builder


def mobilenet_v1(alpha: float = 1.0, *, weights: str | os.PathLike | None = None, resolution: int = 224,
                 progress: bool = True, **options) -> MobileNetV1:
    """MobileNet v1 (Howard et al., 2017, arXiv:1704.04861) with width multiplier ``alpha``.

    ``weights=None`` gives a freshly initialised model (``options`` as in
    :class:`MobileNetV1Config`: ``num_classes``, ``padding``, ``bn_eps``, ...).
    ``weights="imagenet"`` loads the released Keras ImageNet weights for
    ``alpha`` x ``resolution`` (alpha in 1.0, 0.75, 0.5, 0.25; resolution in
    224, 192, 160, 128), fetched and converted once (see :func:`pretrained`).
    ``weights=PATH`` loads a converted file or a training checkpoint.  With
    weights, ``num_classes`` gives a new, freshly initialised head for
    fine-tuning.  ``model.meta`` records resolution, normalization and labels.
    """
    if weights is None:
        model = MobileNetV1(MobileNetV1Config(alpha=alpha, **options))
        model.meta = {"alpha": model.config.alpha, "resolution": resolution,
                      "normalization": INCEPTION.to_dict(), "labels": None, "source": "initialised"}
        return model
    if isinstance(weights, str) and weights == "imagenet":
        path = pretrained(alpha, resolution, progress=progress)
    else:
        path = Path(weights)
    converted = read(path)
    if converted.config.alpha != alpha:
        raise WeightsError(f"{path} holds alpha {converted.config.alpha:g} weights, not alpha {alpha:g}; "
                           f"pass alpha={converted.config.alpha:g} or use mobilenets.load({str(path)!r})")
    return _build(converted, options, path)

