"""Peak memory of `mobilenets.predict.predict` against the number of images: it should not grow with them.

    .venv/bin/python benchmarks/predict_memory.py [--counts 100,400,1600,6400] [--repeats 3] [--precision fp32]

Folders of 500x375 JPEGs cut from the packaged photos (predict_throughput.make_folder), the real 1.0-224
weights; each count runs ``--repeats`` times, each in a fresh process (predict_throughput.run_candidate),
which reports its own peak RSS and the largest of its decoding workers'; the table shows the largest of
the repeats (heap fragmentation differs from run to run: before pipeline.bound_heap, 2 runs in 3 grew
by a batch's 19 MB a batch).  Writes benchmarks/results/predict_memory.{json,md} (int8:
predict_memory_int8.{json,md}; int8 runs OpenVINO's streams, several batches in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_throughput import (RESULTS, cpu_name, make_folder, real_weights_and_calibration,  # noqa: E402
                                run_candidate)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="100,400,1600,6400")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-memory"))
    args = ap.parse_args()
    work = Path(args.work)
    weights, calib = real_weights_and_calibration(work)
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        folder = make_folder(work / f"n{count}", count, (500, 375), 3)
        runs = [run_candidate(f"mobilenets {args.precision}", folder, weights, calib) for _ in range(args.repeats)]
        print(count, runs, file=sys.stderr, flush=True)
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append({"images": count, **runs[-1]})
            continue
        rows.append({"images": count, "runs": runs, "maxrss_mb": max(r["maxrss_mb"] for r in ok),
                     "children_maxrss_mb": max(r["children_maxrss_mb"] for r in ok),
                     "end_to_end_images_per_s": sorted(r["end_to_end_images_per_s"] for r in ok)[len(ok) // 2]})
    command = "nice -n 0 .venv/bin/python " + " ".join(["benchmarks/predict_memory.py", *sys.argv[1:]])
    result = {"command": command, "cpu": cpu_name(), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": os.getloadavg(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "predict_memory" + ("" if args.precision == "fp32" else f"_{args.precision}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Peak memory of predict against the number of images ({result['date']})", "",
             f"    {command}", "", f"CPU: {result['cpu']} ({result['cores']} cores); load average "
             f"{result['loadavg'][0]:.2f}. 500x375 JPEGs, real 1.0-224 weights, {args.precision}; the largest "
             f"peak of {args.repeats} runs each (median images/s).", "",
             "| images | peak RSS MB, main process | largest decoding worker MB | images/s end to end |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['images']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['images']} | {r['maxrss_mb']:.0f} | {r['children_maxrss_mb']:.0f} | "
                         f"{r['end_to_end_images_per_s']:.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
