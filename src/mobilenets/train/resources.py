"""How many loader processes and compute threads a training process gets, chosen from its cores and its work.

A training step on the CPU has two parts that compete for the same cores:
decoding and augmenting the next images (the loader) and the forward/backward
pass (the model).  :func:`choose` splits the cores between them from

- the cores this process may use (its affinity mask, shared by the processes
  of a run on one machine),
- whether the images are already in memory (the built-in digits: nothing to
  decode, so a worker process only adds pickling and start-up),
- the model's cost per image (mult-adds at the training resolution) against
  the loader's cost per image, measured on a few images of the data set
  (:func:`probe_loader`), and
- whether OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE``, which the CLI
  sets before PyTorch starts): a thread that spins while it waits takes a core
  from the loader and from any other process, so without passive waiting
  threads never outnumber the cores left to them.

The measurements behind the constants are in benchmarks/results/train_input.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from ..cores import cpu_count

# Seconds of one core per forward mult-add of a training step; one figure fits every width and resolution
# within 15% (the measurements behind this and the constants below: benchmarks/results/train_resources.md)
SECONDS_PER_MULT_ADD = 2.4e-10
# Each intra-op thread beyond the first pays off only when a step has this many more mult-adds to split
MIN_MULT_ADDS_PER_THREAD = 3e8
PROBE_IMAGES = 4
# Worker processes start again every epoch: below this much loading per epoch they cost more than they overlap
MIN_EPOCH_LOADING_SECONDS = 10.0
# each worker keeps two batches in flight: beyond this many, memory grows with no core left to gain (not
# measured here: this machine has 2 cores)
MAX_WORKERS = 16
# A thread on a core another program keeps busy holds up every parallel region of the step, so a thread is
# given only to a core that is mostly free (cores.busy_cores)


@dataclass(frozen=True)
class Resources:
    """The chosen split, and why (printed at the start of a run and kept in the metrics)."""

    threads: int
    num_workers: int
    reason: str


def cores() -> int:
    """Cores this process may use: its affinity mask (what taskset, cgroups and schedulers grant), shared by
    the ranks torchrun starts on this machine."""
    available = cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available // max(1, local_ranks))


def model_seconds(mult_adds: int) -> float:
    """Estimated seconds of one core to train on one image of a model with these forward mult-adds."""
    return mult_adds * SECONDS_PER_MULT_ADD


def probe_loader(dataset, count: int = PROBE_IMAGES) -> float:
    """CPU seconds to load and augment one image of ``dataset`` (the median over ``count`` evenly spread images;
    CPU time, so another busy process does not inflate it)."""
    n = len(dataset)
    times = []
    for k in range(min(count, n)):
        index = (k * n) // max(1, min(count, n))
        start = time.thread_time()
        dataset[(index, k)]
        times.append(time.thread_time() - start)
    times.sort()
    return times[len(times) // 2] if times else 0.0


def choose(*, cores: int, in_memory: bool, mult_adds: int, batch_size: int, loader_seconds: float,
           passive: bool, images: int | None = None, threads: int | None = None,
           num_workers: int | None = None, busy: float = 0.0) -> Resources:
    """Threads per process and loader processes for one training process.

    ``mult_adds``: the model's forward mult-adds per image at the training
    resolution; ``loader_seconds``: CPU seconds to load one image (see
    :func:`probe_loader`); ``images``: per epoch and process (None: many);
    ``threads``/``num_workers`` given are kept as they are, and the other is
    chosen around them; ``busy``: cores other programs keep busy (:func:`busy_cores`).
    """
    model = model_seconds(mult_adds)
    # the share of the work that is loading; with it, the cores the loader needs to keep up with the model
    share = loader_seconds / (loader_seconds + model) if loader_seconds + model > 0 else 0.0
    loader_cores = cores * share
    if num_workers is None:
        short = images is not None and images * loader_seconds < MIN_EPOCH_LOADING_SECONDS
        if in_memory or cores == 1 or short:
            # nothing to decode, no core to overlap on, or too little to load: a worker only adds start-up
            num_workers = 0
        else:
            num_workers = min(cores, MAX_WORKERS, max(1, math.ceil(loader_cores - 0.25)))
        why_workers = ("images in memory" if in_memory else "one core" if cores == 1
                       else f"loading an epoch takes {images * loader_seconds:.1f} s" if short
                       else f"loading is {100 * share:.0f}% of the work")
    else:
        why_workers = "given"
    if threads is None:
        # Passive OpenMP threads sleep while a loader process or another program has the core, so the model may
        # use every core; spinning ones would fight the loader for it (10-100x slower), so they get the rest.
        left = cores if passive else max(1, cores - num_workers)
        splittable = 1 + int(batch_size * mult_adds // MIN_MULT_ADDS_PER_THREAD)
        free = max(1, round(cores - busy))  # cores other programs leave mostly free
        threads = max(1, min(left, splittable, free))
        why_threads = (f"{batch_size} x {mult_adds / 1e6:.0f}M mult-adds a step"
                       + ("" if passive else ", OpenMP not passive: none beside the loader processes")
                       + (f", {busy:.1f} core(s) busy with other work" if busy >= 0.5 else ""))
    else:
        why_threads = "given"
    reason = (f"{cores} core(s): {num_workers} loader process(es) ({why_workers}), {threads} thread(s) "
              f"({why_threads})")
    return Resources(threads, num_workers, reason)
