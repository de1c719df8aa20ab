"""The GPU side, beside timm's same architecture on the same GPU: ready for the day a GPU is lent.

    python benchmarks/gpu_check.py                 # on a CUDA machine: about 5 minutes on one H100
    python benchmarks/gpu_check.py --dry-run       # on CPU, tiny sizes, a few seconds: the suite runs it

Reports, for mobilenets' MobileNet 1.0 and ``timm.create_model("mobilenetv1_100")``:

- training images/s with bf16 autocast, channels_last and ``torch.compile`` (SGD, batch 256 at 224);
- loss parity with the CPU fp32 path over a few steps from the same weights and batches;
- inference images/s at batch 256 in fp16 and bf16;
- GPU JPEG decoding (``torchvision.io.decode_jpeg(device="cuda")``) feeding the model, against
  ``mobilenets.predict`` on the CPU: images/s and top-1 agreement;
- DDP with NCCL over two GPUs where the machine has them (2 processes, images/s).

Writes JSON (``--json``) and a Markdown table (``--md``).  ``--dry-run`` runs every part on CPU at
tiny sizes, in fp32 and without ``torch.compile`` (a CPU without bf16 units emulates it, minutes a
step; compiling takes minutes too), DDP over gloo, so the code cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mobilenets import mobilenet_v1  # noqa: E402
from mobilenets.images import INCEPTION, resize_size  # noqa: E402

FULL = dict(batch=256, resolution=224, train_steps=30, warmup=5, parity_steps=5, infer_steps=50, jpegs=512)
DRY = dict(batch=2, resolution=32, train_steps=1, warmup=0, parity_steps=2, infer_steps=1, jpegs=4)


def models(num_classes: int = 1000) -> dict:
    import timm

    torch.manual_seed(0)
    ours = mobilenet_v1(1.0, num_classes=num_classes)
    theirs = timm.create_model("mobilenetv1_100", num_classes=num_classes)
    return {"mobilenets": ours, "timm": theirs}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_s(step, batch: int, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def train_throughput(model, sizes, device, compile_: bool) -> float:
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile_ else model
    x = torch.randn(sizes["batch"], 3, sizes["resolution"], sizes["resolution"], device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (sizes["batch"],), device=device)

    def step():
        # bf16 autocast on the GPU; a dry run stays fp32 (this CPU emulates bf16 convolutions: minutes a step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return images_per_s(step, sizes["batch"], sizes["train_steps"], sizes["warmup"], device)


def loss_parity(model, sizes, device) -> dict:
    """The same start, batches and SGD steps on ``device`` (bf16 autocast) and on the CPU (fp32)."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(sizes["batch"], 3, sizes["resolution"], sizes["resolution"], generator=generator),
                torch.randint(0, 1000, (sizes["batch"],), generator=generator)) for _ in range(sizes["parity_steps"])]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = {}
    for label, where, autocast in (("cpu", "cpu", False), ("device", device.type, device.type == "cuda")):
        model.load_state_dict(state)
        torch.manual_seed(2)  # the same dropout masks on both sides (mobilenets' head has dropout)
        m = model.to(where).train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.01)
        run = []
        for x, y in batches:
            with torch.autocast(where, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(m(x.to(where)), y.to(where))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(float(loss.detach()))
        losses[label] = run
    model.load_state_dict(state)
    cpu, dev = np.array(losses["cpu"]), np.array(losses["device"])
    return {"cpu": losses["cpu"], "device": losses["device"],
            "max_relative_difference": float(np.max(np.abs(dev - cpu) / np.abs(cpu)))}


def inference_throughput(model, sizes, device, dtype) -> float | None:
    if device.type == "cpu" and dtype == torch.float16:
        return None  # fp16 convolutions are a GPU matter
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(sizes["batch"], 3, sizes["resolution"], sizes["resolution"], device=device)
    x = x.to(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            model(x)

    return images_per_s(step, sizes["batch"], sizes["infer_steps"], sizes["warmup"], device)


def jpeg_folder(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = 375 + (i % 7) * 10, 500 - (i % 5) * 10
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, ((xx + yy) * (i % 9)) % 256], -1)
        pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def gpu_decode_predict(model, sizes, device) -> dict:
    """JPEGs decoded by nvJPEG (torchvision) on the device, resized and cropped there, classified; against
    mobilenets.predict (CPU decoding) on the same files."""
    import torchvision

    from mobilenets.predict import predict

    resolution = sizes["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = jpeg_folder(Path(tmp), sizes["jpegs"])
        data = [torchvision.io.read_file(str(p)) for p in paths]
        model = model.to(device).eval()
        scale = torch.tensor([1 / (255 * s) for s in INCEPTION.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(INCEPTION.mean, INCEPTION.std)], device=device).view(1, 3, 1, 1)

        def classify() -> list[torch.Tensor]:
            logits = []
            for start in range(0, len(data), sizes["batch"]):
                decoded = torchvision.io.decode_jpeg(data[start:start + sizes["batch"]], device=device)
                crops = []
                for image in decoded:  # resize the shorter side to R / 0.875, centre crop, as eval_pixels does
                    h, w = image.shape[-2:]
                    short = resize_size(resolution)
                    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
                    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                            antialias=True, align_corners=False)
                    top, left = round((new_h - resolution) / 2), round((new_w - resolution) / 2)
                    crops.append(resized[..., top:top + resolution, left:left + resolution])
                x = torch.cat(crops).round_().clamp_(0, 255) * scale - shift
                with torch.inference_mode():
                    logits.append(model(x).float().cpu())
            return torch.cat(logits)

        classify()  # warm-up: nvJPEG's handles, cuDNN's algorithm choice
        sync(device)
        start = time.perf_counter()
        on_device = classify()
        sync(device)
        seconds = time.perf_counter() - start
        model.cpu()
        start = time.perf_counter()
        reference = [p.top[0]["class_index"] for p in predict(model, [Path(tmp)], topk=1, batch_size=sizes["batch"],
                                                              resolution=resolution, normalization=INCEPTION,
                                                              backend="eager", workers=0)]
        cpu_seconds = time.perf_counter() - start
        with torch.inference_mode():  # the CPU path's logits, for a comparison that random weights cannot blur
            from mobilenets.images import eval_transform, load_rgb

            cpu_logits = model(torch.stack([eval_transform(load_rgb(p), resolution, INCEPTION) for p in paths]))
    return {"images": len(data), "device_images_per_s": len(data) / seconds,
            "predict_cpu_images_per_s": len(data) / cpu_seconds,
            "top1_agreement": float(np.mean(on_device.argmax(1).numpy() == np.array(reference))),
            "logits_cosine_min": float(F.cosine_similarity(on_device, cpu_logits, dim=1).min())}


def _ddp_worker(rank: int, world: int, backend: str, sizes: dict, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    model = torch.nn.parallel.DistributedDataParallel(
        mobilenet_v1(1.0).to(device).to(memory_format=torch.channels_last),
        device_ids=[rank] if backend == "nccl" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(sizes["batch"], 3, sizes["resolution"], sizes["resolution"], device=device)
    y = torch.randint(0, 1000, (sizes["batch"],), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rate = images_per_s(step, sizes["batch"], sizes["train_steps"], sizes["warmup"], device)
    if rank == 0:
        results.put(rate * world)
    torch.distributed.destroy_process_group()


def ddp(sizes, dry_run: bool) -> dict:
    """Two processes: NCCL on two GPUs; gloo on the CPU in a dry run (the code path, not the figure)."""
    gpus = torch.cuda.device_count()
    if not dry_run and gpus < 2:
        return {"skipped": f"{gpus} GPU(s): DDP with NCCL needs two"}
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    backend = "gloo" if dry_run else "nccl"
    mp.start_processes(_ddp_worker, args=(2, backend, sizes, port, results), nprocs=2, start_method="spawn")
    return {"backend": backend, "processes": 2, "train_images_per_s": results.get()}


def machine() -> dict:
    from mobilenets.deploy import cpu_name

    info = {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no torch.compile: checks the code")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--md", type=Path, help="write a Markdown summary here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to check the code on the CPU")
    sizes = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "dry_run": args.dry_run, "machine": machine(), "sizes": sizes, "models": {}}
    started = time.perf_counter()
    built = models()
    for name, model in built.items():
        entry = {"train_images_per_s": train_throughput(model, sizes, device, compile_=not args.dry_run),
                 "loss_parity": loss_parity(model, sizes, device)}
        for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            entry[f"infer_{label}_images_per_s"] = inference_throughput(model, sizes, device, dtype)
        report["models"][name] = entry
    report["gpu_jpeg_decoding"] = gpu_decode_predict(built["mobilenets"], sizes, device)
    report["ddp"] = ddp(sizes, args.dry_run)
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    if args.md:
        args.md.write_text(markdown(report))
    print(text)
    return report


def markdown(report: dict) -> str:
    def figure(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [f"# GPU check{' (dry run on CPU: figures mean nothing)' if report['dry_run'] else ''}", "",
             f"    {report['command']}", "", f"Machine: {json.dumps(report['machine'])}", "",
             "| model | train img/s (bf16, channels_last, compile) | infer fp16 | infer bf16 | loss parity (max rel) |",
             "|---|---:|---:|---:|---:|"]
    for name, e in report["models"].items():
        lines.append(f"| {name} | {figure(e['train_images_per_s'])} | {figure(e['infer_fp16_images_per_s'])} | "
                     f"{figure(e['infer_bf16_images_per_s'])} | {e['loss_parity']['max_relative_difference']:.2e} |")
    j = report["gpu_jpeg_decoding"]
    lines += ["", f"GPU JPEG decoding feeding the model: {j['device_images_per_s']:.1f} img/s against predict on "
                  f"the CPU {j['predict_cpu_images_per_s']:.1f}; top-1 agreement {j['top1_agreement']:.3f}, "
                  f"least logits cosine {j['logits_cosine_min']:.5f} "
                  f"over {j['images']} images.", "", f"DDP: {json.dumps(report['ddp'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
