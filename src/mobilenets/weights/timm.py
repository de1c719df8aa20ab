"""timm ``mobilenetv1_100``-family state dicts (.pth/.bin/.safetensors) to our layout.

Symmetric padding, BN epsilon 1e-5; keys ``conv_stem``, ``bn1``,
``blocks.{s}.{i}.conv_dw|bn1|conv_pw|bn2``, ``classifier``.  Files are read
with safetensors or ``torch.load(weights_only=True)``: no code runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..images import INCEPTION
from .layout import Converted, WeightsError, finish, infer_config
from .resolve import read_state_dict

TIMM_OPTIONS = {"padding": "symmetric", "bn_eps": 1e-5, "activation": "relu6"}
_BN_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def from_timm(path, *, resolution: int | None = None) -> Converted:
    """Convert a timm ``mobilenetv1_100``-family state dict (mobilenetv1_100, mobilenetv1_125, other widths)."""
    src = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    if "conv_head.weight" in src:
        raise WeightsError(f"{path} has a conv_head (timm's mobilenetv1_100h): that head is not MobileNet v1's; "
                           f"use mobilenetv1_100 or mobilenetv1_125 weights")
    if "conv_stem.weight" not in src:
        raise WeightsError(f"{path} is not a timm MobileNet v1 state dict (no conv_stem.weight; "
                           f"keys start {sorted(src)[:3]})")
    sd = {"features.0.conv.weight": src["conv_stem.weight"]}
    for n in _BN_NAMES:
        sd[f"features.0.bn.{n}"] = src.get(f"bn1.{n}", torch.tensor(0))
    # timm groups the 13 separable blocks into stages: blocks.{stage}.{index}, in network order
    try:
        blocks = sorted({tuple(int(x) for x in k.split(".")[1:3]) for k in src if k.startswith("blocks.")})
    except ValueError:
        raise WeightsError(f"{path}: block keys must be blocks.<stage>.<index>.*") from None
    if len(blocks) != 13:
        raise WeightsError(f"{path}: expected 13 separable blocks (blocks.s.i), found {len(blocks)}")
    for row, (s, i) in enumerate(blocks, start=1):
        for ours, theirs, bn in (("depthwise", "conv_dw", "bn1"), ("pointwise", "conv_pw", "bn2")):
            key = f"blocks.{s}.{i}.{theirs}.weight"
            if key not in src:
                raise WeightsError(f"{path}: no tensor {key}")
            sd[f"features.{row}.{ours}.conv.weight"] = src[key]
            for n in _BN_NAMES:
                sd[f"features.{row}.{ours}.bn.{n}"] = src.get(f"blocks.{s}.{i}.{bn}.{n}", torch.tensor(0))
    if "classifier.weight" in src:
        sd["classifier.weight"], sd["classifier.bias"] = src["classifier.weight"], src.get("classifier.bias")
        if sd["classifier.bias"] is None:
            raise WeightsError(f"{path}: classifier.weight without classifier.bias")
    config = infer_config(sd, name=str(path), **TIMM_OPTIONS)
    sd = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    return finish(sd, config, source="timm", path=Path(path), resolution=resolution, normalization=INCEPTION)
