"""Training throughput (images/s) of MobileNet 1.0-224 on the CPU, ours against timm's mobilenetv1_100.

One training step is forward, cross-entropy, backward and an SGD (momentum
0.9) update, on a batch of random images, exactly as ``mobilenets train`` runs
it (same autocast and memory-format handling).  Both models have the same
structure (4,231,976 parameters with BN); they are timed in the same process,
interleaved round by round, in three settings: NCHW fp32, channels_last
fp32, channels_last + bf16 autocast.  Reported: median step time over the
measured rounds, images/s = batch / median, and ours/timm.

Run it alone (timing must not overlap another benchmark):

    flock /tmp/mobilenets-bench.lock .venv/bin/python benchmarks/train_throughput.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SETTINGS = [
    ("NCHW fp32", False, False),
    ("channels_last fp32", True, False),
    ("channels_last + bf16 autocast", True, True),
]


def make_models():
    import timm

    from mobilenets import mobilenet_v1

    torch.manual_seed(0)
    return {"mobilenets": mobilenet_v1(1.0, num_classes=1000), "timm mobilenetv1_100": timm.create_model(
        "mobilenetv1_100", pretrained=False, num_classes=1000)}


def step_fn(model, channels_last: bool, amp: bool, batch: int, resolution: int):
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    else:
        model.to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(batch: int, resolution: int, rounds: int, steps: int, warmup: int) -> list[dict]:
    results = []
    for name, channels_last, amp in SETTINGS:
        models = make_models()
        steps_of = {k: step_fn(m, channels_last, amp, batch, resolution) for k, m in models.items()}
        for step in steps_of.values():
            for _ in range(warmup):
                step()
        times = {k: [] for k in models}
        for r in range(rounds):
            order = list(steps_of) if r % 2 == 0 else list(reversed(steps_of))  # alternate who goes first
            for k in order:
                t0 = time.perf_counter()
                for _ in range(steps):
                    steps_of[k]()
                times[k].append((time.perf_counter() - t0) / steps)
        medians = {k: statistics.median(v) for k, v in times.items()}
        row = {"setting": name, "channels_last": channels_last, "bf16_autocast": amp}
        for k, m in medians.items():
            row[k] = {"median_step_s": m, "images_per_s": batch / m, "step_s": times[k]}
        row["ratio_ours_to_timm"] = row["mobilenets"]["images_per_s"] / row["timm mobilenetv1_100"]["images_per_s"]
        results.append(row)
        print(f"{name:32} mobilenets {row['mobilenets']['images_per_s']:6.1f} img/s   "
              f"timm {row['timm mobilenetv1_100']['images_per_s']:6.1f} img/s   "
              f"ratio {row['ratio_ours_to_timm']:.3f}", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per model and setting (median taken)")
    p.add_argument("--steps", type=int, default=1, help="training steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = p.parse_args()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    started = datetime.datetime.now(datetime.timezone.utc)
    results = measure(args.batch_size, args.resolution, args.rounds, args.steps, args.warmup)
    record = {
        "command": "flock /tmp/mobilenets-bench.lock .venv/bin/python benchmarks/train_throughput.py"
                   + "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                             if k != "out" and v != p.get_default(k)),
        "date_utc": started.isoformat(timespec="seconds"),
        "uptime_before": uptime_before,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "note": "the 2-core machine was shared with other agents' work during the run",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "processor": platform.processor()},
        "batch_size": args.batch_size, "resolution": args.resolution, "rounds": args.rounds, "steps_per_round": args.steps,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
