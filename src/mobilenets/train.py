"""Training and fine-tuning: the recipes, the loop, checkpoints, resumption, distributed data parallel.

One run lives in one folder (``RUN_DIR``)::

    metrics.jsonl   one JSON object per finished epoch
    last.pt         the full training state, rewritten atomically after every epoch
                    (and on Ctrl-C / SIGTERM, mid-epoch)
    best.pt         the weights with the best val top-1 so far (model only)
    loss.png, accuracy.png   the curves, written at the end and by ``mobilenets plot``

Both checkpoints are in the format of ``checkpoint.py``; ``last.pt`` adds the
optimizer, schedule, EMA, epoch, step and RNG state, so ``--resume`` continues
exactly where the run stopped.  Every random draw of a run is a function of its
seed: the model initialisation, each epoch's order (seed, epoch), each image's
crop and flip (seed, epoch, image) and dropout (the torch RNG, saved in the
checkpoint).  A resumed run therefore computes the same numbers as an
uninterrupted one.

Under ``torchrun`` the run is distributed (gloo on CPU, NCCL on CUDA); every
rank trains on its share of each epoch and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, data
from .images import INCEPTION, Normalization
from .model import MobileNetV1, MobileNetV1Config

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"

# ---------------------------------------------------------------- recipes

# Named presets; any flag given on the command line overrides its value.
RECIPES: dict[str, dict] = {
    # The paper and TF-slim's train_image_classifier.py: RMSprop as TensorFlow implements it, lr 0.045 at
    # batch 64 decayed x0.94 every 2.5 epochs (staircase), L2 weight decay 4e-5 except on depthwise filters
    # and BN, no label smoothing, no EMA.  The epoch count was never published; 90 is torchvision's default.
    "paper": dict(
        epochs=90, batch_size=64, opt="rmsprop_tf", lr=0.045, momentum=0.9, rmsprop_decay=0.9, rmsprop_eps=1.0,
        weight_decay=4e-5, lr_scheduler="exponential", lr_step_size=2.5, lr_gamma=0.94, lr_warmup_epochs=0.0,
        lr_min=0.0, label_smoothing=0.0, model_ema=False, model_ema_decay=0.9999,
    ),
    # A current recipe for small convnets: AdamW, linear warmup then cosine to zero, label smoothing 0.1,
    # an EMA of the weights (evaluated beside the raw weights), weight decay 0.05 except on depthwise and BN.
    "modern": dict(
        epochs=300, batch_size=64, opt="adamw", lr=2e-3, momentum=0.9, rmsprop_decay=0.9, rmsprop_eps=1.0,
        weight_decay=0.05, lr_scheduler="cosine", lr_step_size=2.5, lr_gamma=0.94, lr_warmup_epochs=5.0,
        lr_min=0.0, label_smoothing=0.1, model_ema=True, model_ema_decay=0.9998,
    ),
}
OPTIMIZERS = ("rmsprop_tf", "sgd", "adamw")
SCHEDULERS = ("exponential", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in ``last.pt`` so ``--resume`` needs only the folder."""

    out: str = "runs/mobilenet"
    data: str | None = None  # None: the built-in digits
    recipe: str = "paper"
    alpha: float = 1.0
    resolution: int = 224
    epochs: int = 90
    batch_size: int = 64  # per process, as in torchvision's reference scripts
    opt: str = "rmsprop_tf"
    lr: float = 0.045
    momentum: float = 0.9
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1.0
    weight_decay: float = 4e-5
    lr_scheduler: str = "exponential"
    lr_step_size: float = 2.5
    lr_gamma: float = 0.94
    lr_warmup_epochs: float = 0.0
    lr_min: float = 0.0
    label_smoothing: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    min_scale: float | None = None  # None: data.default_min_scale(alpha)
    hflip: float | None = None  # None: 0.5, or 0 on the digits (a mirrored digit is not a digit)
    seed: int = 0
    num_workers: int = 2
    amp: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    finetune: str | None = None
    device: str | None = None
    threads: int | None = None  # CPU intra-op threads; None: torch's default (all cores)
    progress: bool = True
    plot: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_config(recipe: str = "paper", **overrides) -> TrainConfig:
    """The recipe's values, overridden by every option that is not None; checked before anything runs."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}, "recipe": recipe}
    config = TrainConfig(**values)
    check_config(config)
    return config


def check_config(c: TrainConfig) -> None:
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}")
    need(c.batch_size >= 2, f"--batch-size must be >= 2 (BatchNorm needs two images per batch), got {c.batch_size}")
    need(c.lr > 0 and math.isfinite(c.lr), f"--lr must be > 0, got {c.lr}")
    need(c.opt in OPTIMIZERS, f"--opt must be one of {OPTIMIZERS}, got {c.opt!r}")
    need(c.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {SCHEDULERS}, got {c.lr_scheduler!r}")
    need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}")
    need(0 <= c.rmsprop_decay < 1, f"--rmsprop-decay must be in [0, 1), got {c.rmsprop_decay}")
    need(c.rmsprop_eps > 0, f"--rmsprop-eps must be > 0, got {c.rmsprop_eps}")
    need(c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}")
    need(c.lr_step_size > 0, f"--lr-step-size must be > 0 epochs, got {c.lr_step_size}")
    need(0 < c.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {c.lr_gamma}")
    need(c.lr_warmup_epochs >= 0, f"--lr-warmup-epochs must be >= 0, got {c.lr_warmup_epochs}")
    need(0 <= c.lr_min < c.lr, f"--lr-min must be in [0, lr), got {c.lr_min}")
    need(0 <= c.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {c.label_smoothing}")
    need(0 < c.model_ema_decay < 1, f"--model-ema-decay must be in (0, 1), got {c.model_ema_decay}")
    need(c.num_workers >= 0, f"--num-workers must be >= 0, got {c.num_workers}")
    need(c.threads is None or c.threads >= 1, f"--threads must be >= 1, got {c.threads}")
    need(c.min_scale is None or 0 < c.min_scale <= 1, f"--min-scale must be in (0, 1], got {c.min_scale}")
    need(c.hflip is None or 0 <= c.hflip <= 1, f"--hflip must be a probability in [0, 1], got {c.hflip}")
    need(c.resolution >= 32, f"--resolution must be >= 32, got {c.resolution}")


# ---------------------------------------------------------------- optimizer


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop exactly as TensorFlow 1's ``tf.train.RMSPropOptimizer`` (the optimizer of TF-slim and the paper).

    Per parameter, with gradient g (plus ``weight_decay * w``, TF-slim's L2 loss term)::

        ms  <- decay * ms + (1 - decay) * g^2          ms starts at 1, not 0
        mom <- momentum * mom + lr * g / sqrt(ms + eps)   eps inside the root; lr inside the buffer
        w   <- w - mom

    PyTorch's ``torch.optim.RMSprop`` differs in all three marked places (ms
    starts at 0, eps outside the root, lr applied after the buffer); with
    TF-slim's eps = 1.0 these change the step size by orders of magnitude.
    """

    def __init__(self, params, lr: float, decay: float = 0.9, momentum: float = 0.9, eps: float = 1.0,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            square_avgs = [self.state[p]["square_avg"] for p in params]
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(square_avgs, group["decay"])
            torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - group["decay"])
            denominators = torch._foreach_add(square_avgs, group["eps"])
            torch._foreach_sqrt_(denominators)
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_addcdiv_(buffers, grads, denominators, value=group["lr"])
            torch._foreach_sub_(params, buffers)
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on standard and pointwise conv weights and the classifier weight only.

    The paper: "it was important to put very little or no weight decay (l2
    regularization) on the depthwise filters since there are so few
    parameters in them"; TF-slim also leaves BN parameters and biases alone.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)) and not is_depthwise:
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, c.weight_decay)
    if c.opt == "rmsprop_tf":
        return RMSpropTF(groups, lr=c.lr, decay=c.rmsprop_decay, momentum=c.momentum, eps=c.rmsprop_eps)
    if c.opt == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0)
    return torch.optim.AdamW(groups, lr=c.lr)


@dataclass
class Schedule:
    """The learning rate at every step: optional linear warmup, then staircase exponential decay or cosine."""

    config: TrainConfig
    steps_per_epoch: int
    epochs: int

    def factor(self, step: int) -> float:
        c = self.config
        epoch = step / self.steps_per_epoch
        warmup = min(c.lr_warmup_epochs, 0.1 * self.epochs)  # never more than a tenth of a short run
        if epoch < warmup:
            return 0.01 + 0.99 * epoch / warmup
        if c.lr_scheduler == "exponential":
            return c.lr_gamma ** math.floor((epoch - warmup) / c.lr_step_size)  # TF-slim: staircase=True
        if c.lr_scheduler == "cosine":
            progress = min(1.0, (epoch - warmup) / max(self.epochs - warmup, 1e-9))
            low = c.lr_min / c.lr
            return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def lr(self, step: int) -> float:
        return self.config.lr * self.factor(step)


# ---------------------------------------------------------------- EMA


class ModelEMA:
    """An exponential moving average of the weights and BN statistics, updated after every step.

    As TF's ExponentialMovingAverage with ``num_updates`` (TF-slim's
    --moving_average_decay): the decay at update t is min(decay, (1 + t) / (10 + t)),
    so the average follows quickly early on and short runs still get a useful one.
    """

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        own = self.module.state_dict()
        new = model.state_dict()
        floats = [k for k, v in own.items() if v.is_floating_point()]
        torch._foreach_lerp_([own[k] for k in floats], [new[k].detach() for k in floats], 1 - d)
        for k, v in own.items():
            if not v.is_floating_point():
                v.copy_(new[k])

    def state_dict(self) -> dict:
        return {"state_dict": _contiguous(self.module.state_dict()), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])


def _contiguous(state_dict: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state_dict.items()}


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device_name: str | None) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; NCCL with one GPU per process on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


# ---------------------------------------------------------------- progress


class Progress:
    """One status line on stderr: epoch, step, loss, images/s and ETA.

    On a terminal the line is rewritten in place; in a log file it is printed
    about ten times an epoch so logs stay short.
    """

    def __init__(self, enabled: bool, batch: int, stream=None):
        self.batch = batch  # images per step, all ranks together
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_tenth = -1

    def update(self, epoch: int, epochs: int, step: int, steps: int, loss: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        tenth = 10 * step // max(steps, 1)
        if not self.tty and (tenth == self.last_tenth or step == steps):
            return
        self.last_tenth = tenth
        eta = (steps - step) * self.batch / images_per_s if images_per_s else 0.0
        width = 24
        filled = width * step // max(steps, 1)
        line = (f"epoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {step}/{steps} "
                f"loss {loss:.4f} {images_per_s:.1f} img/s eta {_duration(eta)}")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def end_epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        parts = [f"epoch {row['epoch']}/{row['epochs']}", f"train loss {row['train_loss']:.4f}",
                 f"val top-1 {row['val_top1']:.2f}%", f"top-5 {row['val_top5']:.2f}%"]
        if "ema_val_top1" in row:
            parts.append(f"EMA top-1 {row['ema_val_top1']:.2f}%")
        parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.1f} img/s", f"{row['epoch_time_s']:.1f} s"]
        self.stream.write("  ".join(parts) + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- signals


class StopRequest:
    """Ctrl-C and SIGTERM set a flag; the loop finishes the current step, saves, and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    def __init__(self, signum: int, path: Path):
        self.signum, self.path = signum, path
        super().__init__(f"stopped by {signal.Signals(signum).name}; saved {path}")


# ---------------------------------------------------------------- the run


def _skip_reporter():
    seen: set[str] = set()

    def report(skipped) -> None:
        for s in skipped:
            if s.path not in seen:
                seen.add(s.path)
                warnings.warn(f"skipping an undecodable file: {s.error}", stacklevel=2)

    report.seen = seen
    return report


def _build_model(c: TrainConfig, labels: list[str], source=None) -> MobileNetV1:
    """A fresh model, or the --finetune weights' body with a new head when the classes differ."""
    if source is None:
        return MobileNetV1(MobileNetV1Config(alpha=c.alpha, num_classes=len(labels)))
    if source.config.num_classes == len(labels) and source.meta.get("labels") == labels:
        return source.model().train()  # same classes: keep the head too
    # new head for the new classes; every other tensor comes from the source
    model = MobileNetV1(dataclasses.replace(source.config, num_classes=len(labels)))
    body = {k: v for k, v in source.state_dict.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
    return model


def train(config: TrainConfig, *, resume: str | Path | bool | None = None) -> dict:
    """Run (or resume) training; returns the last metrics row.  Raises :class:`Interrupted` on Ctrl-C/SIGTERM."""
    if config.threads:
        torch.set_num_threads(config.threads)
    dist, device = init_distributed(config.device)
    try:
        return _train(config, dist, device, resume)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resume_config(path: str | Path, **overrides) -> tuple[TrainConfig, Path]:
    """The stored settings of a run (from RUN_DIR or its last.pt), with a few that may change on resume."""
    path = Path(path)
    file = path / LAST if path.is_dir() else path
    state = checkpoint.load(file)
    if "train_config" not in state:
        raise ValueError(f"{file} has no training state (is it a best.pt or a converted model?); "
                         f"resume from the run's {LAST}, or use --finetune to start from its weights")
    stored = state["train_config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in stored.items() if k in known})
    allowed = {"epochs", "num_workers", "device", "threads", "progress", "plot"}
    changed = {k: v for k, v in overrides.items() if v is not None and k in known and getattr(config, k) != v}
    refused = sorted(set(changed) - allowed)
    if refused:
        raise ValueError(f"--resume continues the stored run; these options differ from it and cannot change: "
                         f"{', '.join('--' + k.replace('_', '-') for k in refused)} "
                         f"(only {', '.join('--' + k.replace('_', '-') for k in sorted(allowed))} can)")
    config = dataclasses.replace(config, **changed)
    config.out = str(file.parent)
    check_config(config)
    return config, file


def _train(c: TrainConfig, dist: Dist, device: torch.device, resume) -> dict:
    out = Path(c.out)
    state = None
    if resume:
        state = checkpoint.load(out / LAST if resume is True else resume)
    elif (out / LAST).exists():
        raise ValueError(f"{out} already holds a run ({LAST}); continue it with --resume, or choose another --out")

    # data first: every layout problem is reported before a model is built
    hflip = c.hflip if c.hflip is not None else (0.0 if c.data is None else 0.5)
    normalization, source = INCEPTION, None
    if c.finetune is not None:
        from . import weights  # a converted .safetensors file or a mobilenets checkpoint

        source = weights.read(c.finetune)  # a feature extractor (num_classes 0, e.g. "_no_top") gets a head too
        # the normalisation belongs to the weights being fine-tuned, and so does the width
        normalization = Normalization.from_dict(source.meta.get("normalization") or INCEPTION.to_dict())
        c = dataclasses.replace(c, alpha=float(source.config.alpha))
    min_scale = c.min_scale if c.min_scale is not None else data.default_min_scale(c.alpha)
    train_set, val_set = data.splits(
        c.data, c.resolution,
        train_transform=data.TrainTransform(c.resolution, min_scale, hflip, normalization),
        eval_transform=data.EvalTransform(c.resolution, normalization))
    labels = train_set.classes
    torch.manual_seed(c.seed)  # identical initialisation on every rank
    model = _build_model(c, labels, source)

    steps_per_epoch = (len(train_set) // dist.world_size + (len(train_set) % dist.world_size > 0)) // c.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch of {c.batch_size} "
                         f"per process; lower --batch-size")

    if c.sync_bn and dist.enabled and device.type == "cpu":
        raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation; drop --sync-bn")
    model.to(device)
    if c.channels_last:
        model.to(memory_format=torch.channels_last)
    if c.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, c)
    schedule = Schedule(c, steps_per_epoch, c.epochs)
    ema = ModelEMA(model, c.model_ema_decay) if c.model_ema else None

    start_epoch, start_step, history, best_top1 = 0, 0, [], -1.0
    partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of the epoch in progress
    if state is not None:
        checkpoint.load_state_dict(_bare(model), state["state_dict"], path=out / LAST)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        history = [dict(row) for row in state["history"]]
        best_top1 = float(state["best_top1"])
        partial = list(state.get("partial") or partial)
        rng = state["rng"]
        if len(rng) == dist.world_size:
            torch.set_rng_state(rng[dist.rank])
        else:
            warnings.warn(f"the run was saved with {len(rng)} processes and resumes with {dist.world_size}: "
                          f"dropout draws will differ from an uninterrupted run")
            torch.manual_seed(c.seed + 7919 * dist.rank + 104729 * start_epoch)
        if dist.main:
            _write_metrics(out, history)  # drop lines past the checkpoint, e.g. after a kill between the two writes
    else:
        torch.manual_seed(c.seed + 7919 * dist.rank)  # dropout differs per rank

    train_model = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    meta = {
        "resolution": c.resolution,
        "normalization": normalization.to_dict(),
        "labels": list(labels),
        "source": f"mobilenets train --recipe {c.recipe} on {c.data or data.BUILTIN}"
                  + (f", fine-tuned from {c.finetune}" if c.finetune else ""),
    }
    criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
    report_skip = _skip_reporter()
    progress = Progress(c.progress and dist.main, c.batch_size * dist.world_size)
    pin = device.type == "cuda"
    val_loader = data.loader(val_set, data.ShardSampler(len(val_set), dist.rank, dist.world_size),
                             c.batch_size, c.num_workers, pin_memory=pin)
    from .evaluate import evaluate

    def save_last(epoch: int, step: int, partial_sums) -> Path:
        rng = [torch.get_rng_state()]
        if dist.enabled:
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        if not dist.main:
            return out / LAST
        obj = {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "config": _bare(model).config.to_dict(),
            "state_dict": _contiguous(_bare(model).state_dict()),
            "meta": meta,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"name": c.lr_scheduler, "step": epoch * steps_per_epoch + step,
                          "steps_per_epoch": steps_per_epoch},
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step": step, "partial": list(partial_sums),
            "rng": rng, "history": history, "best_top1": best_top1,
            "train_config": c.to_dict(),
        }
        return checkpoint.save(obj, out / LAST)

    row = history[-1] if history else {}
    with StopRequest() as stop:
        for epoch in range(start_epoch, c.epochs):
            train_model.train()
            sampler = data.EpochSampler(len(train_set), seed=c.seed, epoch=epoch, rank=dist.rank,
                                        world_size=dist.world_size, start=start_step * c.batch_size)
            train_loader = data.loader(train_set, sampler, c.batch_size, c.num_workers, pin_memory=pin, drop_last=True)
            loss_sum = torch.tensor(partial[0], dtype=torch.float64)
            correct = torch.tensor(partial[1], dtype=torch.float64)
            seen = int(partial[2])
            t0 = time.perf_counter()
            images_this_run = 0
            step = start_step
            for x, y, skipped in train_loader:
                report_skip(skipped)
                usable = x is not None and len(x) >= 2  # BatchNorm needs two samples to normalise by
                if dist.enabled:
                    # DDP's backward is collective: all ranks step or none does, else a rank whose batch had
                    # nothing decodable would leave the others waiting for its gradients forever
                    usable = dist.all_sum([0.0 if usable else 1.0], device)[0] == 0
                if usable:
                    global_step = epoch * steps_per_epoch + step
                    lr = schedule.lr(global_step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    if c.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp):
                        logits = train_model(x)
                        loss = criterion(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if ema is not None:
                        ema.update(model)
                    loss_sum += loss.detach().double().cpu() * len(y)
                    correct += (logits.detach().argmax(1) == y).sum().cpu().double()
                    seen += len(y)
                    images_this_run += len(y)
                step += 1
                elapsed = time.perf_counter() - t0
                rate = images_this_run * dist.world_size / elapsed if elapsed > 0 else 0.0
                progress.update(epoch + 1, c.epochs, step, steps_per_epoch, loss_sum.item() / max(seen, 1), rate)
                if _stop_now(stop, dist, device):
                    path = save_last(epoch, step, [loss_sum.item(), correct.item(), seen])
                    raise Interrupted(stop.signal or signal.SIGTERM, path)
            train_time = time.perf_counter() - t0
            start_step, partial = 0, [0.0, 0.0, 0.0]

            loss_total, correct_total, seen_total, images_total = dist.all_sum(
                [loss_sum.item(), correct.item(), float(seen), float(images_this_run)], device)
            val = evaluate(model, val_loader, device=device, amp=c.amp, channels_last=c.channels_last,
                           dist=dist, on_skip=report_skip)
            row = {
                "epoch": epoch + 1, "epochs": c.epochs,
                "train_loss": loss_total / max(seen_total, 1), "train_top1": 100 * correct_total / max(seen_total, 1),
                "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"], "val_images": val["images"],
                "lr": schedule.lr((epoch + 1) * steps_per_epoch - 1),
                "images_per_s": images_total / train_time if train_time > 0 else 0.0,
                "epoch_time_s": train_time, "skipped_files": len(_all_skipped(report_skip.seen, dist)),
            }
            weights, top1 = model, val["top1"]
            if ema is not None:
                ema_val = evaluate(ema.module, val_loader, device=device, amp=c.amp, channels_last=c.channels_last,
                                   dist=dist, on_skip=report_skip)
                row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
                if ema_val["top1"] >= top1:
                    weights, top1 = ema.module, ema_val["top1"]
            history.append(row)
            if top1 > best_top1:
                best_top1 = top1
                if dist.main:
                    checkpoint.save({
                        "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
                        "config": _bare(model).config.to_dict(),
                        "state_dict": _contiguous(_bare(weights).state_dict()),
                        "meta": {**meta, "weights": "ema" if weights is not model else "model"},
                        "epoch": epoch + 1, "metrics": row,
                    }, out / BEST)
            save_last(epoch + 1, 0, partial)
            if dist.main:
                _write_metrics(out, history)
            progress.end_epoch(row)
            if _stop_now(stop, dist, device):
                raise Interrupted(stop.signal or signal.SIGTERM, out / LAST)

    skipped = _all_skipped(report_skip.seen, dist)
    if dist.main:
        if skipped:
            print(f"skipped {len(skipped)} undecodable file(s) in total", file=sys.stderr)
        if c.plot and history:
            plot(out)
    dist.barrier()
    return row


def _all_skipped(seen: set, dist: Dist) -> set:
    """The undecodable files every rank has met so far: ranks see different shards, so their sets differ."""
    if not dist.enabled:
        return seen
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, sorted(seen))
    return set().union(*map(set, gathered))


def _bare(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _stop_now(stop: StopRequest, dist: Dist, device) -> bool:
    """True when a stop was asked for; under DDP, when any rank was asked (all stop at the same step)."""
    if not dist.enabled:
        return stop.signal is not None
    flag = torch.tensor([0.0 if stop.signal is None else float(stop.signal)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and stop.signal is None:
        stop.signal = int(flag.item())
    return bool(flag.item())


def _write_metrics(out: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    checkpoint.atomic_write(out / METRICS, lambda f: f.write(text.encode()))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a training run folder (mobilenets train --out)?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/loss.png (train and val loss) and RUN_DIR/accuracy.png (val top-1/top-5) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / METRICS} has no finished epochs yet")
    epochs = [r["epoch"] for r in rows]
    run_dir = Path(run_dir)
    charts = (  # file, y label, y limits, (label, metrics key, marker); EMA lines only when the run kept an EMA
        ("loss", "cross-entropy loss", None,
         (("train", "train_loss", "o"), ("val", "val_loss", "o"), ("val (EMA)", "ema_val_loss", "."))),
        ("accuracy", "accuracy (%)", (0, 100),
         (("train top-1", "train_top1", "o"), ("val top-1", "val_top1", "o"), ("val top-5", "val_top5", "o"),
          ("val top-1 (EMA)", "ema_val_top1", "."))),
    )
    written = []
    for name, ylabel, ylim, series in charts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, key, marker in series:
            if key in rows[-1]:
                ax.plot(epochs, [r.get(key) for r in rows], marker=marker, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{name}: {run_dir.name}")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(run_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
