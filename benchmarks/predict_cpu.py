"""Where predict's CPU goes on ImageNet-size JPEGs: its processes' CPU per image against the bound's decode + model.

    .venv/bin/python benchmarks/predict_cpu.py [--files 3000] [--rounds 2] [--precision int8] [--load 0.5]

On benchmarks/predict_throughput.py's "imagenet-like" folder (500x375, repeated as links up to ``--files``),
``python -m mobilenets predict --weights W FOLDER --json`` runs as a child process with each of a few flag
variants (default; --workers 1 and 3; --batch-size 64; --backend onnxruntime).  Between the answers
to images N/4 and 3N/4 (batch boundaries, the decoding pipeline full) the CPU of the main process and of its
decoding workers is read from /proc (decode_floor.steady), with the wall time: images/s, CPU ms per image
(main / workers) and how many of the cores were busy.  Then, in this process, the main process's parts on
batches of 32 (:func:`parts`).  The bound (benchmarks/predict_bound.py) counts decode + model
at one thread; what predict spends beyond it is what keeps it from the bound.  That bound is measured once,
quietly, the least of 3; a neighbour busy during predict's runs slows them and not it.  So each round also
measures it again, here, just before its runs (:func:`bound_meter`), and each run counts against its own round's.
Ablations: predict with Predictor.stream put back as it was (one batch at a time; and float input normalised
by PyTorch first).  ``--load 0.5``: a competing process busy for half a core throughout (a neighbour on a
shared machine).  Writes benchmarks/results/predict_cpu.{json,md} (with a load: predict_cpu_load50.{json,md}).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(ROOT / "tests")]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"default": [], "--workers 1": ["--workers", "1"], "--workers 3": ["--workers", "3"],
            "--batch-size 64": ["--batch-size", "64"], "--backend onnxruntime": ["--backend", "onnxruntime"]}
# predict with one of its ways put back as it was before, in a child that patches deploy.Predictor.stream
# (what predict runs a folder's batches through): the batches one at a time (all threads on one batch), and
# also as float input normalised by PyTorch first
ABLATIONS = {
    "a batch at a time": "Predictor.stream = lambda self, xs, normalization=None: "
                         "(self.pixels(x, normalization) if x.dtype == torch.uint8 else self(x) for x in xs)",
    "float input, a batch at a time": "Predictor.stream = lambda self, xs, normalization=None: "
                                      "(self(images.to_tensor(x, normalization) if x.dtype == torch.uint8 else x) "
                                      "for x in xs)",
}
LOAD = """import sys, time
while True:  # busy for a share of every 10 ms, asleep for the rest
    t = time.perf_counter()
    while time.perf_counter() - t < 0.01 * {share}:
        pass
    time.sleep(0.01 * (1 - {share}))
"""


def predict_command(weights: Path, folder: Path, flags: list[str], ablation: str | None = None) -> list[str]:
    if ablation is None:
        return [sys.executable, "-m", "mobilenets", "predict", "--weights", str(weights), str(folder), "--json", *flags]
    patch = ("import sys, torch; from mobilenets import images; from mobilenets.deploy.predictor import Predictor; "
             f"{ABLATIONS[ablation]}; from mobilenets.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", patch, "predict", "--weights", str(weights), str(folder), "--json", *flags]


@contextlib.contextmanager
def competing_load(share: float):
    """A neighbour: one process busy for ``share`` of every 10 ms (0: none)."""
    if not share:
        yield
        return
    child = subprocess.Popen([sys.executable, "-c", LOAD.format(share=share)])
    try:
        yield
    finally:
        child.kill()
        child.wait()


def steady_ms(command: list[str], count: int, batch_size: int) -> dict:
    """decode_floor.steady's reading, as images/s, CPU ms per image (all, main, workers) and cores busy."""
    from decode_floor import steady

    r = steady(command, count, batch_size)
    return {"images_per_s": r["images_per_s"], "cpu_ms": r["per_image_s"] * 1000,
            "main_ms": r["main_per_image_s"] * 1000,
            "workers_ms": (r["per_image_s"] - r["main_per_image_s"]) * 1000, "cores_busy": r["cores_busy"]}


def bound_meter(run, x8, source: Path):
    """A function measuring predict_bound's bound now: (decode ms, model ms, images/s on this machine's cores),
    decode on 400 of ``source``'s files and the model (``run``, compiled once, on the uint8 batch ``x8``) on 12
    batches of 32, each the least of 2 passes at one thread, as benchmarks/predict_bound.py measures them.
    Measured once a round, a round's bound has met the same neighbours as its runs."""
    from mobilenets import images
    from predict_bound import decode_seconds, model_seconds

    files = sorted((source / "photos").glob("*.jpg"))[:400]
    cores = len(os.sched_getaffinity(0))

    def measure() -> dict:
        decode = decode_seconds(files, images.draft_side(224), passes=2) * 1000
        model_ms = model_seconds(run, x8, 12, passes=2) * 1000
        return {"decode_ms": decode, "model_ms": model_ms, "bound_images_per_s": cores * 1000 / (decode + model_ms)}

    return measure


def parts(run, x8, backend: str) -> dict:
    """CPU ms per image of the main process's parts on the batch of 32 ``x8``: the normalisation, and the runtime
    ``run`` on float input one batch at a time (predict before it fed pixels), on pixels one batch at a time, and
    on pixels streamed, 12 batches in a row (what predict does: Predictor.stream)."""
    from mobilenets import images
    from predict_bound import cpu_seconds

    n = images.INCEPTION

    def streamed():
        for _ in run.stream([x8] * 12, n):
            pass

    ways = {"normalise (images.to_tensor)": (lambda: images.to_tensor(x8, n), 12),
            f"{backend}, float input + normalise, a batch at a time": (lambda: run(images.to_tensor(x8, n)), 12),
            f"{backend}, pixels, a batch at a time": (lambda: run.pixels(x8, n), 12),
            f"{backend}, pixels streamed (predict)": (streamed, 1)}
    out = {}
    for name, (fn, repeat) in ways.items():
        fn()  # first-call set-up (a graph compiled) is not the cost
        out[name] = min(cpu_seconds(fn, repeat) for _ in range(3)) / (32 * (12 // repeat))
    return {k: v * 1000 for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="int8")
    ap.add_argument("--load", type=float, default=0.0,
                    help="a competing process busy for this share of one core throughout (0.5: half a core)")
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    from decode_floor import folder_of, uptime
    from predict_throughput import cpu_name, make_folder, real_weights_and_calibration

    work = Path(args.work)
    source = make_folder(work / "imagenet-like", 1000, (500, 375), 1)
    folder = folder_of(sorted((source / "photos").glob("*.jpg")), args.files, work / "predict-cpu")
    weights, calib = real_weights_and_calibration(work)
    before = uptime()
    extra = ["--precision", "int8", "--calib-data", str(calib)] if args.precision == "int8" else []
    variants = {name: (flags, None) for name, flags in VARIANTS.items()}
    variants.update({f"ablation: {name}": ([], name) for name in ABLATIONS})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    bound = json.loads((RESULTS / "predict_bound.json").read_text())
    row = next(r for r in bound["rows"] if r["folder"].startswith("imagenet") and r["precision"] == args.precision)
    # the runtime the bound counts, compiled once here: each round's bound and the parts run it
    import torch

    import mobilenets
    from mobilenets import deploy
    from predict_bound import compiled, pixel_batch

    torch.set_num_threads(1)
    calibration, _ = deploy.image_batches(calib, 224)
    run = compiled(mobilenets.load(weights).eval(), args.precision, calibration, row["backend"])
    x8 = pixel_batch(calib)
    measure_bound = bound_meter(run, x8, source)
    bounds: list[dict] = []
    with competing_load(args.load):
        for round_ in range(args.rounds + 1):  # round 0 fills the caches (int8 ranges, the runtime chosen)
            if round_:
                bounds.append(measure_bound())
                print(f"round {round_} bound: " + ", ".join(f"{k} {v:.2f}" for k, v in bounds[-1].items()),
                      file=sys.stderr, flush=True)
            for name, (flags, ablation) in variants.items():  # interleaved: a change in load meets every variant
                command = predict_command(weights, folder, [*extra, *flags], ablation)
                batch_size = int(flags[1]) if flags[:1] == ["--batch-size"] else 32
                r = steady_ms(command, args.files, batch_size)
                print(f"round {round_} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), file=sys.stderr,
                      flush=True)
                if round_:
                    runs[name].append({**r, "of_round_bound": r["images_per_s"] / bounds[-1]["bound_images_per_s"]})
                if round_ == 0:
                    break
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    round_bound = {k: statistics.median(b[k] for b in bounds) for k in bounds[0]}
    component = parts(run, x8, row["backend"])
    after = uptime()
    command = ".venv/bin/python " + " ".join(["benchmarks/predict_cpu.py", *sys.argv[1:]])
    result = {"command": command, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "uptime_before": before, "uptime_after": after, "load": args.load, "files": args.files, "precision": args.precision,
              "bound_row": row, "round_bounds": bounds, "runs": runs, "summary": summary, "parts_ms": component}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from mobilenets.atomic import atomic_write

    stem = "predict_cpu" + (f"_load{round(args.load * 100)}" if args.load else "")
    atomic_write(RESULTS / f"{stem}.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    cores = bound.get("cores", 2)
    lines = [f"# Where predict's CPU goes, {args.precision}, ImageNet-size JPEGs ({result['date']})", "",
             f"    {command}", "",
             f"CPU: {result['cpu']} (load before `{before}`, after `{after}`). {args.files} 500x375 JPEGs; medians of "
             f"{args.rounds} runs a variant, each a fresh `python -m mobilenets predict --json` (int8 with "
             "`--calib-data`), measured between the answers to images N/4 and 3N/4. " +
             (f"A competing process was busy for {args.load:.0%} of one core throughout." if args.load else
              "No competing process of ours."), "",
             f"The bound (benchmarks/results/predict_bound.md): decode {row['decode_ms']:.2f} + model "
             f"{row['model_ms']:.2f} ({row['backend']}) = {row['decode_ms'] + row['model_ms']:.2f} ms of CPU an image, "
             f"{row['bound_images_per_s']:.0f} images/s on {cores} cores. The same bound measured again at the start "
             f"of each round, in this process (decode on 400 files and the model on 12 batches, the least of 2 "
             f"passes each), so that it meets the neighbours the round's runs met: " +
             "; ".join(f"{b['decode_ms']:.2f} + {b['model_ms']:.2f} ms, {b['bound_images_per_s']:.0f} images/s"
                       for b in bounds) + f" (median {round_bound['bound_images_per_s']:.0f}). \"Of its round's\" is "
             "a run's images/s over its round's bound, the median over rounds.", "",
             "| flags | images/s | of the bound | of its round's | CPU ms / image | main | workers | cores busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / row['bound_images_per_s']:.0%} | "
                     f"{r['of_round_bound']:.0%} | "
                     f"{r['cpu_ms']:.2f} | {r['main_ms']:.2f} | {r['workers_ms']:.2f} | {r['cores_busy']:.2f} |")
    lines += ["", "The main process's parts, CPU ms per image on batches of 32 (least of 3): " +
              ", ".join(f"{k} {v:.2f}" for k, v in component.items()) + "."]
    atomic_write(RESULTS / f"{stem}.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
