"""TensorFlow's side of tests/test_tf_frozen.py, run in a subprocess so TensorFlow never shares torch's process.

    python frozen_peer.py logits GRAPH.pb INPUT_NODE OUTPUT_NODE X.npy OUT.npy
        run the frozen graph on X (NHWC float32, any batch: the input is remapped to a batch placeholder)
    python frozen_peer.py craft OUTDIR
        write graphs that TensorFlow itself builds and serializes, with what TensorFlow reads back from them:
        values.pb (+ values.npz): constants in each TensorProto encoding, decoded by tf.make_ndarray;
        mobilenet_050.pb (+ mobilenet_050.npz): a TF-slim-named MobileNet v1, alpha 0.5, 160 px input, fused
        BatchNorm with epsilon 1e-5, without gamma in Conv2d_3_depthwise (scale=False), under the name
        scope "import/", with its logits on a fixed input (the npz also holds every constant).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

v1 = tf.compat.v1


def logits(graph_path, input_node, output_node, x_path, out_path):
    graph_def = v1.GraphDef()
    with open(graph_path, "rb") as f:
        graph_def.ParseFromString(f.read())
    x = np.load(x_path)
    graph = tf.Graph()
    with graph.as_default():
        batch = v1.placeholder(tf.float32, (None,) + x.shape[1:], name="batch_input")
        (out,) = v1.import_graph_def(graph_def, input_map={f"{input_node}:0": batch},
                                     return_elements=[f"{output_node}:0"], name="peer")
    with v1.Session(graph=graph) as sess:
        np.save(out_path, sess.run(out, {batch: x}))


def craft_values(outdir):
    graph_def = v1.GraphDef()
    protos = {
        "content_f32": tf.make_tensor_proto(np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7),
        "content_f64": tf.make_tensor_proto(np.linspace(-1, 1, 6).reshape(3, 2)),
        "content_i64": tf.make_tensor_proto(np.array([[-3, 1 << 40]], dtype=np.int64)),
        "content_f16": tf.make_tensor_proto(np.array([0.5, -2.25, 1e-3], dtype=np.float16)),
        "scalar_f32": tf.make_tensor_proto(np.float32(1e-3)),
        "scalar_i32": tf.make_tensor_proto(np.int32(-7)),
    }
    # the listed-value encodings TensorFlow writes for small or uniform constants
    filled = tf.make_tensor_proto(0.0, dtype=tf.float32, shape=[3, 5])
    filled.ClearField("float_val")
    filled.float_val.extend([0.25, 2.5])  # TensorFlow repeats the last value: 0.25, 2.5, 2.5, ...
    protos["repeated_last_f32"] = filled
    listed = tf.make_tensor_proto(0.0, dtype=tf.float32, shape=[4])
    listed.ClearField("float_val")
    listed.float_val.extend([1.0, -2.0, 3.5, 1e30])
    protos["listed_f32"] = listed
    ints = tf.make_tensor_proto(0, dtype=tf.int32, shape=[4])
    ints.ClearField("int_val")
    ints.int_val.extend([-1, 0, 2147483647, -2147483648])
    protos["listed_i32"] = ints
    halves = tf.make_tensor_proto(0.0, dtype=tf.float16, shape=[2])
    halves.ClearField("half_val")
    halves.half_val.extend([int(np.float16(1.5).view(np.uint16)), int(np.float16(-0.125).view(np.uint16))])
    protos["listed_f16"] = halves
    protos["empty_f32"] = tf.make_tensor_proto(np.zeros((0, 3), dtype=np.float32))
    for name, proto in protos.items():
        node = graph_def.node.add(name=name, op="Const")
        node.attr["dtype"].type = proto.dtype
        node.attr["value"].tensor.CopyFrom(proto)
    with open(os.path.join(outdir, "values.pb"), "wb") as f:
        f.write(graph_def.SerializeToString())
    np.savez(os.path.join(outdir, "values.npz"), **{k: tf.make_ndarray(p) for k, p in protos.items()})


def craft_mobilenet(outdir, alpha=0.5, resolution=160, eps=1e-5, num_classes=1001):
    rng = np.random.default_rng(0)
    widths = [max(int(d * alpha), 8) for d in (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)]
    strides = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    consts = {}
    graph = tf.Graph()
    with graph.as_default(), v1.name_scope("import"):
        def const(name, value):
            consts[name] = value.astype(np.float32)
            return v1.identity(tf.constant(consts[name], name=name), name=name + "/read")

        def bn(x, layer, n, scale=True):
            gamma = const(f"{layer}/BatchNorm/gamma", rng.uniform(0.5, 1.5, n)) if scale else tf.ones([n])
            beta = const(f"{layer}/BatchNorm/beta", rng.normal(0, 0.2, n))
            mean = const(f"{layer}/BatchNorm/moving_mean", rng.normal(0, 0.3, n))
            var = const(f"{layer}/BatchNorm/moving_variance", rng.uniform(0.3, 2, n))
            y, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon=eps, is_training=False)
            return tf.nn.relu6(y)

        x = v1.placeholder(tf.float32, (1, resolution, resolution, 3), name="input")
        w = const("MobilenetV1/Conv2d_0/weights", rng.normal(0, 0.4, (3, 3, 3, widths[0])))
        x = bn(tf.nn.conv2d(x, w, [1, 2, 2, 1], "SAME"), "MobilenetV1/Conv2d_0", widths[0])
        for i in range(1, 14):
            dw, pw = f"MobilenetV1/Conv2d_{i}_depthwise", f"MobilenetV1/Conv2d_{i}_pointwise"
            k = const(f"{dw}/depthwise_weights", rng.normal(0, 0.4, (3, 3, widths[i - 1], 1)))
            x = tf.nn.depthwise_conv2d(x, k, [1, strides[i], strides[i], 1], "SAME")
            x = bn(x, dw, widths[i - 1], scale=i != 3)
            k = const(f"{pw}/weights", rng.normal(0, 1.3 / np.sqrt(widths[i - 1]), (1, 1, widths[i - 1], widths[i])))
            x = bn(tf.nn.conv2d(x, k, [1, 1, 1, 1], "SAME"), pw, widths[i])
        x = tf.reduce_mean(x, [1, 2], keepdims=True)
        w = const("MobilenetV1/Logits/Conv2d_1c_1x1/weights", rng.normal(0, 0.1, (1, 1, widths[13], num_classes)))
        b = const("MobilenetV1/Logits/Conv2d_1c_1x1/biases", rng.normal(0, 0.1, num_classes))
        out = tf.squeeze(tf.nn.bias_add(tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME"), b), [1, 2],
                         name="MobilenetV1/Logits/SpatialSqueeze")
    sample = rng.uniform(-1, 1, (1, resolution, resolution, 3)).astype(np.float32)
    with v1.Session(graph=graph) as sess:
        y = sess.run(out, {x.graph.get_tensor_by_name("import/input:0"): sample})
    with open(os.path.join(outdir, "mobilenet_050.pb"), "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    np.savez(os.path.join(outdir, "mobilenet_050.npz"), x=sample, y=y, output=out.op.name,
             **{f"const:{k}": v for k, v in consts.items()})


if __name__ == "__main__":
    if sys.argv[1] == "logits":
        logits(*sys.argv[2:7])
    elif sys.argv[1] == "craft":
        craft_values(sys.argv[2])
        craft_mobilenet(sys.argv[2])
    else:
        raise SystemExit(f"unknown job {sys.argv[1]!r}")
