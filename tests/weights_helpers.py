"""Test helpers for weights: HDF5 files in the released Keras 2 layout (no Keras needed), a local server.

Parity with the real Keras is proven in test_parity.py; these files only need
the released structure: ``layer_names`` on the root, ``weight_names`` on
each layer group, datasets at ``<layer>/<layer>/<weight>:0``, kernels HWIO.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import h5py
import numpy as np

# Channel widths of Table 1's 14 rows in the released Keras files (keras.applications' MobileNet), written
# out rather than computed with mobilenets.architecture.depth, the code these files test.
KERAS_WIDTHS = {
    1.0: (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024),
    0.75: (24, 48, 96, 96, 192, 192, 384, 384, 384, 384, 384, 384, 768, 768),
    0.5: (16, 32, 64, 64, 128, 128, 256, 256, 256, 256, 256, 256, 512, 512),
    0.25: (8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256),
}


def keras_layers(alpha: float, include_top: bool = True, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    c = KERAS_WIDTHS[alpha]

    def bn(n):
        return {"gamma": rng.uniform(0.5, 1.5, n), "beta": rng.normal(0, 0.2, n),
                "moving_mean": rng.normal(0, 0.3, n), "moving_variance": rng.uniform(0.3, 2, n)}

    layers = {"conv1": {"kernel": rng.normal(0, 0.4, (3, 3, 3, c[0]))}, "conv1_bn": bn(c[0])}
    for i in range(1, 14):
        layers[f"conv_dw_{i}"] = {"depthwise_kernel": rng.normal(0, 0.4, (3, 3, c[i - 1], 1))}
        layers[f"conv_dw_{i}_bn"] = bn(c[i - 1])
        layers[f"conv_pw_{i}"] = {"kernel": rng.normal(0, 1.3 / np.sqrt(c[i - 1]), (1, 1, c[i - 1], c[i]))}
        layers[f"conv_pw_{i}_bn"] = bn(c[i])
    if include_top:
        layers["conv_preds"] = {"kernel": rng.normal(0, 0.1, (1, 1, c[13], 1000)), "bias": rng.normal(0, 0.1, 1000)}
    return {k: {n: v.astype(np.float32) for n, v in ws.items()} for k, ws in layers.items()}


def write_keras2_h5(path, alpha: float, include_top: bool = True, seed: int = 0) -> Path:
    path = Path(path)
    layers = keras_layers(alpha, include_top, seed)
    names = ["input_1"] + list(layers) + ["conv_pw_13_relu", "global_average_pooling2d"]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.5"
        for name in names:
            g = f.create_group(name)
            ws = layers.get(name, {})
            g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w in ws], dtype="S")
            for w, v in ws.items():
                g.create_dataset(f"{name}/{w}:0", data=v)
    return path


class Server:
    """Serves a folder on 127.0.0.1 (a free port) in a thread and records the paths asked for."""

    def __init__(self, folder: Path):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- a TF-slim checkpoint, written without TensorFlow


def small_converted(folder) -> Path:
    """A converted 0.25-64 model file (from a Keras-layout .h5 with seeded weights): the small model the predict
    tests, in-process and through Ray, classify with."""
    from mobilenets import weights

    src = write_keras2_h5(Path(folder) / "mobilenet_2_5_128_tf.h5", 0.25, seed=5)
    return weights.save(weights.convert("keras", src, resolution=64), Path(folder) / "m.safetensors")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bundle_entry(shape, offset: int, size: int) -> bytes:
    dims = b"".join(_field(2, _varint(1 << 3) + _varint(d)) for d in shape)
    return (_varint(1 << 3) + _varint(1)  # dtype DT_FLOAT
            + _field(2, dims) + _varint(4 << 3) + _varint(offset) + _varint(5 << 3) + _varint(size))


def _block(entries) -> bytes:
    """An SSTable block without prefix sharing, one restart point; then the uncompressed-block trailer."""
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little") + b"\x00" + b"\x00" * 4


def write_tf_checkpoint(prefix, variables: dict[str, np.ndarray]) -> Path:
    """``prefix``.index (an SSTable of BundleEntryProtos, keys sorted) and one .data shard, as TF writes them.

    No CRCs are stored (TensorFlow's reader treats them as optional too).
    """
    prefix = Path(prefix)
    data, entries = bytearray(), [(b"", _varint(1 << 3) + _varint(1))]  # header: num_shards = 1
    for name in sorted(variables):
        raw = np.ascontiguousarray(variables[name], dtype="<f4").tobytes()
        entries.append((name.encode(), _bundle_entry(variables[name].shape, len(data), len(raw))))
        data += raw
    data_block = _block(entries)
    index_block = _block([(entries[-1][0], _varint(0) + _varint(len(data_block) - 5))])
    footer = (_varint(0) + _varint(0) + _varint(len(data_block)) + _varint(len(index_block) - 5)).ljust(40, b"\0")
    footer += (0xDB4775248B80FB57).to_bytes(8, "little")
    Path(str(prefix) + ".index").write_bytes(data_block + index_block + footer)
    Path(str(prefix) + ".data-00000-of-00001").write_bytes(bytes(data))
    return prefix


def tf_slim_variables(alpha: float, seed: int = 0) -> dict[str, np.ndarray]:
    """The released TF-slim variable names and HWIO shapes, with a 1001-class head (class 0 background)."""
    layers = keras_layers(alpha, include_top=True, seed=seed)
    scope = "MobilenetV1"
    out = {}

    def put(tf_scope, kernel_name, conv, bn):
        out[f"{tf_scope}/{kernel_name}"] = layers[conv]["kernel" if "kernel" in layers[conv] else "depthwise_kernel"]
        for k, v in layers[bn].items():
            out[f"{tf_scope}/BatchNorm/{k}"] = v

    put(f"{scope}/Conv2d_0", "weights", "conv1", "conv1_bn")
    for i in range(1, 14):
        put(f"{scope}/Conv2d_{i}_depthwise", "depthwise_weights", f"conv_dw_{i}", f"conv_dw_{i}_bn")
        put(f"{scope}/Conv2d_{i}_pointwise", "weights", f"conv_pw_{i}", f"conv_pw_{i}_bn")
    w, b = layers["conv_preds"]["kernel"], layers["conv_preds"]["bias"]
    out[f"{scope}/Logits/Conv2d_1c_1x1/weights"] = np.concatenate([np.zeros_like(w[..., :1]), w], axis=-1)
    out[f"{scope}/Logits/Conv2d_1c_1x1/biases"] = np.concatenate([np.zeros(1, np.float32), b])
    return out
