"""Writes reference weight files and the logits the original implementations compute from them.

Run as a script in a subprocess (so TensorFlow and Keras never share the test
process with each other or with another backend):

    python tests/reference_peers.py {keras3,keras2,tf-slim} OUT_DIR CASE...

CASE is ``alpha:resolution[:notop]``.  For each case it builds the source's
own MobileNet with random weights and *non-default* BatchNorm statistics,
writes its weight file(s) in the released layout, and saves ``<name>.npz``
with the input (NHWC, in [-1, 1]) and the source's output: logits, or the
last feature map for files without top.  Nothing here uses mobilenets.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

BATCH = 2
KERAS_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}


def parse_case(text: str):
    parts = text.split(":")
    return float(parts[0]), int(parts[1]), len(parts) > 2 and parts[2] == "notop"


def keras_filename(alpha, resolution, notop):
    return f"mobilenet_{KERAS_ALPHA_TEXT[alpha]}_{resolution}_tf{'_no_top' if notop else ''}.h5"


def randomised(weights, names, rng):
    """New values for a Keras layer's weights: BN statistics far from their 0/1 defaults."""
    out = []
    for w, name in zip(weights, names):
        name = name.split("/")[-1].split(":")[0]
        if name == "gamma":
            out.append(rng.uniform(0.5, 1.5, w.shape))
        elif name == "beta":
            out.append(rng.normal(0.0, 0.2, w.shape))
        elif name == "moving_mean":
            out.append(rng.normal(0.0, 0.3, w.shape))
        elif name == "moving_variance":
            out.append(rng.uniform(0.3, 2.0, w.shape))
        else:  # kernels and the classifier bias: scaled so activations stay inside ReLU6's range
            fan_in = int(np.prod(w.shape[:-1])) if name != "bias" else 1
            if "depthwise" in name or (w.ndim == 4 and w.shape[-1] == 1 and w.shape[2] > 1):
                fan_in = int(np.prod(w.shape[:2]))
            out.append(rng.normal(0.0, 1.3 / np.sqrt(max(fan_in, 1)), w.shape))
    return [np.asarray(v, dtype=np.float32) for v in out]


def run_keras(keras, out: Path, cases, *, keras3: bool):
    rng = np.random.default_rng(0)
    manifest = []
    for text in cases:
        alpha, res, notop = parse_case(text)
        model = keras.applications.MobileNet(
            input_shape=(res, res, 3), alpha=alpha, include_top=not notop, weights=None,
            classifier_activation=None)
        for layer in model.layers:
            ws = layer.get_weights()
            if ws:
                names = [getattr(w, "path", None) or w.name for w in layer.weights]
                layer.set_weights(randomised(ws, names, rng))
        x = rng.uniform(-1, 1, (BATCH, res, res, 3)).astype(np.float32)
        y = np.asarray(model.predict(x, verbose=0))
        name = keras_filename(alpha, res, notop)
        files = []
        if keras3:
            # Keras 3 writes legacy HDF5 two ways: model.save('x.h5') (full model, weights under
            # model_weights) and the legacy weights writer (layer_names at the top level)
            full = out / f"keras3_full_{name}"
            model.save(str(full))
            from keras.src.legacy.saving import legacy_h5_format
            import h5py

            weights_only = out / f"keras3_{name}"
            with h5py.File(weights_only, "w") as f:
                legacy_h5_format.save_weights_to_hdf5_group(f, model)
            files = [full.name, weights_only.name]
        else:
            path = out / f"keras2_{name}"
            model.save_weights(str(path))  # Keras 2: legacy HDF5, names like conv_dw_1/depthwise_kernel:0
            files = [path.name]
        np.savez(out / f"{Path(files[-1]).stem}.npz", x=x, y=y)
        manifest.append({"alpha": alpha, "resolution": res, "notop": notop, "files": files,
                         "reference": f"{Path(files[-1]).stem}.npz"})
    return manifest


def run_tf_slim(out: Path, cases):
    """TF-slim's MobileNet v1 graph in TF ops, variables under slim's names, saved by tf.compat.v1 Saver.

    (tf_slim itself no longer imports with TensorFlow >= 2.16; the graph below
    is mobilenet_v1.py's: conv/depthwise with SAME padding, fused BatchNorm
    eps 1e-3 without bias, ReLU6, global average pool, 1x1 conv logits with
    biases over 1001 classes.)
    """
    import tensorflow as tf

    tf1 = tf.compat.v1
    tf1.disable_eager_execution()
    defs = [(3, 2, 32)] + [(3, s, d) for s, d in
                           [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512), (1, 512), (1, 512),
                            (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024)]]
    rng = np.random.default_rng(1)
    manifest = []
    for text in cases:
        alpha, res, _ = parse_case(text)
        depth = lambda d: max(int(d * alpha), 8)  # noqa: E731  slim's min_depth rule
        graph = tf.Graph()
        with graph.as_default():
            x_in = tf1.placeholder(tf.float32, [BATCH, res, res, 3])
            values = {}

            def var(name, value):
                values[name] = np.asarray(value, dtype=np.float32)
                return tf1.get_variable(name, initializer=values[name])

            def bn(scope, h, c):
                g = var(f"{scope}/BatchNorm/gamma", rng.uniform(0.5, 1.5, c))
                b = var(f"{scope}/BatchNorm/beta", rng.normal(0, 0.2, c))
                m = var(f"{scope}/BatchNorm/moving_mean", rng.normal(0, 0.3, c))
                v = var(f"{scope}/BatchNorm/moving_variance", rng.uniform(0.3, 2.0, c))
                y, _, _ = tf1.nn.fused_batch_norm(h, g, b, mean=m, variance=v, epsilon=1e-3, is_training=False)
                return tf.nn.relu6(y)

            h, cin = x_in, 3
            for i, (k, s, d) in enumerate(defs):
                cout = depth(d)
                if i == 0:
                    w = var("MobilenetV1/Conv2d_0/weights", rng.normal(0, 1.3 / np.sqrt(k * k * cin), (k, k, cin, cout)))
                    h = bn("MobilenetV1/Conv2d_0", tf.nn.conv2d(h, w, [1, s, s, 1], "SAME"), cout)
                else:
                    dw = f"MobilenetV1/Conv2d_{i}_depthwise"
                    w = var(f"{dw}/depthwise_weights", rng.normal(0, 1.3 / k, (k, k, cin, 1)))
                    h = bn(dw, tf.nn.depthwise_conv2d(h, w, [1, s, s, 1], "SAME"), cin)
                    pw = f"MobilenetV1/Conv2d_{i}_pointwise"
                    w = var(f"{pw}/weights", rng.normal(0, 1.3 / np.sqrt(cin), (1, 1, cin, cout)))
                    h = bn(pw, tf.nn.conv2d(h, w, [1, 1, 1, 1], "SAME"), cout)
                cin = cout
            h = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
            w = var("MobilenetV1/Logits/Conv2d_1c_1x1/weights", rng.normal(0, 1.0 / np.sqrt(cin), (1, 1, cin, 1001)))
            b = var("MobilenetV1/Logits/Conv2d_1c_1x1/biases", rng.normal(0, 0.1, 1001))
            logits = tf.squeeze(tf.nn.bias_add(tf.nn.conv2d(h, w, [1, 1, 1, 1], "SAME"), b), [1, 2])
            tf1.train.get_or_create_global_step()
            saver = tf1.train.Saver()
            with tf1.Session(graph=graph) as sess:
                sess.run(tf1.global_variables_initializer())
                x = rng.uniform(-1, 1, (BATCH, res, res, 3)).astype(np.float32)
                y = sess.run(logits, {x_in: x})
                folder = out / f"mobilenet_v1_{alpha}_{res}"
                folder.mkdir(parents=True, exist_ok=True)
                prefix = saver.save(sess, str(folder / "model.ckpt"), write_meta_graph=False)
        np.savez(out / f"tfslim_{alpha}_{res}.npz", x=x, y=y)
        manifest.append({"alpha": alpha, "resolution": res, "notop": False, "files": [str(Path(prefix).relative_to(out))],
                         "reference": f"tfslim_{alpha}_{res}.npz"})
    return manifest


def main(argv):
    source, out, cases = argv[0], Path(argv[1]), argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    if source == "keras3":
        os.environ["KERAS_BACKEND"] = "torch"
        import keras

        assert keras.backend.backend() == "torch", keras.backend.backend()
        manifest = run_keras(keras, out, cases, keras3=True)
        version = keras.__version__
    elif source == "keras2":
        import tf_keras

        manifest = run_keras(tf_keras, out, cases, keras3=False)
        version = tf_keras.__version__
    elif source == "tf-slim":
        import tensorflow as tf

        manifest = run_tf_slim(out, cases)
        version = tf.__version__
    else:
        raise SystemExit(f"unknown source {source}")
    (out / f"{source}.json").write_text(json.dumps({"version": version, "cases": manifest}))


if __name__ == "__main__":
    main(sys.argv[1:])
