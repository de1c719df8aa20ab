"""TF-slim MobileNet v1 checkpoints (prefix, .index file, folder or the released .tgz) to our layout.

Read by :mod:`.tf_checkpoint` without TensorFlow.  1001 classes: class 0 is
"background" and is dropped unless asked to keep it.  Every variable's
declared shape is checked against the architecture before any is read.
"""

from __future__ import annotations

import numpy as np

from ..images import INCEPTION
from . import tf_checkpoint
from .layout import Converted, WeightsError, finish, imagenet_labels, infer_config
from .tf_layers import TF_OPTIONS, bn_shapes, head_shapes, resolution_from_name, tf_shape_to_ours, to_state_dict

SCOPE = "MobilenetV1"
LOGITS = f"{SCOPE}/Logits/Conv2d_1c_1x1"


def _layer_names() -> dict[str, tuple[str, str]]:
    """Our layer prefix -> (TF scope, kernel variable name)."""
    names = {"features.0": (f"{SCOPE}/Conv2d_0", "weights")}
    for i in range(1, 14):
        names[f"features.{i}.depthwise"] = (f"{SCOPE}/Conv2d_{i}_depthwise", "depthwise_weights")
        names[f"features.{i}.pointwise"] = (f"{SCOPE}/Conv2d_{i}_pointwise", "weights")
    return names


def from_tf_slim(path, *, keep_background: bool = False, resolution: int | None = None) -> Converted:
    """Convert a TF-slim MobileNet v1 checkpoint (prefix, .index file, folder or the released .tgz)."""
    with tf_checkpoint.open_checkpoint(path) as reader:
        converted = from_tf_slim_variables(reader, path=path, keep_background=keep_background,
                                           resolution=resolution)
    return converted


def from_tf_slim_variables(variables, *, path, source: str = "tf-slim", keep_background: bool = False,
                           resolution: int | None = None, bn_eps: float = 1e-3) -> Converted:
    """Convert MobileNet v1 variables under their TF-slim names (``MobilenetV1/Conv2d_0/weights``, ...).

    ``variables`` has ``names()`` and ``read(name)`` (a checkpoint reader, a
    frozen graph's constants) and, where it can tell a shape without reading,
    ``shape(name)``: every declared shape is checked against the architecture
    before any tensor is read.  ``path`` and ``source`` name where they came
    from.  A 1001-way head drops class 0 ("background") unless ``keep_background``.
    """
    names = set(variables.names())
    shape_of = getattr(variables, "shape", None) or (lambda name: tuple(variables.read(name).shape))

    def need(name):
        if name not in names:
            raise WeightsError(f"{path}: no variable {name} (it has {len(names)} variables, "
                               f"e.g. {sorted(names)[:3]})")
        return name

    def bn_vars(scope):
        out = {k: need(f"{scope}/BatchNorm/{k}") for k in ("beta", "moving_mean", "moving_variance")}
        # slim's batch_norm has scale=True in mobilenet_v1_arg_scope; without it gamma is 1
        if f"{scope}/BatchNorm/gamma" in names:
            out["gamma"] = f"{scope}/BatchNorm/gamma"
        return out

    options = {**TF_OPTIONS, "bn_eps": bn_eps}
    layers = {p: (need(f"{scope}/{kernel}"), bn_vars(scope)) for p, (scope, kernel) in _layer_names().items()}
    shapes = {}
    for p, (kernel, bn) in layers.items():
        shapes[f"{p}.conv.weight"] = tf_shape_to_ours(shape_of(kernel), p.endswith("depthwise"))
        bn_shape = {k: shape_of(v) for k, v in bn.items()}
        bn_shape.setdefault("gamma", bn_shape["beta"])
        shapes.update(bn_shapes(f"{p}.bn", bn_shape))
    has_head = f"{LOGITS}/weights" in names
    if has_head:
        w_shape, b_shape = shape_of(f"{LOGITS}/weights"), shape_of(need(f"{LOGITS}/biases"))
        drop = w_shape[-1:] == (1001,) and not keep_background
        if drop:  # index 0 is "background", index k the ImageNet class k - 1
            w_shape, b_shape = w_shape[:-1] + (1000,), (1000,)
        shapes.update(head_shapes(w_shape, b_shape))
    infer_config(shapes, name=str(path), **options)  # declared shapes, before any read

    tf_layers = {}
    for p, (kernel, bn) in layers.items():
        values = {k: variables.read(v) for k, v in bn.items()}
        values.setdefault("gamma", np.ones_like(values["beta"]))
        tf_layers[p] = (variables.read(kernel), values)
    classifier, labels = None, None
    if has_head:
        w, b = variables.read(f"{LOGITS}/weights"), variables.read(f"{LOGITS}/biases")
        if w.shape[-1] == 1001:
            if keep_background:
                labels = ["background"] + list(imagenet_labels())
            else:
                w, b = w[..., 1:], b[1:]
        classifier = (w, b)
    sd = to_state_dict(tf_layers, classifier, str(path))
    config = infer_config(sd, name=str(path), **options)
    # the released archives are named mobilenet_v1_<alpha>_<resolution>
    resolution = resolution or resolution_from_name(path, r"mobilenet_v1_[\d.]+_(\d+)")
    return finish(sd, config, source=source, path=path, resolution=resolution, normalization=INCEPTION,
                  labels=labels)
