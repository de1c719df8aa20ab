"""pick(runtime=): the α x ρ grid timed as the files an on-device runtime runs, on tiny subsets; timing is never
asserted, only what was timed and where."""

import json

import pytest

from mobilenets import cli, deploy, pick
from mobilenets.deploy import isolated
from mobilenets.errors import MobilenetsError

pytest.importorskip("ai_edge_litert")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILENETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_litert_runtime_times_the_exported_tflite_files(monkeypatch):
    loaded = []
    real_load = deploy.load_exported

    def load(path, format=None):
        loaded.append((path.suffix, format, path.read_bytes()[4:8]))  # a LiteRT flatbuffer says TFL3 there
        return real_load(path, format)

    monkeypatch.setattr(deploy, "load_exported", load)
    g = pick.grid(runtime="litert", alphas=(0.25,), resolutions=(128, 160), rounds=1, min_time=0.01)
    assert loaded == [(".tflite", "tflite", b"TFL3")] * 2
    assert g["runtime"] == "litert" and [r["model"] for r in g["rows"]] == ["0.25-128", "0.25-160"]
    assert all(r["backend"] == "litert" and r["median_ms"] > 0 for r in g["rows"])
    assert g["rows"][0]["top1"] == 41.5  # TF-slim's published top-1 of 0.25-128, for the pick


def test_executorch_runtime_times_its_pte_files_in_a_fresh_process(monkeypatch):
    if not deploy.backend.get("executorch").available():
        pytest.skip("executorch is not installed")
    sent = {}
    real_time_files = isolated.time_files

    def time_files(files, **kwargs):
        sent.update({name: path.read_bytes()[4:8] for name, (path, _) in files.items()})  # ExecuTorch: ET12
        return real_time_files(files, **kwargs)

    monkeypatch.setattr(isolated, "time_files", time_files)
    g = pick.grid(runtime="executorch", alphas=(0.25,), resolutions=(128,), rounds=1, min_time=0.01)
    assert sent == {"0.25-128": b"ET12"}
    assert g["rows"][0]["backend"] == "executorch" and g["rows"][0]["median_ms"] > 0


def test_a_file_the_fresh_process_cannot_run_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(deploy.DeployError, match=r"timing in a fresh process failed \(exit 1\)"):
        isolated.time_files({"bad": (bad, 64)}, rounds=1, min_time=0.01)


def test_runtimes_that_cannot_hold_the_precision_or_are_not_device_runtimes_are_refused():
    with pytest.raises(MobilenetsError, match="cannot export bf16 as executorch"):
        pick.grid(runtime="executorch", precision="bf16", alphas=(0.25,), resolutions=(128,))
    with pytest.raises(MobilenetsError, match=r"runtime must be one of \('litert', 'executorch'\).*backend="):
        pick.grid(runtime="onnxruntime", alphas=(0.25,), resolutions=(128,))
    with pytest.raises(MobilenetsError, match="not both"):
        pick.grid(runtime="litert", backend="torch", alphas=(0.25,), resolutions=(128,))


def test_a_runtime_grid_is_cached_apart_from_backend_grids():
    assert pick.grid_cache_path("fp32", 1, "auto", "litert") != pick.grid_cache_path("fp32", 1, "litert")
    assert pick.grid_cache_path("fp32", 1, "auto", "litert") != pick.grid_cache_path("fp32", 1, "auto", "executorch")


def test_pick_command_with_runtime_reads_that_runtime_s_grid(capsys, tmp_path):
    from mobilenets import benchmark
    from mobilenets.cost import cost
    from mobilenets.weights import registry

    rows = [{"model": benchmark.model_name(a, r), "alpha": a, "resolution": r, "mult_adds": cost(a, r).mult_adds,
             "median_ms": cost(a, r).mult_adds / 1e8, "p90_ms": 0.0, "backend": "litert", "build_s": 0.0,
             "top1": w.top1, "top1_int8": w.top1_int8} for (a, r), w in registry.WEIGHTS.items()]
    path = pick.grid_cache_path("fp32", 1, "auto", "litert")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"precision": "fp32", "batch_size": 1, "backend": "litert", "runtime": "litert",
                                "rows": rows}))
    code = cli.main(["pick", "--runtime", "litert", "--latency-ms", "4", "--plot", str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "runtime litert" in out and "measured on this machine" in out and "pick: 0.75-224" in out

    code = cli.main(["pick", "--runtime", "litert", "--backend", "torch", "--latency-ms", "4"])
    out, err = capsys.readouterr()
    assert code == 2 and "not allowed with" in err and len(err.strip().splitlines()) == 1
