"""Timing exported files in a fresh Python process, for runtimes that cannot share one (ExecuTorch 1.5.1).

:func:`time_files` starts ``python -m mobilenets.deploy.isolated``, which
loads each file with :func:`~.formats.load_exported`, times them all in the
same interleaved rounds (:func:`~.auto.interleaved`) at the parent's thread
count, and answers with the per-call times as JSON.  Nothing but loading and
running files happens in that process, so a runtime that crashes after
PT2E or Inductor has run (see :mod:`.executorch`) runs there correctly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .machine import DeployError

TIMEOUT_S = 3600


def time_files(files: dict[str, tuple[Path, int]], *, batch_size: int = 1, rounds: int = 3,
               min_time: float = 0.3, threads: int | None = None) -> dict[str, list[float]]:
    """Per-call ms of each file, timed in a fresh process: ``files`` maps a name to (path, resolution)."""
    spec = {"files": {name: [str(path), int(resolution)] for name, (path, resolution) in files.items()},
            "batch_size": int(batch_size), "rounds": int(rounds), "min_time": float(min_time),
            "threads": int(threads or torch.get_num_threads())}
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding mobilenets/, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "mobilenets.deploy.isolated"], input=json.dumps(spec),
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeployError(f"timing {len(files)} files in a fresh process took over {TIMEOUT_S} s") from None
    answer = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    try:
        return json.loads(answer[0])["times"]
    except (IndexError, ValueError, KeyError, TypeError):
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DeployError(f"timing in a fresh process failed (exit {done.returncode}): {last}") from None


def main() -> None:
    from .auto import interleaved
    from .calibration import example_input
    from .formats import load_exported

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    runs = {}
    for name, (path, resolution) in spec["files"].items():
        run, x = load_exported(path), example_input(spec["batch_size"], resolution)
        runs[name] = lambda _, run=run, x=x: run(x)
    times = interleaved(runs, None, rounds=spec["rounds"], min_time=spec["min_time"])
    print(json.dumps({"times": times}))


if __name__ == "__main__":
    main()
