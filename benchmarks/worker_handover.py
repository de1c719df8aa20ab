"""What predict's decoding workers spend beyond the decode itself, with no model beside them.

    .venv/bin/python benchmarks/worker_handover.py [--files 3000] [--pairs 5]

On benchmarks/predict_throughput.py's "imagenet-like" folder (500x375 JPEGs, repeated as links up to
``--files``), pipeline.batches (2 workers, batches of 32, uint8 out, as predict reads a folder) is drained by
a loop that does nothing else.  Between batches 20 and 80 (the workers' start-up done, the prefetch full) the
workers' CPU is read from /proc (decode_floor.process_cpu), per image.  Two ways of collating, interleaved
pair by pair: as shipped (pipeline._collate stacks a batch straight into shared memory, the memory it crosses
to the main process in) and as before (stacked into private memory, then copied into shared memory when the
batch is pickled).  Against them, the decode in this process, one thread (predict_bound.decode_seconds on
400 files).  Writes benchmarks/results/worker_handover.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(ROOT / "tests")]
RESULTS = ROOT / "benchmarks" / "results"
FIRST, LAST = 20, 80  # batches between which the workers' CPU is read


def stacked_then_shared(items):
    """pipeline._collate as it was: a private stack, which pickling then copies into shared memory."""
    import torch

    from mobilenets.pipeline import DecodedBatch

    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failed = [(i, x) for i, x in items if not isinstance(x, torch.Tensor)]
    return DecodedBatch([i for i, _ in good], torch.stack([x for _, x in good]) if good else None, failed)


def workers_ms(files: list[Path], collate) -> float:
    """The workers' CPU ms per image between batches FIRST and LAST, ``collate`` in pipeline._collate's place
    (the loader looks it up when it is built; forked workers inherit it)."""
    from decode_floor import process_cpu

    from mobilenets import pipeline

    shipped = pipeline._collate
    pipeline._collate = collate
    try:
        at = {}
        for k, batch in enumerate(pipeline.batches(files, resolution=224, normalization=None, batch_size=32,
                                                   workers=2, draft=True)):
            if k in (FIRST, LAST):
                main, everything = process_cpu(os.getpid())
                at[k] = everything - main
    finally:
        pipeline._collate = shipped
    return (at[LAST] - at[FIRST]) / ((LAST - FIRST) * 32) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    if args.files < (LAST + 1) * 32:
        raise SystemExit(f"--files must be at least {(LAST + 1) * 32}: the workers are read at batch {LAST}")
    import torch

    from decode_floor import folder_of, uptime
    from mobilenets import images, pipeline
    from predict_bound import decode_seconds
    from predict_throughput import cpu_name, make_folder

    work = Path(args.work)
    source = make_folder(work / "imagenet-like", 1000, (500, 375), 1)
    folder = folder_of(sorted((source / "photos").glob("*.jpg")), args.files, work / "predict-cpu")
    files = sorted(folder.glob("*.jpg"))
    before = uptime()
    ways = {"as shipped: stacked into shared memory": pipeline._collate,
            "before: stacked, then copied into shared memory": stacked_then_shared}
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for pair in range(args.pairs):
        for name, collate in ways.items():
            runs[name].append(workers_ms(files, collate))
            print(f"pair {pair} {name}: {runs[name][-1]:.3f} ms", file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    decode = decode_seconds(sorted((source / "photos").glob("*.jpg"))[:400], images.draft_side(224)) * 1000
    after = uptime()
    command = ".venv/bin/python " + " ".join(["benchmarks/worker_handover.py", *sys.argv[1:]])
    medians = {name: statistics.median(v) for name, v in runs.items()}
    result = {"command": command, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "uptime_before": before, "uptime_after": after, "files": len(files), "runs": runs,
              "median_ms": medians, "decode_ms": decode}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worker_handover.json").write_text(json.dumps(result, indent=1))
    lines = [f"# What decoding workers spend beyond the decode ({result['date']})", "", f"    {command}", "",
             f"CPU: {result['cpu']} (load before `{before}`, after `{after}`). {len(files)} 500x375 JPEGs, "
             f"2 workers, batches of 32, no model; the workers' CPU between batches {FIRST} and {LAST}, "
             f"{args.pairs} interleaved pairs.", "",
             "| collate | workers' CPU ms / image, median | pairs |", "|---|---:|---|"]
    for name, v in runs.items():
        lines.append(f"| {name} | {medians[name]:.3f} | {', '.join(f'{x:.3f}' for x in v)} |")
    lines += ["", f"The decode itself, in one process at one thread: {decode:.3f} ms an image "
              "(predict_bound.decode_seconds, the least of 3 passes over 400 files)."]
    (RESULTS / "worker_handover.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
