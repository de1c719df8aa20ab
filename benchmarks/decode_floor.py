"""How close `predict` comes, in CPU per image, to the floor of decoding a 12-megapixel photo plus the model.

    nice -n 5 .venv/bin/python benchmarks/decode_floor.py PHOTOS [--megapixels 10.5 14.5] [--rounds 3]
        [--images 960]

PHOTOS: a folder of camera JPEGs (subfolders too), e.g. the 195 photos of benchmarks/decode_agreement_sources.json
(not in the repository: their licences ask it); the ones of 10.5 to 14.5 megapixels are measured.  Every figure is
CPU time (time.process_time, one thread; /proc for predict's processes): what the work costs, which a busy
machine inflates less than it does wall time.

- floor: PIL opens the file and decodes it at 1/8 scale (``draft``) and nothing else: the entropy decoding every
  pixel needs plus libjpeg's 1x1 IDCT, the least any decoder of the file does;
- predict's decode: images.load_pixels(min_side=images.draft_side(224)) (predict's default scale: the resize
  size, 1/8 for 12 megapixels), then images.eval_pixels (resize and centre crop to 224); also its decode alone;
- twice the resize size (512, the earlier default: 1/4 for 12 megapixels), then the same resize and crop;
- exact: images.load_pixels (every pixel) then images.eval_pixels;
- model: predict_bound.model_costs: deploy.compile(real MobileNet v1 1.0-224 weights, precision, batch_size=32)
  for each backend installed, run on uint8 pixels as predict runs it, per image of a batch of 32 (fp32 and int8;
  on an AVX2-only CPU int8 weights are 7-bit);
- actual: ``python -m mobilenets predict --weights W FOLDER --json`` (default flags; int8: ``--precision int8
  --calib-data``) as a child process on a folder of ``--images`` photos (repeated, as links), after one warm-up
  run that fills the caches.  The CPU of the process and all its descendants (/proc) is read when the answer
  to image N/4 arrives and again at 3N/4, both at batch boundaries with the decoding pipeline full, so set-up
  (imports, compiling, the first workers) and the drain at the end stay out: per image = CPU between the
  marks / images between them; set-up = CPU at the first mark - N/4 x per image.  The median of ``--rounds``
  runs.  (Two runs of different lengths, subtracted, varied by a fifth on a shared machine.)

Per file and variant, the median over ``--rounds`` interleaved rounds; then the mean over files.  Reports
floor + model, predict's decode + model, actual, and actual / (floor + model) (issue 24's target: <= 1.15).
Writes benchmarks/results/decode_floor.{json,md}.
"""

from __future__ import annotations

import argparse
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
RESOLUTION = 224


def photos(folder: Path, low: float, high: float) -> list[Path]:
    from PIL import Image

    from mobilenets import images

    found = []
    for f in images.list_images(folder):
        with Image.open(f) as im:
            if im.format in images.JPEG_FORMATS and low * 1e6 <= im.size[0] * im.size[1] <= high * 1e6:
                found.append(f)
    return found


def decode_costs(files: list[Path], rounds: int) -> dict[str, float]:
    """Mean over files of the median CPU seconds of each way of decoding."""
    from PIL import Image

    from mobilenets import images

    def floor(f):
        with Image.open(f) as im:
            im.draft(None, (im.size[0] // 8, im.size[1] // 8))
            im.load()

    side = images.draft_side(RESOLUTION)
    ways = {"floor (1/8, decode only)": floor,
            "predict's decode alone": lambda f: images.load_pixels(f, min_side=side),
            "predict's decode + resize + crop": lambda f: images.eval_pixels(images.load_pixels(f, min_side=side),
                                                                              RESOLUTION),
            "twice the resize size + resize + crop": lambda f: images.eval_pixels(
                images.load_pixels(f, min_side=2 * images.resize_size(RESOLUTION)), RESOLUTION),
            "exact decode + resize + crop": lambda f: images.eval_pixels(images.load_pixels(f), RESOLUTION)}
    for way in ways.values():  # imports and first-call set-up
        way(files[0])
    seconds: dict[str, dict[Path, list[float]]] = {name: {f: [] for f in files} for name in ways}
    for _ in range(rounds):
        for f in files:
            for name, way in ways.items():
                start = time.process_time()
                way(f)
                seconds[name][f].append(time.process_time() - start)
    return {name: statistics.mean(statistics.median(v) for v in by_file.values()) for name, by_file in seconds.items()}


def folder_of(files: list[Path], count: int, work: Path) -> Path:
    """A folder of ``count`` links to ``files``, repeated in order."""
    folder = work / f"photos-{count}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for k in range(count):
            f = files[k % len(files)]
            (folder / f"{k:05d}{f.suffix.lower()}").symlink_to(f.resolve())
    return folder


def process_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of process ``pid`` itself, all threads; of it, every live descendant and its reaped
    children), from one reading of Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            # after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based from state
            stats[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:13]), sum(int(f) for f in fields[13:15]))
    tree = {pid}
    grew = True
    while grew:
        grew = False
        for p, (ppid, _, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    own = stats[pid][1] if pid in stats else 0
    total = sum(stats[p][1] for p in tree if p in stats) + (stats[pid][2] if pid in stats else 0)
    return own / tick, total / tick


def steady(command: list[str], count: int, batch_size: int = 32) -> dict:
    """Run ``command`` (one answer a line on stdout) on ``count`` images.  Between the answers to images
    count/4 and 3count/4: images/s, CPU seconds per image (all its processes, the main one alone) and cores
    busy; also set-up CPU seconds (at the first mark, less its images at that rate) and wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    marks = [count // 4 // batch_size * batch_size, 3 * count // 4 // batch_size * batch_size]
    start = time.perf_counter()
    at, seen = {}, 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as child:
        for _ in child.stdout:
            seen += 1
            if seen in marks:  # the batch's answers come together: this is its last, the next wait on its model
                at[seen] = (*process_cpu(child.pid), time.perf_counter())
        child.wait()
    wall = time.perf_counter() - start
    if child.returncode or len(at) != 2:
        raise SystemExit(f"{' '.join(command)} failed (exit {child.returncode}, {seen} answers)")
    (main0, all0, t0), (main1, all1, t1) = at[marks[0]], at[marks[1]]
    n = marks[1] - marks[0]
    per_image = (all1 - all0) / n
    return {"images_per_s": n / (t1 - t0), "per_image_s": per_image, "main_per_image_s": (main1 - main0) / n,
            "cores_busy": (all1 - all0) / (t1 - t0), "setup_s": all0 - marks[0] * per_image, "wall_s": wall}


def actual_costs(weights: Path, calib: Path, files: list[Path], count: int, work: Path, rounds: int) -> dict:
    flags = {"fp32": [], "int8": ["--precision", "int8", "--calib-data", str(calib)]}
    folder = folder_of(files, count, work)
    out = {}
    for precision, extra in flags.items():
        command = [sys.executable, "-m", "mobilenets", "predict", "--weights", str(weights), str(folder), "--json",
                   *extra]
        runs = []
        for k in range(rounds + 1):  # the first fills the caches (int8 ranges, the runtime chosen)
            r = steady(command, count)
            per_image, setup, wall = r["per_image_s"], r["setup_s"], r["wall_s"]
            print(f"predict {precision} {count} images: {per_image * 1000:.1f} ms CPU per image, set-up "
                  f"{setup:.1f} s CPU, {wall:.1f} s wall", file=sys.stderr, flush=True)
            if k:
                runs.append((per_image, setup, wall))
        per_image, setup, wall = sorted(runs)[(len(runs) - 1) // 2]
        out[precision] = {"per_image_s": per_image, "per_image_s_rounds": [r[0] for r in runs], "setup_s": setup,
                          "wall_s": wall, "images": count,
                          "command": " ".join(["python -m mobilenets predict --weights W FOLDER --json", *extra])}
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("photos", type=Path)
    ap.add_argument("--megapixels", type=float, nargs=2, default=(10.5, 14.5))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-decode-floor"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from predict_bound import model_costs
    from predict_throughput import cpu_name, real_weights_and_calibration

    load_before = uptime()
    work = Path(args.work)
    files = photos(args.photos, *args.megapixels)
    print(f"{len(files)} photos of {args.megapixels[0]}-{args.megapixels[1]} megapixels", file=sys.stderr)
    weights, calib = real_weights_and_calibration(work)
    decode = decode_costs(files, args.rounds)
    for name, s in decode.items():
        print(f"{name}: {s * 1000:.2f} ms", file=sys.stderr, flush=True)
    model = model_costs(weights, calib, args.batches)
    actual = actual_costs(weights, calib, files, args.images, work, args.rounds)
    load_after = uptime()
    floor = decode["floor (1/8, decode only)"]
    ours = decode["predict's decode + resize + crop"]
    rows = []
    for precision in ("fp32", "int8"):
        backend = min(model[precision], key=model[precision].get)
        m = model[precision][backend]
        a = actual[precision]["per_image_s"]
        rows.append({"precision": precision, "backend": backend, "model_ms": m * 1000,
                     "floor_plus_model_ms": (floor + m) * 1000, "decode_plus_model_ms": (ours + m) * 1000,
                     "actual_ms": a * 1000, "setup_s": actual[precision]["setup_s"],
                     "actual_over_floor_plus_model": a / (floor + m), "actual_over_decode_plus_model": a / (ours + m)})
    from mobilenets import images

    command = "nice -n 5 .venv/bin/python " + " ".join(["benchmarks/decode_floor.py", *sys.argv[1:]])
    result = {"command": command, "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uptime_before": load_before,
              "uptime_after": load_after, "photos": [str(f.relative_to(args.photos)) for f in files],
              "mpo_photos": sum(1 for f in files if _format(f) == "MPO"), "decode_s": decode, "model_s": model,
              "actual": actual, "rows": rows, "draft_side": images.draft_side(RESOLUTION)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from mobilenets.atomic import atomic_write

    atomic_write(RESULTS / "decode_floor.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    lines = [f"# predict's CPU per 12-megapixel photo against the decoding floor ({result['date']})", "",
             f"    {command}", "",
             f"CPU: {result['cpu']}, {result['cores']} cores, shared with other sessions (load before "
             f"`{load_before}`, after `{load_after}`).  {len(files)} camera photos of {args.megapixels[0]} to "
             f"{args.megapixels[1]} megapixels ({result['mpo_photos']} of them MPO); CPU milliseconds per image.", "",
             "| decoding (one thread) | ms |", "|---|---:|"]
    lines += [f"| {name} | {s * 1000:.2f} |" for name, s in decode.items()]
    lines += ["", "| precision | model ms (fastest backend) | floor + model | predict's decode + model | actual "
              "(steady, per image) | set-up s | actual / (floor + model) | actual / (decode + model) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['model_ms']:.2f} ({r['backend']}) | {r['floor_plus_model_ms']:.2f} | "
                     f"{r['decode_plus_model_ms']:.2f} | {r['actual_ms']:.2f} | {r['setup_s']:.1f} | "
                     f"{r['actual_over_floor_plus_model']:.2f} | {r['actual_over_decode_plus_model']:.2f} |")
    lines += ["", "Model CPU ms per image, every backend: " + "; ".join(
        f"{p} " + ", ".join(f"{b} {s * 1000:.2f}" for b, s in by.items()) for p, by in model.items()),
              "", "Actual: " + "; ".join(f"{p}: `{a['command']}` on {a['images']} images, CPU ms per image in each "
                                         "run " + ", ".join(f"{x * 1000:.1f}" for x in a["per_image_s_rounds"])
                                         + f" (the median run: {a['wall_s']:.1f} s wall)" for p, a in actual.items())]
    atomic_write(RESULTS / "decode_floor.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n".join(lines))
    return 0


def _format(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        return im.format


if __name__ == "__main__":
    raise SystemExit(main())
