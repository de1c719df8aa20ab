"""benchmark and the export/benchmark/pick commands, on tiny models and few iterations; timing is never asserted."""

import json

import pytest
import torch

from mobilenets import benchmark, checkpoint, cli, deploy, mobilenet_v1, pick
from mobilenets.weights import registry


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_timm_peer_computes_our_logits():
    """timm's mobilenetv1_100, an implementation we did not write, given our weights gives our logits."""
    model = mobilenet_v1(1.0).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    peer = benchmark.timm_peer(model)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), model(x), rtol=1e-4, atol=1e-4)
    assert benchmark.timm_peer(mobilenet_v1(0.25)) is None  # no timm model of that width: ours runs eager instead
    assert benchmark.timm_peer(mobilenet_v1(1.0, padding="tf_same")) is None


def test_matmul_floor_is_n_cubed_mult_adds_over_the_best_call(monkeypatch):
    """The floor is n^3 mult-adds divided by the fastest call's seconds, of the product it claims to time.

    time_run is replaced by one that returns known times (ms) and keeps the timed call, which is checked
    against numpy's product: int8 accumulates in int32 without overflow, bf16/fp32 is a float product.
    """
    import numpy as np

    timed = {}

    def fake_time_run(run, x, **kwargs):
        timed["result"] = run(x)
        return [5.0, 2.0, 3.0]

    monkeypatch.setattr(deploy, "time_run", fake_time_run)
    n = 64
    for precision in deploy.PRECISIONS:
        rate = benchmark.matmul_floor(precision, n=n, repeats=3)
        assert rate == n ** 3 / 0.002, precision  # 64^3 mult-adds in the best call, 2 ms
        out = timed["result"]
        assert out.shape == (n, n)
        if precision == "int8":
            assert out.dtype == torch.int32 and int(out.abs().max()) > 127 ** 2  # int32 sums, not int8
    # the int8 product is exact: check it against numpy in int64 on the same operands
    g = torch.Generator().manual_seed(benchmark.SEED)
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g).numpy().astype(np.int64)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g).numpy().astype(np.int64)
    np.testing.assert_array_equal(timed["result"].numpy(), a @ b)


def _grid(precision="fp32", latencies=None):
    rows = []
    for i, ((alpha, resolution), entry) in enumerate(registry.WEIGHTS.items()):
        top1, top1_int8 = entry.top1, entry.top1_int8
        from mobilenets.cost import cost

        ma = cost(alpha, resolution).mult_adds
        rows.append({"model": benchmark.model_name(alpha, resolution), "alpha": alpha, "resolution": resolution, "mult_adds": ma,
                     "median_ms": (latencies or {}).get((alpha, resolution), ma / 1e8), "p90_ms": 0.0,
                     "backend": "openvino", "build_s": 0.0, "top1": top1, "top1_int8": top1_int8})
    return {"machine": benchmark.machine(), "precision": precision, "batch_size": 1, "backend": "auto", "rows": rows}


def test_pick_takes_the_most_accurate_model_within_budget():
    g = _grid()  # latency proportional to mult-adds: 1.0-224 takes 5.69 ms, 0.75-224 3.25 ms
    r = pick.pick(4.0, g)
    fits = [row for row in g["rows"] if row["median_ms"] <= 4.0]
    assert r["choice"]["model"] == max(fits, key=lambda row: row["top1"])["model"] == "0.75-224"
    assert pick.pick(100.0, g)["choice"]["model"] == "1.0-224"
    none = pick.pick(0.01, g)
    assert none["choice"] is None and none["fastest"]["model"] == "0.25-128"


def test_pick_uses_the_int8_column_at_int8():
    g = _grid("int8")
    r = pick.pick(100.0, g)
    assert r["accuracy_column"] == "top1_int8" and r["choice"]["accuracy"] == 69.7


def test_pareto_marks_dominated_models():
    g = _grid(latencies={(0.5, 224): 0.1})  # 0.5-224 made fastest: it now dominates the small slow models
    table = {r["model"]: r for r in pick.pareto(g["rows"], "top1")}
    assert table["0.5-224"]["pareto"] and not table["0.25-224"]["pareto"] and not table["0.5-128"]["pareto"]
    assert table["1.0-224"]["pareto"]


def test_grid_times_models_and_plots(tmp_path):
    g = pick.grid(backend="onnxruntime", alphas=(0.25,), resolutions=(128, 160), rounds=1, min_time=0.01)
    assert [r["model"] for r in g["rows"]] == ["0.25-128", "0.25-160"]
    assert [r["top1"] for r in g["rows"]] == [41.5, 45.5]
    assert all(r["median_ms"] > 0 and r["backend"] == "onnxruntime" for r in g["rows"])
    assert pick.plot_grid(g, tmp_path / "g.png").stat().st_size > 1000


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_benchmark_command_times_ours_and_the_peers(capsys, tmp_path):
    code, out, err = run_cli(capsys, "benchmark", "--alpha", "0.25", "--resolution", "32", "-b", "2",
                             "--precision", "fp32,int8", "--backend", "onnxruntime", "--rounds", "1",
                             "--min-time", "0.01", "--floor-size", "256", "--json", "-", "-q")
    assert code == 0, err
    result = json.loads(out)
    rows = {(r["name"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("mobilenets onnxruntime", "fp32"), ("eager PyTorch eager NCHW", "fp32"),
                         ("eager PyTorch eager channels_last", "fp32"), ("openvino", "fp32"),
                         ("mobilenets onnxruntime", "int8"), ("openvino", "int8")}
    for (name, precision), r in rows.items():
        assert r["cosine"] >= (0.999 if precision == "fp32" else 0.98), name
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["throughput"] > 0
        assert r["mult_adds_per_s"] == pytest.approx(result["model"]["mult_adds"] * 2 / (r["median_ms"] / 1e3))
    ours = rows["mobilenets onnxruntime", "fp32"]
    assert set(ours["ratios"]) == {"eager PyTorch eager NCHW", "eager PyTorch eager channels_last", "openvino"}
    assert set(result["floors"]) == {"fp32", "int8"}

    code, out, err = run_cli(capsys, "benchmark", "--alpha", "0.25", "--resolution", "32", "--backend", "torch",
                             "--no-peers", "--rounds", "1", "--min-time", "0.01", "--floor-size", "256", "--plot", str(tmp_path / "b.png"),
                             "-q")
    assert code == 0, err
    assert "mobilenets torch" in out and "matmul floor" in out and (tmp_path / "b.png").is_file()


def test_benchmark_leaves_no_temporary_files(tmp_path):
    """Ours and the ONNX Runtime / OpenVINO peers are built in temporary folders that must be gone afterwards.

    In a child process whose TMPDIR is a fresh folder: redirecting this process's temp folder to one deleted
    afterwards leaves runtimes with paths into it (see tests/test_deploy.py's temp checks)."""
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "tmpdir"
    folder.mkdir()
    script = (
        "import json, warnings; warnings.simplefilter('ignore'); from mobilenets import benchmark; "
        "model = benchmark.make_model(0.25, steps=0); "
        "result = benchmark.benchmark(model, resolution=32, batch_sizes=(2,), precisions=('fp32', 'int8'), "
        "backends=('onnxruntime',), rounds=1, min_time=0.01, warmup=1, floor_size=64); "
        "print(json.dumps([[r['name'], r['precision'], r['mean_kl']] for r in result['rows']]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TMPDIR": str(folder), "MOBILENETS_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    names = {(name, precision) for name, precision, _ in rows}
    assert {("openvino", "fp32"), ("openvino", "int8"), ("mobilenets onnxruntime", "int8")} <= names
    # Inductor's compile cache (torchinductor_<user>) and ONNX Runtime's session id (.ses) are theirs, kept on purpose
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("torchinductor_") and p.name != ".ses") == []
    # each row carries its divergence; its value is checked against the closed form in
    # test_mean_kl_and_parity_match_closed_forms (this run is about temporary files)
    assert all(kl is not None and kl >= 0 for _, _, kl in rows)


def test_mean_kl_and_parity_match_closed_forms():
    """Logits whose softmaxes are known exactly: row 0 (0, ln 3) -> p = (1/4, 3/4) against (0, 0) -> q = (1/2,
    1/2): KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.13081 nats (the other direction, KL(q || p), is 0.14384);
    row 1 is the same on both sides (KL 0). Mean 0.065406."""
    import math

    reference = torch.tensor([[0.0, math.log(3)], [2.0, -1.0]])
    logits = torch.tensor([[0.0, 0.0], [7.0, 4.0]])  # row 1 shifted by 5: the same softmax
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    p = deploy.parity(reference, logits, labels=[1, 1])
    assert p["mean_kl"] == pytest.approx(expected, rel=1e-6)  # the logits are float32: ln 3 to ~1e-7
    assert p["top1_agreement"] == 0.5 and p["max_abs_diff"] == pytest.approx(5.0)
    assert p["reference_accuracy"] == 0.5 and p["accuracy"] == 0.0  # argmax (1, 0) and (0, 0); labels (1, 1)
    cosine = float(reference.flatten() @ logits.flatten() / (reference.norm() * logits.norm()))
    assert p["cosine"] == pytest.approx(cosine, rel=1e-6)


def test_benchmark_command_refuses_unknown_choices(capsys):
    code, out, err = run_cli(capsys, "benchmark", "--precision", "fp16")
    assert code == 2 and "fp16" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _labelled_checkpoint(tmp_path):
    """A 2-class checkpoint, as training writes it, and a folder of labelled images for it."""
    import numpy as np
    from PIL import Image

    model = benchmark.make_model(0.25, num_classes=2, steps=0)
    path = checkpoint.save({"format": "mobilenets", "version": 1, "config": model.config.to_dict(),
                            "state_dict": model.state_dict(),
                            "meta": {"resolution": 32, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
                                     "labels": ["cat", "dog"], "source": "test"}}, tmp_path / "run" / "best.pt")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png")
    return path


def test_export_command_prints_parity_and_accuracy(capsys, tmp_path):
    ckpt = _labelled_checkpoint(tmp_path)
    code, out, err = run_cli(capsys, "export", "--checkpoint", str(ckpt.parent), "--format", "onnx",
                             "--precision", "int8", "--calib-data", str(tmp_path / "images"),
                             "--out", str(tmp_path / "m.onnx"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["resolution"] == 32 and report["images"] == 6 and (tmp_path / "m.onnx").is_file()
    assert {"max_abs_diff", "cosine", "top1_agreement", "mean_kl", "accuracy", "reference_accuracy"} <= set(report)

    code, out, err = run_cli(capsys, "export", "--alpha", "0.25", "--resolution", "32", "--format", "exported-program",
                             "--calib-images", "8", "--out", str(tmp_path / "m.pt2"))
    assert code == 0, err
    assert "wrote" in out and "max abs diff" in out and "mean KL" in out and "top-1 agreement 100.0%" in out


def test_export_command_errors_are_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "export", "--alpha", "0.25", "--resolution", "32", "--format", "onnx",
                             "--precision", "bf16", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "no bf16" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "export", "--weights", str(tmp_path / "missing.safetensors"),
                             "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "missing.safetensors" in err


def test_pick_command_reuses_the_cached_grid(capsys, tmp_path, cache):
    path = pick.grid_cache_path("fp32", 1, "auto")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_grid()))
    png = tmp_path / "pick.png"
    code, out, err = run_cli(capsys, "pick", "--latency-ms", "4", "--plot", str(png))
    assert code == 0, err
    assert "cached grid" in out and "pick: 0.75-224" in out and png.stat().st_size > 1000
    assert len([l for l in out.splitlines() if l[:1].isdigit()]) == 16  # the Pareto table lists all 16 models

    code, out, err = run_cli(capsys, "pick", "--latency-ms", "0.001", "--plot", str(png))
    assert code == 1 and "no model fits" in out and "0.25-128" in out

    code, out, err = run_cli(capsys, "pick", "--latency-ms", "-3")
    assert code == 2 and "--latency-ms" in err
