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

from mobilenets.architecture import depth

WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


def keras_layers(alpha: float, include_top: bool = True, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    c = [depth(w, alpha) for w in WIDTHS]

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
