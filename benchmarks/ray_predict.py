"""What Ray costs: `mobilenets predict --ray` on a local cluster against plain `mobilenets predict`, same folder.

    python benchmarks/ray_predict.py [--files 400] [--rounds 2]

(run it with the project's Python, e.g. `.venv/bin/python` after `make test`: it needs the `ray` extra.)
Writes benchmarks/results/ray_predict.{json,md}.  One folder of 500x375 JPEGs
cut from the photos packages ship (as benchmarks/predict_throughput.py makes
them), one weights file (MobileNet 1.0-224, seeded: speed does not depend on the
values).  Candidates, each a fresh command, timed end to end (start-up included,
the cluster already running), in interleaved rounds:

- predict: ``mobilenets predict FOLDER --weights W --backend eager --json``;
- ray, 1 node: ``mobilenets predict --ray ADDRESS FOLDER --out DIR`` on a head
  node with every core of this machine;
- ray, 2 nodes: the same on a head plus a second node, each given half the cores
  (on one machine the second node adds no cores: this measures what spreading
  the actors over two raylets costs, the shape of a real two-machine run).

All run fp32 eager PyTorch (``--backend eager``): left to choose, the actors
would each build and time every runtime ("auto", the job's size unknown to
them) while predict sizes that measurement to its job, and the ratio would
measure that difference, not the engine.
Reported: images/s per candidate (median over rounds) and its ratio to plain
predict: the engine's overhead on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import mobilenets
    from predict_throughput import cpu_name, make_folder
    from ray_cluster import Cluster

    load_at_start = os.getloadavg()  # the machine is shared: the load says how far to trust the seconds
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    folder = make_folder(work / "images", args.files, (500, 375), seed=1)
    weights = mobilenets.save(mobilenets.mobilenet_v1(1.0), work / "w.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-m", "mobilenets", "predict", "--backend", "eager"]
    cores = os.cpu_count() or 2
    times: dict[str, list[float]] = {"predict": [], "ray, 1 node": [], "ray, 2 nodes": []}
    clusters = {"ray, 1 node": (1, cores), "ray, 2 nodes": (2, max(1, cores // 2))}
    try:
        for round_ in range(args.rounds):
            times["predict"].append(timed([*cli, str(folder), "--weights", str(weights), "--json", "-q"], env))
            for name, (nodes, cpus) in clusters.items():
                cluster = Cluster(work / f"ray-{round_}-{nodes}", cpus_per_node=cpus)
                cluster.temp_dir.mkdir()
                cluster.start(nodes)
                try:
                    out = work / f"out-{round_}-{nodes}"
                    times[name].append(timed([*cli, "--ray", cluster.address, str(folder), "--weights",
                                              str(weights), "--out", str(out), "-q"],
                                             {**env, **cluster.driver_env}))
                finally:
                    cluster.stop()
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {k: args.files / statistics.median(v) for k, v in times.items()}
    result = {"command": f"python benchmarks/ray_predict.py --files {args.files} --rounds {args.rounds}",
              "cpu": cpu_name(), "cores": cores, "load_average_at_start": load_at_start,
              "load_average": os.getloadavg(), "files": args.files,
              "seconds": times, "images_per_s": rate,
              "vs_predict": {k: rate[k] / rate["predict"] for k in rate}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_predict.json").write_text(json.dumps(result, indent=1))
    rows = "\n".join(f"| {k} | {rate[k]:.1f} | {result['vs_predict'][k]:.2f}x |" for k in rate)
    (RESULTS / "ray_predict.md").write_text(
        f"# predict through Ray on one machine\n\n`{result['command']}`, {cpu_name()}, {cores} cores, load average "
        f"(1, 5, 15 min) {', '.join(f'{x:.1f}' for x in load_at_start)} at the start and "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])} at the end; {args.files} JPEGs of 500x375, "
        f"MobileNet 1.0-224 fp32 eager, end to end (each a fresh command; the cluster was started before). "
        f"2 nodes: a head and a second node on this machine, each given half its cores.\n\n"
        f"| candidate | images/s (median of {args.rounds}) | vs predict |\n|---|---:|---:|\n{rows}\n")
    print((RESULTS / "ray_predict.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
