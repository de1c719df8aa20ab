"""Training input speed: our loader against torchvision's, and `mobilenets train`'s default flags on a busy CPU.

(a) loader: images/s of one pass over a folder of JPEGs made from real photos
    (tests/real_data.photos(): the photographs scikit-image and matplotlib ship),
    ours (data.ImageFolder + TrainTransform + data.loader) against torchvision
    (datasets.ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor +
    Normalize in a DataLoader) at the same crop range, resolution, batch and
    worker count; ImageNet-size (500x375) and phone-size (4000x3000) files.
(b) `mobilenets train` with its default flags against every --threads x
    --num-workers setting, quiet and while a competing CPU load runs: one
    process spinning on core 0, started before and killed after each run
    (it also stops itself after 10 minutes).
(c) the same for `make demo`'s training (the built-in digits), with and
    without the Makefile's flags.

Settings are interleaved round by round, so slow spells of a shared machine hit
all of them; medians over rounds.  The load average is recorded beside every
run.  Writes benchmarks/results/train_input.{json,md}.

    flock /tmp/mobilenets-bench.lock .venv/bin/python benchmarks/train_input.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

DEMO = ["--recipe", "paper", "--lr", "0.02", "--lr-step-size", "1", "--lr-gamma", "0.85", "--alpha", "0.5",
        "--resolution", "48", "--batch-size", "32", "--min-scale", "0.5"]
JPEG_SMALL_MODEL = ["--alpha", "0.25", "--resolution", "128", "--batch-size", "32"]
GRID = [(t, w) for t in (1, 2) for w in (0, 1, 2)]
HOG = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# ---------------------------------------------------------------- folders of real photos


def make_folder(root: Path, size: tuple[int, int], per_class: int, seed: int) -> Path:
    """root/<photo>/<k>.jpg: seeded crops of each packaged photo (60-100% of it), resized to ``size``, quality 90."""
    from PIL import Image

    from real_data import photos

    rng = random.Random(seed)
    width, height = size
    for name, pixels in photos():
        image = Image.fromarray(pixels)
        folder = root / name.split(".")[0]
        folder.mkdir(parents=True, exist_ok=True)
        h0, w0 = pixels.shape[:2]
        for k in range(per_class):
            cw = int(min(w0, h0 * width / height) * rng.uniform(0.6, 1.0))
            ch = int(cw * height / width)
            left, top = rng.randint(0, w0 - cw), rng.randint(0, h0 - ch)
            crop = image.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.resize(size, Image.BICUBIC).save(folder / f"{k:04d}.jpg", quality=90)
    return root


def make_split_folders(base: Path) -> dict[str, Path]:
    folders = {"500x375": ((500, 375), 34, 2), "4000x3000": ((4000, 3000), 4, 1)}
    out = {}
    for name, (size, train, val) in folders.items():
        root = base / name
        make_folder(root / "train", size, train, 0)
        make_folder(root / "val", size, val, 1)
        out[name] = root
    return out


# ---------------------------------------------------------------- (a) loaders


def ours(root: Path, resolution: int, min_scale: float, batch: int, workers: int):
    from mobilenets import data

    dataset = data.ImageFolder(root, data.TrainTransform(resolution, min_scale))
    return data.loader(dataset, data.EpochSampler(len(dataset), seed=0, epoch=0), batch, workers, drop_last=True)


def torchvision_loader(root: Path, resolution: int, min_scale: float, batch: int, workers: int):
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(resolution, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       generator=torch.Generator().manual_seed(0))


def time_pass(loader) -> float:
    images, start = 0, time.perf_counter()
    for batch in loader:
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def loaders(folders: dict[str, Path], rounds: int, workers: list[int]) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    cases = [(name, resolution, scale) for name in folders for resolution, scale in ((224, 0.08), (128, 0.35))]
    rows = []
    for name, resolution, scale in cases:
        for w in workers:
            rates = {"ours": [], "torchvision": []}
            loads = []
            for _ in range(rounds):
                for who, make in (("ours", ours), ("torchvision", torchvision_loader)):
                    loads.append(loadavg())
                    rates[who].append(time_pass(make(folders[name] / "train", resolution, scale, 16, w)))
            row = {"files": name, "resolution": resolution, "min_scale": scale, "workers": w, "batch": 16,
                   "ours": rates["ours"], "torchvision": rates["torchvision"], "loadavg": loads,
                   "ours_median": statistics.median(rates["ours"]),
                   "torchvision_median": statistics.median(rates["torchvision"])}
            row["ratio"] = row["ours_median"] / row["torchvision_median"]
            print(json.dumps({k: v for k, v in row.items() if k not in ("ours", "torchvision", "loadavg")}),
                  flush=True)
            rows.append(row)
    return rows


def loader_cpu(folders: dict[str, Path]) -> list[dict]:
    """CPU milliseconds per image of each loader in this process (no workers): what a core can feed, and a
    figure another busy process barely changes."""
    rows = []
    for name in folders:
        for resolution, scale in ((224, 0.08), (128, 0.35)):
            row = {"files": name, "resolution": resolution, "min_scale": scale}
            for who, make in (("ours", ours), ("torchvision", torchvision_loader)):
                loader = make(folders[name] / "train", resolution, scale, 16, 0)
                images, start = 0, time.process_time()
                for batch in loader:
                    images += len(batch[0])
                row[f"{who}_cpu_ms"] = 1000 * (time.process_time() - start) / images
            row["ratio"] = row["torchvision_cpu_ms"] / row["ours_cpu_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- (b), (c) mobilenets train


def train_run(args: list[str], loaded: bool, epochs: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="train-input-"))
    command = [sys.executable, "-m", "mobilenets", "train", *args, "--epochs", str(epochs), "--out", str(out / "run"),
               "--no-progress", "--no-plot"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT / "src")
    hog = None
    if loaded:
        hog = subprocess.Popen([sys.executable, "-c", HOG], preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        before = loadavg()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        after = loadavg()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    try:
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        chosen = next((line for line in result.stderr.splitlines() if line.startswith("using ")), "")
        return {"images_per_s": rows[-1]["images_per_s"], "loadavg_before": before, "loadavg_after": after,
                "chosen": chosen, **{k: rows[-1][k] for k in ("threads", "num_workers", "loader_images_per_core_s",
                                                              "input_wait_fraction", "model_images_per_s")
                                     if k in rows[-1]}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def train_grid(name: str, args: list[str], grid: list[tuple[int, int]], extra: dict[str, list[str]], rounds: int,
               loads: list[bool], epochs: int) -> list[dict]:
    settings = {"default flags": [], **extra,
                **{f"--threads {t} --num-workers {w}": ["--threads", str(t), "--num-workers", str(w)] for t, w in grid}}
    rows = []
    for loaded in loads:
        runs = {s: [] for s in settings}
        for _ in range(rounds):
            for setting, flags in settings.items():
                runs[setting].append(train_run(args + flags, loaded, epochs))
        medians = {s: statistics.median(r["images_per_s"] for r in rs) for s, rs in runs.items()}
        tuned = {s: m for s, m in medians.items() if s != "default flags"}
        best = max(tuned, key=tuned.get)
        row = {"case": name, "load": "competing load" if loaded else "quiet", "medians": medians,
               "best_hand_tuned": best, "best_over_default": medians[best] / medians["default flags"],
               "runs": runs}
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [f"# Training input: loader and default flags, {result['machine']['cores']} cores",
             "", f"- command: `{result['command']}`", f"- date (UTC): {result['date']}",
             f"- CPU: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch "
             f"{result['machine']['torch']}, Python {result['machine']['python']}",
             f"- load average before / after: {result['loadavg_before']} / {result['loadavg_after']} (the machine "
             "is shared with other work: every run's load average is in the JSON)"]
    lines += [f"- kept from an earlier run ({how}): {part}" for part, how in result.get("kept_from", {}).items()]
    lines.append("")
    if result.get("loaders"):
        lines += ["## (a) Loader: ours vs torchvision ImageFolder + RandomResizedCrop + flip + normalize",
                  "", "Images/s of one pass, batch 16, same crop range and workers; median of "
                  f"{result['rounds']} interleaved rounds.", "",
                  "| files | resolution | crop area | workers | ours img/s | torchvision img/s | ours / torchvision |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["loaders"]:
            lines.append(f"| {r['files']} | {r['resolution']} | {r['min_scale']}-1 | {r['workers']} | "
                         f"{r['ours_median']:.0f} | {r['torchvision_median']:.0f} | {r['ratio']:.2f} |")
        lines.append("")
    if result.get("loader_cpu"):
        lines += ["CPU time per image in one process (no workers; images per second per core = 1000 / ms):", "",
                  "| files | resolution | ours ms | torchvision ms | torchvision / ours |", "|---|---:|---:|---:|---:|"]
        for r in result["loader_cpu"]:
            lines.append(f"| {r['files']} | {r['resolution']} | {r['ours_cpu_ms']:.2f} | {r['torchvision_cpu_ms']:.2f} "
                         f"| {r['ratio']:.2f} |")
        lines.append("")
    for r in result.get("train", []):
        lines += [f"## {r['case']}, {r['load']}", "",
                  f"`mobilenets train {' '.join(result['cases'][r['case']])}` (epochs {result['epochs']}); "
                  f"images/s of the last epoch, median of {result['rounds']} interleaved rounds.", "",
                  "| flags | img/s (median) | runs | chosen / load average |", "|---|---:|---|---|"]
        for setting, median in r["medians"].items():
            runs = r["runs"][setting]
            rates = ", ".join(f"{x['images_per_s']:.0f}" for x in runs)
            chosen = runs[0]["chosen"].removeprefix("using ") + "; " if setting == "default flags" else ""
            loads = ", ".join(x["loadavg_before"].split()[0] for x in runs)
            lines.append(f"| {setting} | {median:.1f} | {rates} | {chosen}load {loads} |")
        lines += ["", f"best hand-tuned: {r['best_hand_tuned']}, {r['best_over_default']:.2f}x the default flags.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--parts", default="a,b,c", help="which of a, b, c to run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_input"))
    args = parser.parse_args()
    import torch

    parts = set(args.parts.split(","))
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                          "python": platform.python_version()},
              "rounds": args.rounds, "epochs": args.epochs, "loadavg_before": loadavg(), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="train-input-folders-") as tmp:
        folders = make_split_folders(Path(tmp))
        if "a" in parts:
            result["loaders"] = loaders(folders, args.rounds, [0, 2])
            result["loader_cpu"] = loader_cpu(folders)
        cases = {}
        if "b" in parts:  # default flags against every hand-tuned setting, under the competing load
            cases["JPEGs 500x375, MobileNet 0.25-128"] = (
                ["--data", str(folders["500x375"]), *JPEG_SMALL_MODEL], GRID, {}, [True])
        if "c" in parts:  # make demo's flags, quiet and loaded
            cases["make demo's training (built-in digits, MobileNet 0.5-48)"] = (DEMO, [], {
                "Makefile before (--num-workers 0 --threads 1)": ["--num-workers", "0", "--threads", "1"],
                "Makefile without --threads 1 (--num-workers 0)": ["--num-workers", "0"]}, [False, True])
        result["train"] = []
        for name, (flags, grid, extra, loads) in cases.items():
            result["cases"][name] = [f.replace(tmp, "<folder>") for f in flags]
            result["train"] += train_grid(name, flags, grid, extra, args.rounds, loads, args.epochs)
    result["loadavg_after"] = loadavg()
    out = Path(args.out)
    if out.with_suffix(".json").exists():  # a partial rerun keeps the parts it did not redo
        earlier = json.loads(out.with_suffix(".json").read_text())
        for key in ("loaders", "loader_cpu"):
            if key not in result and key in earlier:
                result[key] = earlier[key]
                result.setdefault("kept_from", {})[key] = earlier["command"] + " at " + earlier["date"]
        redone = {r["case"] for r in result["train"]}
        for row in earlier.get("train", []):
            if row["case"] not in redone:
                result["train"].append(row)
                result["cases"][row["case"]] = earlier["cases"][row["case"]]
                result.setdefault("kept_from", {})[row["case"]] = earlier["command"] + " at " + earlier["date"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
