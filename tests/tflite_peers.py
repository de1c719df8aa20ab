"""Writes .tflite files with TensorFlow's own converter, and the outputs LiteRT computes from them.

Run as a script in a subprocess (TensorFlow never shares the test process with torch):

    python tests/tflite_peers.py OUT_DIR ALPHA RESOLUTION

It builds Keras's MobileNet (tf_keras, i.e. Keras 2, which TFLiteConverter
takes directly) with random weights and *non-default* BatchNorm statistics,
logits out (no softmax), and converts it with ``tf.lite.TFLiteConverter``:

- ``float.tflite``: plain float conversion;
- ``int8.tflite``: full-integer post-training quantization with a
  representative dataset (int8 per-channel weights, int8 I/O);
- ``int8_float_io.tflite``: the same with float input and output;
- ``uint8.tflite``: the 2018 layout (uint8 per-tensor asymmetric weights and
  activations), from the v1 converter's ``inference_type=uint8`` with
  ``default_ranges_stats``, when this TensorFlow still writes it.

``outputs.npz`` holds the input (NHWC, float in [-1, 1]) and, for each file,
what TensorFlow's LiteRT interpreter returns for it (quantized I/O fed and
read through the file's own parameters) and, as ``<name>_conv0``, its first
convolution's filter as the interpreter holds it, dequantized.  Nothing here uses mobilenets.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def randomised(model, rng):
    for layer in model.layers:
        values = []
        for w in layer.weights:
            name = w.name.split("/")[-1].split(":")[0]
            shape = tuple(w.shape)
            if name == "gamma":
                values.append(rng.uniform(0.5, 1.5, shape))
            elif name == "beta":
                values.append(rng.normal(0.0, 0.2, shape))
            elif name == "moving_mean":
                values.append(rng.normal(0.0, 0.3, shape))
            elif name == "moving_variance":
                values.append(rng.uniform(0.3, 2.0, shape))
            else:
                fan_in = int(np.prod(shape[:-1])) if name != "bias" else 1
                if "depthwise" in name:
                    fan_in = int(np.prod(shape[:2]))
                values.append(rng.normal(0.0, 1.3 / np.sqrt(max(fan_in, 1)), shape))
        if values:
            layer.set_weights([np.asarray(v, np.float32) for v in values])


def run_file(tf, path: Path, x: np.ndarray) -> np.ndarray:
    interp = tf.lite.Interpreter(model_path=str(path))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    a = x
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        a = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
    interp.set_tensor(inp["index"], a)
    interp.invoke()
    y = interp.get_tensor(out["index"])
    if out["dtype"] != np.float32:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return y.astype(np.float32)


def first_filter(tf, path: Path, channels: int) -> np.ndarray:
    """The first convolution's filter (OHWI) as LiteRT holds it, dequantized with its own parameters."""
    interp = tf.lite.Interpreter(model_path=str(path))
    for d in interp.get_tensor_details():
        if tuple(d["shape"]) == (channels, 3, 3, 3):
            w = interp.get_tensor(d["index"]).astype(np.float64)
            q = d["quantization_parameters"]
            if w.dtype != np.float32 and len(q["scales"]):
                shape = [1] * 4
                shape[q["quantized_dimension"]] = -1
                w = (w - q["zero_points"].reshape(shape)) * q["scales"].reshape(shape)
            return w.astype(np.float32)
    raise SystemExit(f"{path}: no ({channels}, 3, 3, 3) filter")


def main(out: Path, alpha: float, resolution: int) -> None:
    import tensorflow as tf
    import tf_keras

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    model = tf_keras.applications.MobileNet(input_shape=(resolution, resolution, 3), alpha=alpha, weights=None,
                                            classes=1000, classifier_activation=None)
    randomised(model, rng)
    x = rng.uniform(-1, 1, (4, resolution, resolution, 3)).astype(np.float32)
    calib = rng.uniform(-1, 1, (16, resolution, resolution, 3)).astype(np.float32)

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    files = {}
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    files["float"] = converter.convert()
    for name, io in (("int8", tf.int8), ("int8_float_io", tf.float32)):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io
        converter.inference_output_type = io
        files[name] = converter.convert()
    notes = {}
    try:  # the 2018 uint8 layout: the v1 converter's whole-graph uint8 quantization with default ranges
        saved = out / "saved_model"
        tf.saved_model.save(model, str(saved))
        converter = tf.compat.v1.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.inference_type = tf.uint8
        converter.quantized_input_stats = {converter.get_input_arrays()[0]: (127.5, 127.5)}
        converter.default_ranges_stats = (0, 6)
        files["uint8"] = converter.convert()
    except Exception as e:  # noqa: BLE001 -- reported to the test, which decides
        notes["uint8"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    outputs = {"x": x}
    for name, data in files.items():
        (out / f"{name}.tflite").write_bytes(data)
        outputs[name] = run_file(tf, out / f"{name}.tflite", x)
        outputs[f"{name}_conv0"] = first_filter(tf, out / f"{name}.tflite", int(32 * alpha))
    np.savez(out / "outputs.npz", **outputs)
    (out / "notes.json").write_text(json.dumps(notes))


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
