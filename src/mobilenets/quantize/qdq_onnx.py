"""Write the int8-ready model as a QDQ ONNX graph: QuantizeLinear / DequantizeLinear around every
Conv with our own int8 weights, int32 biases and activation ranges.  ONNX Runtime fuses each
DQ -> Conv -> Relu -> Q into an integer QLinearConv; OpenVINO reads the same pairs as its int8
FakeQuantize.  No calibration happens here: the file holds exactly the ranges it is given."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..folding import FoldedMobileNet
from . import sim
from .sim import scalar_clips

OPSET = 17


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


# what a QDQ file says of its weights (metadata_props), so a file moved to another machine tells what it needs
FULL_RANGE_NOTE = ("int8 weights on [-127, 127]: on x86 CPUs, run it where the CPU has AVX-512 VNNI, AVX-VNNI or "
                   "AMX; with AVX2 only, ONNX Runtime's and OpenVINO's u8 x s8 kernels add pairs of products into "
                   "saturating int16 and lose answers (prepare 7-bit weights for such CPUs: "
                   "quantize.prepare_int8(weight_qmax=64))")
REDUCED_RANGE_NOTE = ("int8 weights on [-64, 64] (7 bits): no int16 saturation in x86 u8 x s8 kernels without VNNI; "
                      "runs on any CPU, a little less precisely than full-range int8")


def weight_note(weight_qmax: int) -> str:
    return FULL_RANGE_NOTE if weight_qmax > sim.REDUCED_WEIGHT_QMAX else REDUCED_RANGE_NOTE


def qdq_model(folded: FoldedMobileNet, ranges: dict, *, resolution: int, weight_qmax: int = sim.WEIGHT_QMAX):
    """The onnx.ModelProto of the int8 graph (dynamic batch, NCHW float input ``x``, output ``logits``), its int8
    weights on [-weight_qmax, weight_qmax]; its metadata_props say which CPUs run it without saturating."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(tensor: str, name: str, rng) -> str:
        scale, zp = sim.act_qparams(*rng)
        s = const(f"{name}.scale", np.array(scale, dtype=np.float32))
        z = const(f"{name}.zero_point", np.array(zp, dtype=np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{name}.q"], name=f"{name}.Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", s, z], [f"{name}.dq"], name=f"{name}.DQ"))
        return f"{name}.dq"

    def conv(tensor: str, name: str, weight: torch.Tensor, bias: torch.Tensor, in_scale: float, *, group=1,
             stride=1, dilation=1, pads=(0, 0, 0, 0)) -> str:
        w = weight.detach().double()
        # a dead channel's weight scale is tiny: keep its int32 bias (bias / (in_scale * w_scale)) in range
        floor = bias.detach().double().abs() / (in_scale * (2 ** 31 - 1)) * 1.01
        w_scale = torch.maximum(sim.weight_scales(weight, weight_qmax).double(), floor)
        wq = torch.clamp(torch.round(w / w_scale.view(-1, 1, 1, 1)), -weight_qmax, weight_qmax)
        b_scale = w_scale * in_scale
        bq = torch.round(bias.detach().double() / b_scale)
        wn = const(f"{name}.weight.q", wq.numpy().astype(np.int8))
        ws = const(f"{name}.weight.scale", w_scale.numpy().astype(np.float32))
        wz = const(f"{name}.weight.zero_point", np.zeros(w.shape[0], dtype=np.int8))
        bn = const(f"{name}.bias.q", bq.numpy().astype(np.int32))
        bs = const(f"{name}.bias.scale", b_scale.numpy().astype(np.float32))
        bz = const(f"{name}.bias.zero_point", np.zeros(w.shape[0], dtype=np.int32))
        nodes.append(helper.make_node("DequantizeLinear", [wn, ws, wz], [f"{name}.weight"], axis=0))
        nodes.append(helper.make_node("DequantizeLinear", [bn, bs, bz], [f"{name}.bias"], axis=0))
        k = w.shape[-1]
        nodes.append(helper.make_node("Conv", [tensor, f"{name}.weight", f"{name}.bias"], [f"{name}.out"],
                                      name=f"{name}.Conv", group=group, strides=[stride, stride],
                                      dilations=[dilation, dilation], kernel_shape=[k, k], pads=list(pads)))
        return f"{name}.out"

    scalar_clips(folded, ranges)
    x = qdq("x", "input", ranges["input"])
    scale = sim.act_qparams(*ranges["input"])[0]
    size = resolution
    for i, layer in enumerate(folded.features):
        c = layer.conv
        k, s, d = c.kernel_size[0], c.stride[0], c.dilation[0]
        if layer.tf_pad:
            top, bottom = _same_pads(size, k, s, d)
            pads = (top, top, bottom, bottom)
        else:
            p = c.padding[0]
            pads = (p, p, p, p)
        size = (size + pads[0] + pads[2] - d * (k - 1) - 1) // s + 1
        y = conv(x, f"features.{i}", c.weight, c.bias, scale, group=c.groups, stride=s, dilation=d, pads=pads)
        # the ReLU6 clip (per channel after equalization) is at or above the range's top (checked above by
        # scalar_clips): Q's saturation is the clip
        nodes.append(helper.make_node("Relu", [y], [f"features.{i}.act"]))
        x = qdq(f"features.{i}.act", f"features.{i}", ranges[f"features.{i}"])
        scale = sim.act_qparams(*ranges[f"features.{i}"])[0]
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool.out"]))
    x = qdq("pool.out", "pool", ranges["pool"])
    head = folded.classifier
    y = conv(x, "classifier", head.weight[:, :, None, None], head.bias, sim.act_qparams(*ranges["pool"])[0])
    y = qdq(y, "logits", ranges["logits"])
    nodes.append(helper.make_node("Flatten", [y], ["logits"], axis=1))
    graph = helper.make_graph(
        nodes, "mobilenet_v1_int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", head.out_features])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mobilenets.quantize")
    onnx.helper.set_model_props(model, {"mobilenets.int8_weight_qmax": str(weight_qmax),
                                        "mobilenets.int8_weights": weight_note(weight_qmax)})
    onnx.checker.check_model(model)
    return model


def write_qdq_onnx(folded: FoldedMobileNet, ranges: dict, path, *, resolution: int,
                   weight_qmax: int = sim.WEIGHT_QMAX) -> Path:
    from ..atomic import atomic_write

    model = qdq_model(folded, ranges, resolution=resolution, weight_qmax=weight_qmax)
    data = model.SerializeToString()
    return atomic_write(Path(path), lambda f: f.write(data))
