"""This process's cores: how many it may use, how busy other work keeps them, how its threads wait.

Every default that splits the cores (predict's decoding workers, the trainer's threads and loader
processes, ONNX Runtime's spinning, deploy auto's trust in its own timings) reads them here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Data loading and decoding processes: far more than any machine's cores, far fewer than the process limit
# that 10^8 workers would run into (a typo that otherwise forks until the machine stops).
MAX_WORKERS = 256

# long enough for /proc/stat's 100 Hz ticks to say how busy a core is, short beside any setup it informs
BUSY_SAMPLE_SECONDS = 0.25


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def omp_passive() -> bool:
    """Whether this process asked its threads to sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``, which
    the CLI sets for busy machines).  OpenMP reads it when PyTorch loads, so a value set later does not
    count; ONNX Runtime's own thread pool follows it too (deploy.onnxruntime)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def busy_cores(seconds: float = BUSY_SAMPLE_SECONDS) -> float:
    """How many of this process's cores other work keeps busy, sampled over ``seconds`` (Linux ``/proc/stat``;
    0.0 where it cannot be read).  This process sleeps meanwhile, so what it sees is everyone else."""
    allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None

    def sample() -> tuple[int, int] | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        busy = total = 0
        for line in lines:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu" and (allowed is None or name in allowed):
                ticks = [int(f) for f in fields[:8]]
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        return busy, total

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[1] <= first[1]:
        return 0.0
    cpus = len(allowed) if allowed else (os.cpu_count() or 1)
    return cpus * (second[0] - first[0]) / (second[1] - first[1])
