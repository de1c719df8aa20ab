"""A reference evaluator, in PyTorch, of the Core ML ML programs that :mod:`.coreml` writes.

Core ML runs only on Apple platforms.  What can be computed elsewhere is the
program itself: coremltools reads a saved ``.mlpackage`` back into its MIL form
(operations with their stored constants), and :func:`evaluate` runs those
operations in order with ``torch.nn.functional``, each output rounded to the
dtype the program declares for it (fp16 or fp32), the way Core ML stores its
intermediates.  Accumulation is fp32, as on Apple's GPU; the Neural Engine's
own arithmetic is not reproduced, so this checks what the file says, not how
fast or how exactly a device computes it.

Only the operations a MobileNet v1 package holds are known; any other is
refused by name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .machine import DeployError

# the ops that carry no computation of their own, or only the label lookup of a classifier
PASSIVE = ("const", "classify")
# ops whose outputs are values of their inputs (or 0 and the clip bounds): nothing new to round
EXACT = ("clip", "relu", "minimum", "pad", "reshape")


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32, copy=True))


def dequantize(op) -> torch.Tensor:
    """The float weight of a ``constexpr_affine_dequantize`` op: (q - zero_point) * scale along ``axis``."""
    q = _tensor(op.quantized_data.val)
    shape = [1] * q.dim()
    shape[int(op.axis.val)] = -1
    zero, scale = _tensor(op.zero_point.val), _tensor(op.scale.val)
    return (q - zero.reshape(shape if zero.dim() else [])) * scale.reshape(shape if scale.dim() else [])


def _conv(op, v):
    pad_type, x, padding = str(op.pad_type.val), v("x"), 0
    if pad_type == "custom":
        top, bottom, left, right = (int(p) for p in op.pad.val)
        if top == bottom and left == right:
            padding = (top, left)
        else:
            x = F.pad(x, [left, right, top, bottom])
    elif pad_type != "valid":
        raise DeployError(f"conv with pad_type {pad_type!r} is not one the reference evaluator knows (custom, valid)")
    bias = v("bias") if op.bias is not None else None
    return F.conv2d(x, v("weight"), bias, stride=[int(s) for s in op.strides.val], padding=padding,
                    dilation=[int(d) for d in op.dilations.val], groups=int(op.groups.val))


def _pad(op, v):
    if str(op.mode.val) != "constant":
        raise DeployError(f"pad mode {op.mode.val!r} is not one the reference evaluator knows (constant)")
    pairs = np.asarray(op.pad.val).reshape(-1, 2)
    # MIL lists (before, after) from the first padded axis on; F.pad wants the last axis first
    return F.pad(v("x"), [int(p) for pair in pairs[::-1] for p in pair], value=float(op.constant_val.val))


OPS = {
    "mul": lambda op, v: v("x") * v("y"),
    "add": lambda op, v: v("x") + v("y"),
    "cast": lambda op, v: v("x"),  # the rounding to the declared dtype follows every op
    "pad": _pad,
    "conv": _conv,
    "clip": lambda op, v: v("x").clamp(float(op.alpha.val), float(op.beta.val)),
    "relu": lambda op, v: F.relu(v("x")),
    "minimum": lambda op, v: torch.minimum(v("x"), v("y")),
    "reduce_mean": lambda op, v: v("x").mean(dim=[int(a) for a in op.axes.val], keepdim=bool(op.keep_dims.val)),
    # the program's batch (its input's first dimension) stands for the N images evaluated at once
    "reshape": lambda op, v: v("x").reshape([-1] + [int(s) for s in op.shape.val][1:]),
    "linear": lambda op, v: F.linear(v("x"), v("weight"), v("bias") if op.bias is not None else None),
    "softmax": lambda op, v: torch.softmax(v("x"), int(op.axis.val)),
    "constexpr_affine_dequantize": lambda op, v: dequantize(op),
}


def _round(x: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "fp16":
        return x.half().float()
    if dtype == "fp32":
        return x
    raise DeployError(f"the reference evaluator keeps fp16 and fp32 tensors, not {dtype}")


def evaluate(function, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``function`` (a MIL function coremltools loaded) computed from ``inputs``, by var name.

    The inputs may hold any number N of images where the program declares one:
    every op works per image, and a reshape's first dimension is taken as N.
    """
    from coremltools.converters.mil.mil import types

    env = {name: _round(x.float(), types.builtin_to_string(function.inputs[name].dtype))
           for name, x in inputs.items()}
    for op in function.operations:
        if op.op_type in PASSIVE:  # a const's value is read where it is used
            continue
        if op.op_type not in OPS:
            raise DeployError(f"the program holds a {op.op_type!r} op, which the reference evaluator does not know")

        def value(name, op=op):
            var = op.inputs[name]
            if var.name not in env:  # a constant: stored once, as the program declares it
                env[var.name] = _round(_tensor(var.val), types.builtin_to_string(var.dtype))
            return env[var.name]

        out, result = op.outputs[0], OPS[op.op_type](op, value)
        env[out.name] = result if op.op_type in EXACT else _round(result, types.builtin_to_string(out.dtype))
    return env
