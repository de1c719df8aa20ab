"""Keras MobileNet weights (legacy HDF5, ``mobilenet_1_0_224_tf.h5`` and ``_no_top``) to our layout.

Written by Keras 2 (``conv_dw_1/depthwise_kernel:0``) or Keras 3's legacy
writer (``conv_dw_1/kernel``); TF "same" padding, BN epsilon 1e-3.

An HDF5 file can make its reader open other files: a dataset may keep its
bytes in an external raw file (``/etc/passwd`` would land in a tensor), be a
virtual dataset mapping other files, or a link may be soft or point into
another file.  Before anything is read, every object in the file is visited
and any of these is refused, naming it; then every dataset's declared shape
is checked against the architecture, so a dataset declared (3, 3, 3, 1e9)
is refused before it is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..images import INCEPTION
from .layout import Converted, MissingWeightsError, WeightsError, finish, infer_config
from .tf_layers import TF_OPTIONS, bn_shapes, head_shapes, prefix, resolution_from_name, tf_shape_to_ours, \
    to_state_dict

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# h5py reports a damaged file with any of these, depending on which structure broke
_H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError)


def check_hdf5(path) -> None:
    """Refuse a path that is missing or does not start with the HDF5 signature."""
    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(f"{path} does not exist")
    if not path.is_file():
        raise WeightsError(f"{path} is not a regular file; pass a weights file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head != HDF5_SIGNATURE:
        raise WeightsError(f"{path} is not an HDF5 file (it does not start with the HDF5 signature); "
                           f"expected a Keras file such as mobilenet_1_0_224_tf.h5")


def check_self_contained(f, path) -> None:
    """Refuse external storage, virtual datasets, non-float datasets and any link that is not a hard link."""
    import h5py

    stack = [("", f)]
    seen = set()
    while stack:
        where, group = stack.pop()
        for name in group:
            full = f"{where}/{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise WeightsError(f"{path}: {full} is a {type(link).__name__}; only hard links are read "
                                   f"(a link may point at another file)")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                if obj.id not in seen:  # hard links may form cycles (ids compare by object)
                    seen.add(obj.id)
                    stack.append((full, obj))
            elif isinstance(obj, h5py.Dataset):
                if obj.external:
                    raise WeightsError(f"{path}: dataset {full} keeps its data in an external file "
                                       f"({obj.external[0][0]!s}); refusing to read files outside {path.name}")
                if obj.is_virtual:
                    raise WeightsError(f"{path}: dataset {full} is a virtual dataset (it maps other files); "
                                       f"refusing to read it")
                if obj.dtype.kind != "f":
                    raise WeightsError(f"{path}: dataset {full} has dtype {obj.dtype}, expected floats")


def _strings(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _layers(f, path) -> dict:
    """Layer name -> {weight name: h5py.Dataset}, nothing read; weight names reduced as Keras 2 and 3 agree."""
    import h5py

    g = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in g.attrs:
        hint = (" It looks like a Keras 3 '.weights.h5' file, which names layers by class, not by the "
                "MobileNet names; save with model.save('model.h5') instead." if "layers" in g else "")
        raise WeightsError(f"{path} is an HDF5 file but not a legacy Keras weights file "
                           f"(no 'layer_names' attribute).{hint}")
    out = {}
    for layer in _strings(np.atleast_1d(g.attrs["layer_names"])):
        if layer not in g or not isinstance(g[layer], h5py.Group):
            raise WeightsError(f"{path}: layer {layer!r} is listed in layer_names but not stored")
        weights = {}
        for wname in _strings(np.atleast_1d(g[layer].attrs.get("weight_names", []))):
            ds = g[layer].get(wname)
            if not isinstance(ds, h5py.Dataset):
                raise WeightsError(f"{path}: weight {layer}/{wname} is listed but not stored")
            short = wname.split("/")[-1].split(":")[0]
            weights["kernel" if short == "depthwise_kernel" else short] = ds
        if weights:
            out[layer] = weights
    return out


def _names() -> dict:
    names = {(0, None): ("conv1", "conv1_bn")}
    for i in range(1, 14):
        names[(i, "depthwise")] = (f"conv_dw_{i}", f"conv_dw_{i}_bn")
        names[(i, "pointwise")] = (f"conv_pw_{i}", f"conv_pw_{i}_bn")
    return names


def from_keras(path, *, resolution: int | None = None) -> Converted:
    """Convert a Keras MobileNet HDF5 file (with or without top)."""
    import h5py

    path = Path(path)
    check_hdf5(path)
    try:
        with h5py.File(path, "r") as f:
            check_self_contained(f, path)
            layers = _layers(f, path)
            shapes, tf_layers = {}, {}
            for (row, part), (conv, bn) in _names().items():
                if conv not in layers or bn not in layers or "kernel" not in layers[conv]:
                    missing = bn if conv in layers else conv
                    raise WeightsError(f"{path}: no layer {missing}; a Keras MobileNet has conv1, conv_dw_1..13, "
                                       f"conv_pw_1..13 and their _bn layers (found {list(layers)[:6]}...)")
                p = prefix(row, part)
                shapes[f"{p}.conv.weight"] = tf_shape_to_ours(layers[conv]["kernel"].shape, part == "depthwise")
                shapes.update(bn_shapes(f"{p}.bn", {k: v.shape for k, v in layers[bn].items()}))
                tf_layers[p] = (layers[conv]["kernel"], layers[bn])
            head = layers.get("conv_preds")
            if head is not None:
                if "kernel" not in head or "bias" not in head:
                    raise WeightsError(f"{path}: layer conv_preds needs a kernel and a bias (found {sorted(head)})")
                shapes.update(head_shapes(head["kernel"].shape, head["bias"].shape))
            config = infer_config(shapes, name=str(path), **TF_OPTIONS)  # declared shapes, before any read
            tf_layers = {p: (np.asarray(k), {n: np.asarray(v) for n, v in bn.items()})
                         for p, (k, bn) in tf_layers.items()}
            classifier = (np.asarray(head["kernel"]), np.asarray(head["bias"])) if head is not None else None
            input_size = _input_size(f)
    except WeightsError:
        raise
    except _H5_ERRORS as e:
        raise WeightsError(f"cannot read {path} as a Keras HDF5 file: {(str(e).splitlines() or [''])[0]}") from None
    sd = to_state_dict(tf_layers, classifier, str(path))
    # keras.applications names files mobilenet_<alpha>_<resolution>_tf[_no_top].h5
    resolution = resolution or resolution_from_name(path, r"mobilenet_\d_\d_(\d+)_tf") or input_size
    return finish(sd, config, source="keras", path=path, resolution=resolution, normalization=INCEPTION)


def _input_size(f) -> int | None:
    """The input size a full-model file (Keras 3 model.save) records in its model config."""
    config = f.attrs.get("model_config")
    if config is None:
        return None
    try:
        for layer in json.loads(config)["config"]["layers"]:
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if layer["class_name"] == "InputLayer" and shape and shape[1] and shape[1] == shape[2]:
                return int(shape[1])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError):
        return None
    return None
