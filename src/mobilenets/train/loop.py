"""The training loop: :func:`setup` builds a :class:`TrainState`, :func:`train_one_epoch` and
:func:`end_epoch` advance it, :func:`save_last` writes it.

Every random draw of a run is a function of its seed: the model
initialisation, each epoch's order (seed, epoch), each image's crop and flip
(seed, epoch, image) and dropout (the torch RNG, saved in the checkpoint).  A
resumed run therefore computes the same numbers as an uninterrupted one.
Under DDP every rank runs these functions on its share of each epoch and rank
0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, cores, data
from ..errors import MobilenetsError
from ..evaluate import evaluate
from ..images import INCEPTION
from ..metadata import Metadata
from ..model import MobileNetV1, MobileNetV1Config
from .config import TrainConfig
from .console import Interrupted, Progress, StopRequest
from .distributed import Dist
from . import resources
from .optim import ModelEMA, Schedule, make_optimizer
from .rundir import BEST, LAST, write_metrics


class NonFiniteLoss(MobilenetsError):
    """The loss became NaN or infinite: the run diverged and every later step would be wasted."""


class SkipReporter:
    """Warns once per undecodable file and remembers them all (for the metrics and the final count)."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, skipped) -> None:
        for s in skipped:
            if s.path not in self.seen:
                self.seen.add(s.path)
                warnings.warn(f"skipping an undecodable file: {s.error}", stacklevel=2)

    def everywhere(self, dist: Dist) -> set:
        """The files every rank has met so far: ranks see different shards, so their sets differ."""
        return set().union(*map(set, dist.gather(sorted(self.seen))))


@dataclass
class TrainState:
    """Everything a run holds between steps; ``epoch``/``step``/``partial``/``history`` are what resumes."""

    config: TrainConfig
    dist: Dist
    device: torch.device
    out: Path
    model: nn.Module  # the bare model (what is saved and evaluated)
    train_model: nn.Module  # the model under DDP, or the bare one
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    ema: ModelEMA | None
    criterion: nn.Module
    train_set: torch.utils.data.Dataset
    val_loader: torch.utils.data.DataLoader
    meta: Metadata
    steps_per_epoch: int
    progress: Progress
    resources: resources.Resources
    skips: SkipReporter = field(default_factory=SkipReporter)
    epoch: int = 0
    step: int = 0
    partial: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, images so far this epoch
    history: list = field(default_factory=list)
    best_top1: float = -1.0


def log(dist: Dist, message: str) -> None:
    if dist.main:
        print(message, file=sys.stderr, flush=True)


def build_model(c: TrainConfig, labels: list[str], source, dist: Dist) -> MobileNetV1:
    """A fresh model, or the ``finetune`` weights with a new head when the classes differ (and say so)."""
    if source is None:
        return MobileNetV1(MobileNetV1Config(alpha=c.alpha, num_classes=len(labels)))
    if source.config.num_classes == len(labels) and source.meta.labels == tuple(labels):
        log(dist, f"fine-tuning {c.finetune}: same {len(labels)} classes, every layer kept")
        return source.model().train()
    model = MobileNetV1(dataclasses.replace(source.config, num_classes=len(labels)))
    body = {k: v for k, v in source.state_dict.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or not all(k.startswith("classifier.") for k in missing):
        raise checkpoint.CheckpointError(f"weights in {c.finetune} do not fit a MobileNet body: missing "
                                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    head = ", ".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items() if k.startswith("classifier."))
    log(dist, f"fine-tuning {c.finetune}: replaced the classifier ({source.config.num_classes} classes -> "
              f"{len(labels)}), newly initialised: {head}; every other layer loaded from the file")
    return model


def setup(c: TrainConfig, dist: Dist, device: torch.device, resume: Path | None, notes: tuple[str, ...] = ()) -> TrainState:
    """Load or create everything; with ``resume``, continue from that ``last.pt`` exactly."""
    out = Path(c.out)
    state = checkpoint.load(resume, training=True) if resume is not None else None
    if state is None and (out / LAST).exists():
        raise MobilenetsError(f"{out} already holds a run ({LAST}); continue it with resume=True "
                              f"(mobilenets train --resume), or choose another out folder")
    if dist.main:
        checkpoint.remove_stale_temporaries(out)  # only the lock holder gets here, so no writer is live

    # data first: every layout problem is reported before a model is built
    hflip = c.hflip if c.hflip is not None else (0.0 if c.data is None else 0.5)
    normalization, source = INCEPTION, None
    if state is not None:
        normalization = Metadata.from_dict(state["meta"], str(resume)).normalization
    elif c.finetune is not None:
        from .. import weights  # a converted .safetensors file or a mobilenets checkpoint

        source = weights.read(c.finetune)  # a feature extractor (num_classes 0) gets a head too
        # the normalisation belongs to the weights being fine-tuned, and so does the width
        normalization = source.meta.normalization
        c = dataclasses.replace(c, alpha=float(source.config.alpha))
    min_scale = c.min_scale if c.min_scale is not None else data.default_min_scale(c.alpha)
    train_set, val_set = data.splits(
        c.data, c.resolution,
        train_transform=data.TrainTransform(c.resolution, min_scale, hflip, normalization),
        eval_transform=data.EvalTransform(c.resolution, normalization))
    labels = train_set.classes
    chosen = choose_resources(c, train_set, len(labels), device, dist)
    torch.set_num_threads(chosen.threads)
    for note in notes:
        log(dist, note)
    log(dist, f"using {chosen.reason}")
    torch.manual_seed(c.seed)  # identical initialisation on every rank
    if state is not None:
        model = MobileNetV1(MobileNetV1Config.from_dict(state["config"]))
    else:
        model = build_model(c, labels, source, dist)

    per_rank = len(train_set) // dist.world_size + (len(train_set) % dist.world_size > 0)
    steps_per_epoch = per_rank // c.batch_size
    if steps_per_epoch == 0:
        raise MobilenetsError(f"the training set has {len(train_set)} images, fewer than one batch of "
                              f"{c.batch_size} per process; lower batch_size")
    model.to(device)
    if c.channels_last:
        model.to(memory_format=torch.channels_last)
    if c.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, c)
    ema = ModelEMA(model, c.model_ema_decay) if c.model_ema else None
    meta = Metadata(resolution=c.resolution, normalization=normalization, labels=labels,
                    source=f"mobilenets train --recipe {c.recipe} on {c.data or data.BUILTIN}"
                    + (f", fine-tuned from {c.finetune}" if c.finetune else ""))
    model.meta = meta  # the model knows what it is being trained for (evaluate and export read it)
    train_model = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    s = TrainState(
        config=c, dist=dist, device=device, out=out, model=model, train_model=train_model, optimizer=optimizer,
        schedule=Schedule(c, steps_per_epoch, c.epochs), ema=ema,
        criterion=nn.CrossEntropyLoss(label_smoothing=c.label_smoothing), train_set=train_set,
        val_loader=data.loader(val_set, data.ShardSampler(len(val_set), dist.rank, dist.world_size),
                               c.batch_size, chosen.num_workers, pin_memory=device.type == "cuda"),
        meta=meta, steps_per_epoch=steps_per_epoch, resources=chosen,
        progress=Progress(c.progress and dist.main, c.batch_size * dist.world_size))
    if state is None:
        torch.manual_seed(c.seed + 7919 * dist.rank)  # dropout differs per rank
        # a first last.pt before any work: a kill during the first epoch (even while writing its
        # checkpoint) leaves a run that resumes from the start instead of a folder that cannot resume
        save_last(s)
        return s
    checkpoint.load_state_dict(model, state["state_dict"], path=resume)
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    s.epoch, s.step = int(state["epoch"]), int(state["step"])
    s.history = [dict(row) for row in state["history"]]
    s.best_top1 = float(state["best_top1"])
    s.partial = list(state.get("partial") or s.partial)
    rng = state["rng"]
    if len(rng) == dist.world_size:
        torch.set_rng_state(rng[dist.rank])
    else:
        warnings.warn(f"the run was saved with {len(rng)} processes and resumes with {dist.world_size}: "
                      f"dropout draws will differ from an uninterrupted run")
        torch.manual_seed(c.seed + 7919 * dist.rank + 104729 * s.epoch)
    if dist.main:
        write_metrics(out, s.history)  # drop lines past the checkpoint, e.g. after a kill between the two writes
    return s


def choose_resources(c: TrainConfig, train_set, num_classes: int, device: torch.device,
                     dist: Dist) -> resources.Resources:
    """Threads and loader processes: ``c.threads``/``c.num_workers`` where given, else chosen for this run."""
    from ..cost import cost

    # on a GPU the model costs the CPU little: the cores go to the loader
    mult_adds = cost(c.alpha, c.resolution, num_classes=num_classes).mult_adds if device.type == "cpu" else 0
    decided = c.num_workers is not None and c.threads is not None
    return resources.choose(
        cores=resources.cores(), in_memory=train_set.in_memory, mult_adds=mult_adds, batch_size=c.batch_size,
        loader_seconds=0.0 if decided else resources.probe_loader(train_set), passive=cores.omp_passive(),
        images=len(train_set) // dist.world_size, threads=c.threads, num_workers=c.num_workers,
        # the other ranks of this machine start alongside and would count as busy: one process only
        busy=cores.busy_cores() if c.threads is None and dist.world_size == 1 and mult_adds else 0.0)


def save_last(s: TrainState) -> Path:
    """Write the whole state to ``last.pt`` (rank 0; every rank contributes its RNG state)."""
    rng = s.dist.gather(torch.get_rng_state())
    if s.dist.main:
        c = s.config
        checkpoint.save(checkpoint.training_checkpoint(
            s.model.config.to_dict(), s.model.state_dict(), s.meta.to_dict(), train_config=c.to_dict(),
            optimizer=s.optimizer.state_dict(),
            scheduler={"name": c.lr_scheduler, "step": s.epoch * s.steps_per_epoch + s.step,
                       "steps_per_epoch": s.steps_per_epoch},
            ema=s.ema.state_dict() if s.ema is not None else None, epoch=s.epoch, step=s.step, partial=s.partial,
            rng=rng, history=s.history, best_top1=s.best_top1), s.out / LAST)
    return s.out / LAST


def stop_now(stop: StopRequest, s: TrainState) -> bool:
    """True when a stop was asked for; under DDP, when any rank was asked (all stop at the same step)."""
    signum = s.dist.max_int(stop.signal or 0, s.device)
    if signum and stop.signal is None:
        stop.signal = signum
    return bool(signum)


class InputMeter:
    """What bounds a run: the wall time spent waiting for batches, and the loader's CPU time per image.

    With workers the loader runs beside the model, so its own rate
    (images per CPU second, i.e. per core) tells how fast it could feed the
    model, while the waiting time tells whether it did.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.wait = 0.0
        self.cpu = 0.0
        self.images = 0
        self._start = 0.0

    @contextlib.contextmanager
    def waiting(self):
        start = time.perf_counter()
        yield
        self.wait += time.perf_counter() - start

    def loaded(self, batch) -> None:
        if batch[0] is not None:
            self.images += len(batch[0])
        self.cpu += getattr(batch, "seconds", 0.0)  # pinned (CUDA) batches arrive as plain lists

    def per_core(self) -> float:
        return self.images / self.cpu if self.cpu > 0 else 0.0

    def describe(self, elapsed: float) -> str:
        if not self.images or elapsed <= 0:
            return ""
        model = self.images / max(elapsed - self.wait, 1e-9)
        return (f"(model {model:.0f} img/s; loader {self.per_core():.0f} img/s per core x "
                f"{max(self.workers, 1)}, waited {100 * self.wait / elapsed:.0f}%)")

    def sums(self) -> dict:
        return {"wait": self.wait, "loader_cpu": self.cpu, "loaded": self.images}


def train_one_epoch(s: TrainState, stop: StopRequest) -> dict:
    """Train ``s.epoch`` from ``s.step`` on; returns this rank's sums. Saves and raises Interrupted on a signal."""
    c, dist, device = s.config, s.dist, s.device
    s.train_model.train()
    sampler = data.EpochSampler(len(s.train_set), seed=c.seed, epoch=s.epoch, rank=dist.rank,
                                world_size=dist.world_size, start=s.step * c.batch_size)
    workers = s.resources.num_workers
    loader = data.loader(s.train_set, sampler, c.batch_size, workers, pin_memory=device.type == "cuda",
                         drop_last=True)
    loss_sum = torch.tensor(s.partial[0], dtype=torch.float64)
    correct = torch.tensor(s.partial[1], dtype=torch.float64)
    seen, images, t0 = int(s.partial[2]), 0, time.perf_counter()
    meter = InputMeter(workers)
    batches = iter(loader)
    while True:
        with meter.waiting():
            batch = next(batches, None)
        if batch is None:
            break
        meter.loaded(batch)
        x, y, skipped = batch
        s.skips(skipped)
        usable = x is not None and len(x) >= 2  # BatchNorm needs two samples to normalise by
        # DDP's backward is collective: all ranks step or none does, else a rank whose batch had
        # nothing decodable would leave the others waiting for its gradients forever
        if dist.enabled:
            usable = not dist.any(not usable, device)
        if usable:
            lr = s.schedule.lr(s.epoch * s.steps_per_epoch + s.step)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp):
                logits = s.train_model(x)
                loss = s.criterion(logits, y)
            if dist.any(not bool(torch.isfinite(loss.detach())), device):
                raise NonFiniteLoss(
                    f"the training loss became {loss.item()} at epoch {s.epoch + 1} step {s.step + 1} (lr {lr:.3g}): "
                    f"the run diverged; lower lr or weight_decay (or fix the data). {s.out / LAST} holds the "
                    f"last good state")
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            s.optimizer.step()
            if s.ema is not None:
                s.ema.update(s.model)
            loss_sum += loss.detach().double().cpu() * len(y)
            correct += (logits.detach().argmax(1) == y).sum().cpu().double()
            seen += len(y)
            images += len(y)
        s.step += 1
        elapsed = time.perf_counter() - t0
        rate = images * dist.world_size / elapsed if elapsed > 0 else 0.0
        s.progress.update(s.epoch + 1, c.epochs, s.step, s.steps_per_epoch, loss_sum.item() / max(seen, 1), rate,
                          meter.describe(elapsed))
        if stop_now(stop, s):
            s.partial = [loss_sum.item(), correct.item(), seen]
            raise Interrupted(stop.signal or signal.SIGTERM, save_last(s))
    elapsed = time.perf_counter() - t0
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen, "images": images,
            "time": elapsed, **meter.sums()}


def input_metrics(s: TrainState, sums: dict) -> dict:
    """This rank's split of the epoch between waiting for input and computing, and the loader's own rate."""
    time_s, wait = sums["time"], sums.get("wait", 0.0)
    return {
        "threads": s.resources.threads, "num_workers": s.resources.num_workers,
        "loader_images_per_core_s": sums["loaded"] / sums["loader_cpu"] if sums.get("loader_cpu") else 0.0,
        "input_wait_fraction": wait / time_s if time_s > 0 else 0.0,
        "model_images_per_s": sums["images"] / (time_s - wait) if time_s > wait else 0.0,
    }


def end_epoch(s: TrainState, sums: dict) -> dict:
    """Validate, keep the best weights, checkpoint, append the metrics row; returns the row."""
    c, dist, device = s.config, s.dist, s.device
    # Each rank's BN statistics (and so its EMA's) drifted with its own batches, while rank 0's alone are
    # saved: evaluate rank 0's, so the metrics describe the saved weights and a resumed run matches
    dist.broadcast_from_main(list(s.model.buffers()))
    if s.ema is not None:
        dist.broadcast_from_main(list(s.ema.module.state_dict().values()))
    loss_total, correct_total, seen_total, images_total = dist.all_sum(
        [sums["loss_sum"], sums["correct"], float(sums["seen"]), float(sums["images"])], device)
    val = evaluate(s.model, s.val_loader, device=device, amp=c.amp, channels_last=c.channels_last, dist=dist,
                   on_skip=s.skips)
    row = {
        "epoch": s.epoch + 1, "epochs": c.epochs,
        "train_loss": loss_total / max(seen_total, 1), "train_top1": 100 * correct_total / max(seen_total, 1),
        "val_loss": val["loss"], "val_top1": val["top1"], "val_images": val["images"],
        # with five classes or fewer top-5 is always 100%: not recorded, printed or plotted
        **({"val_top5": val["top5"]} if s.model.config.num_classes > 5 else {}),
        "lr": s.schedule.lr((s.epoch + 1) * s.steps_per_epoch - 1),
        "images_per_s": images_total / sums["time"] if sums["time"] > 0 else 0.0,
        "epoch_time_s": sums["time"], "skipped_files": len(s.skips.everywhere(dist)),
        **input_metrics(s, sums),
    }
    weights, top1 = s.model, val["top1"]
    if s.ema is not None:
        ema_val = evaluate(s.ema.module, s.val_loader, device=device, amp=c.amp, channels_last=c.channels_last,
                           dist=dist, on_skip=s.skips)
        row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"],
                   **({"ema_val_top5": ema_val["top5"]} if "val_top5" in row else {}))
        if ema_val["top1"] >= top1:
            weights, top1 = s.ema.module, ema_val["top1"]
    s.history.append(row)
    if top1 > s.best_top1 and math.isfinite(top1):
        s.best_top1 = top1
        if dist.main:
            checkpoint.save(checkpoint.model_checkpoint(
                s.model.config.to_dict(), weights.state_dict(),
                {**s.meta.to_dict(), "weights": "ema" if weights is not s.model else "model"},
                epoch=s.epoch + 1, metrics=row), s.out / BEST)
    s.epoch, s.step, s.partial = s.epoch + 1, 0, [0.0, 0.0, 0.0]
    save_last(s)
    if dist.main:
        write_metrics(s.out, s.history)
    s.progress.end_epoch(row)
    return row


def run(s: TrainState) -> dict:
    """Train every remaining epoch; returns the last metrics row (the stored one if none remain)."""
    row = s.history[-1] if s.history else {}
    s.progress.start()
    try:
        with StopRequest() as stop:
            while s.epoch < s.config.epochs:
                row = end_epoch(s, train_one_epoch(s, stop))
                if stop_now(stop, s):
                    raise Interrupted(stop.signal or signal.SIGTERM, s.out / LAST)
    finally:
        s.progress.close()
    return row
