"""Converting a frozen graph is linear in its size: seconds for MobileNet v1 0.25-128 plus n extra nodes.

    nice -n 5 .venv/bin/python benchmarks/frozen_graph_walk.py [--src OTHER/src] [--nodes 1000 2000 4000 8000]

The extra nodes are ladders of Identity nodes each of whose rungs a Conv2D or an unfused BatchNorm's
AddV2 reads (tests/graphdefs.py: identity_ladders), the shape issue 20 reported as an 8,000-node, 1.3 MB
graph taking 40 s.  Resolving each rung afresh walks the chain below it, n^2 / 6 steps; walked once and
remembered, n.  ``--src`` times another copy of the package (``git archive COMMIT src | tar -x -C DIR``)
for a before/after on the same machine.  Prints one line per size and writes results/frozen_graph_walk.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(ROOT / "src"))
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--kinds", nargs="+", default=["conv", "add"], choices=["conv", "add"],
                        help="which ladders: each rung read by a Conv2D, by an unfused BatchNorm's AddV2")
    args = parser.parse_args()
    sys.path[:0] = [args.src, str(ROOT / "tests")]
    from graphdefs import float_attr, identity_ladders, mobilenet_graph

    from mobilenets.weights.tf_frozen import from_tf_frozen

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nodes:
            extra = identity_ladders(n, kinds=args.kinds)
            path = Path(tmp, f"ladder_{n}.pb")
            path.write_bytes(mobilenet_graph(eps_attr=float_attr("epsilon", 1e-3), extra=extra))
            start = time.perf_counter()
            converted = from_tf_frozen(path)
            seconds = time.perf_counter() - start
            assert converted.config.alpha == 0.25 and converted.meta.resolution == 128
            rows.append({"ladders": args.kinds, "extra_nodes": n, "extra_bytes": len(extra), "file_bytes": path.stat().st_size,
                         "seconds": round(seconds, 2)})
            print(f"{args.label}, ladders {'+'.join(args.kinds)}: {n} extra nodes ({len(extra) / 1e6:.2f} MB of them), "
                  f"{path.stat().st_size / 1e6:.2f} MB file: {seconds:.2f} s", flush=True)
    load = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / "frozen_graph_walk.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    record[f"{args.label}, ladders {'+'.join(args.kinds)}"] = {"command": " ".join(["benchmarks/frozen_graph_walk.py", *sys.argv[1:]]),
                          "src": args.src, "cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load,
                          "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                   cwd=ROOT).stdout.strip(),
                          "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
