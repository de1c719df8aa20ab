"""Mult-adds and parameters per layer, computed from the table in ``architecture.py``.

Counting conventions (docs/architecture.md section 2, the paper's): mult-adds count the
convolutions and the fully connected layer, not BatchNorm, activations or
pooling; ``params`` are weights plus the classifier bias, without BatchNorm.
``bn_params`` are BatchNorm's trainable gamma and beta; ``trainable_params``
is everything a PyTorch module trains (params + bn_params).

A standard kxk convolution from M to N channels on a DFxDF output costs
k*k*M*N*DF*DF mult-adds; a depthwise one k*k*M*DF*DF.  With groups g this is
k*k*(M/g)*N*DF*DF for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import architecture
from .architecture import SizedLayer

KIND_LABELS = {"conv": "Conv", "depthwise": "Conv dw", "pointwise": "Conv", "fc": "FC"}


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    stride: int
    filter_shape: str
    input_size: tuple[int, int, int]
    output_size: tuple[int, int, int]
    mult_adds: int
    params: int  # weights (+ bias for the classifier)
    bn_params: int  # BatchNorm gamma and beta after this layer

    @property
    def type_stride(self) -> str:
        return f"{KIND_LABELS[self.kind]} / s{self.stride}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "type_stride": self.type_stride,
            "filter_shape": self.filter_shape,
            "input_size": list(self.input_size),
            "output_size": list(self.output_size),
            "mult_adds": self.mult_adds,
            "params": self.params,
            "bn_params": self.bn_params,
        }


@dataclass(frozen=True)
class KindCost:
    """The layers of one kind together (Table 2's rows): no stride or shape, which only a single layer has."""

    kind: str
    mult_adds: int
    params: int
    bn_params: int


@dataclass(frozen=True)
class Cost:
    """The whole network's cost at one width and resolution."""

    alpha: float
    resolution: tuple[int, int]
    layers: tuple[LayerCost, ...]

    @property
    def mult_adds(self) -> int:
        return sum(l.mult_adds for l in self.layers)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers)

    @property
    def bn_params(self) -> int:
        return sum(l.bn_params for l in self.layers)

    @property
    def trainable_params(self) -> int:
        return self.params + self.bn_params

    def by_kind(self, kind: str) -> KindCost:
        """Mult-adds and params summed over layers of one kind; 3x3 'conv' and 1x1 'pointwise' as Table 2 splits them."""
        picked = [l for l in self.layers if l.kind == kind]
        return KindCost(kind, sum(l.mult_adds for l in picked), sum(l.params for l in picked),
                        sum(l.bn_params for l in picked))

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "resolution": list(self.resolution),
            "mult_adds": self.mult_adds,
            "params": self.params,
            "bn_params": self.bn_params,
            "trainable_params": self.trainable_params,
            "layers": [l.to_dict() for l in self.layers],
        }


def filter_shape(layer: architecture.Layer) -> str:
    """Table 1's notation: 3x3x3x32 for a conv, 3x3x32 dw for a depthwise one, 1024x1000 for the FC."""
    if layer.kind == "fc":
        return f"{layer.in_channels}x{layer.out_channels}"
    if layer.kind == "depthwise":
        return f"{layer.kernel}x{layer.kernel}x{layer.in_channels} dw"
    return f"{layer.kernel}x{layer.kernel}x{layer.in_channels}x{layer.out_channels}"


def layer_cost(sized: SizedLayer) -> LayerCost:
    layer = sized.layer
    out_h, out_w, _ = sized.output_size
    weights = layer.kernel * layer.kernel * (layer.in_channels // layer.groups) * layer.out_channels
    is_fc = layer.kind == "fc"
    return LayerCost(
        name=layer.name,
        kind=layer.kind,
        stride=layer.stride,
        filter_shape=filter_shape(layer),
        input_size=sized.input_size,
        output_size=sized.output_size,
        mult_adds=weights * out_h * out_w,
        params=weights + (layer.out_channels if is_fc else 0),
        bn_params=0 if is_fc else 2 * layer.out_channels,
    )


def cost(
    alpha: float = 1.0,
    resolution: int | tuple[int, int] = 224,
    *,
    num_classes: int = 1000,
    min_depth: int = 8,
    full_conv: bool = False,
    shallow: bool = False,
    output_stride: int | None = None,
) -> Cost:
    """The cost of MobileNet ``alpha``-``resolution``, layer by layer.

    >>> c = cost(1.0, 224)
    >>> c.mult_adds, c.params
    (568740352, 4210088)
    """
    blocks = architecture.body(alpha, min_depth=min_depth, full_conv=full_conv, shallow=shallow,
                               output_stride=output_stride)
    sized = architecture.layers(blocks, resolution, num_classes)
    return Cost(float(alpha), architecture.check_input_size(resolution), tuple(layer_cost(s) for s in sized))


def measure(model, resolution: int | tuple[int, int] = 224) -> dict:
    """Count mult-adds and parameters on a built module by running it, independently of the table.

    Forward hooks read each Conv2d and Linear layer's real weight shape and
    output size; parameters are read off the module.  Returns the same keys as
    :meth:`Cost.to_dict`'s totals.
    """
    import torch
    from torch import nn

    height, width = architecture.check_input_size(resolution)
    mult_adds = 0

    def hook(module, inputs, output):
        nonlocal mult_adds
        # every output element costs one weight-slice's worth of mult-adds: weight.numel() / out_channels
        per_output = module.weight.numel() // module.weight.shape[0]
        mult_adds += per_output * output.numel() // output.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters(recurse=False))
    bn_params = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False))
    return {
        "mult_adds": mult_adds,
        "params": params,
        "bn_params": bn_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
