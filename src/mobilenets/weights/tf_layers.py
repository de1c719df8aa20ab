"""TensorFlow-layout layers (HWIO kernels, BatchNorm by TF names) to our state dict; shared by Keras and TF-slim."""

from __future__ import annotations

import re

import numpy as np
import torch

from .layout import WeightsError

BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")
_BN_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
TF_OPTIONS = {"padding": "tf_same", "bn_eps": 1e-3, "activation": "relu6"}


def prefix(row: int, part: str | None) -> str:
    """Our name of row ``row`` of Table 1 (``part`` "depthwise"/"pointwise" for separable rows)."""
    return f"features.{row}" if part is None else f"features.{row}.{part}"


def tf_shape_to_ours(shape: tuple[int, ...], depthwise: bool) -> tuple[int, ...]:
    """HWIO -> OIHW; a depthwise kernel H, W, C, multiplier -> C, multiplier, H, W."""
    if len(shape) != 4:
        return tuple(shape)
    h, w, i, o = shape
    return (i, o, h, w) if depthwise else (o, i, h, w)


def head_shapes(kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Our classifier shapes from a TF head: a (C, N) dense or (1, 1, C, N) 1x1 conv kernel and its bias."""
    k = tuple(kernel_shape)
    if len(k) == 4 and k[:2] == (1, 1):
        k = k[2:]
    return {"classifier.weight": tuple(reversed(k)), "classifier.bias": tuple(bias_shape)}


def conv_from_hwio(kernel: np.ndarray, depthwise: bool) -> torch.Tensor:
    k = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32))
    return (k.permute(2, 3, 0, 1) if depthwise else k.permute(3, 2, 0, 1)).contiguous()


def _bn(name_prefix: str, bn: dict, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in BN_KEYS:
        if key not in bn:
            raise WeightsError(f"{name}: BatchNorm {name_prefix} has no {key} (found {sorted(bn)})")
        out[f"{name_prefix}.{_BN_TORCH[key]}"] = torch.from_numpy(np.array(bn[key], dtype=np.float32).reshape(-1))
    out[f"{name_prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return out


def bn_shapes(name_prefix: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Our BatchNorm shapes from TF ones (``shapes`` keyed by gamma, beta, ...), for checking before reading."""
    out = {f"{name_prefix}.{_BN_TORCH[k]}": tuple(v) for k, v in shapes.items() if k in _BN_TORCH}
    out[f"{name_prefix}.num_batches_tracked"] = ()
    return out


def to_state_dict(layers: dict, classifier, name: str) -> dict[str, torch.Tensor]:
    """``layers`` maps our layer prefix (features.0, features.3.depthwise) to (HWIO kernel, bn dict)."""
    sd: dict[str, torch.Tensor] = {}
    for p, (kernel, bn) in layers.items():
        sd[f"{p}.conv.weight"] = conv_from_hwio(kernel, depthwise=p.endswith("depthwise"))
        sd.update(_bn(f"{p}.bn", bn, name))
    if classifier is not None:
        w, b = classifier
        w = np.asarray(w, dtype=np.float32)
        if w.ndim == 4:  # a 1x1 conv head: (1, 1, C, N)
            w = w.reshape(w.shape[-2], w.shape[-1])
        sd["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
        sd["classifier.bias"] = torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1).copy())
    return sd


def resolution_from_name(path, pattern: str) -> int | None:
    found = re.findall(pattern, str(path))  # the file's or its folder's name, the innermost that fits
    return int(found[-1]) if found else None
