"""What defines a training run: :class:`TrainConfig`, the recipes and the fine-tuning preset.

Each field of :class:`TrainConfig` carries its own help text, bounds and
command-line spelling (:func:`option`); the CLI's ``train`` flags and their
help are generated from these, and :func:`check_config` validates against the
same bounds, so a new option is written once.  The field defaults are the
paper's recipe; every other recipe lists only the fields it changes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import torch

from ..architecture import MAX_ALPHA, MAX_RESOLUTION, MIN_RESOLUTION
from ..data import MAX_WORKERS
from ..errors import MobilenetsError

MAX_THREADS = 1024  # torch.set_num_threads(10**8) crashes the process (SIGSEGV)
OPTIMIZERS = ("rmsprop_tf", "sgd", "adamw")
SCHEDULERS = ("exponential", "cosine", "constant")


# Named presets: only what differs from TrainConfig's defaults below (the paper's recipe).
RECIPES: dict[str, dict] = {
    # The paper and TF-slim: RMSprop as TensorFlow implements it, lr 0.045 at batch 64 decayed x0.94 every
    # 2.5 epochs (staircase), L2 4e-5 except on depthwise filters and BN, no label smoothing, no EMA.
    "paper": {},
    # A current recipe for small convnets: AdamW, linear warm-up then cosine to zero, label smoothing 0.1,
    # an EMA of the weights, weight decay 0.05 except on depthwise and BN.
    "modern": dict(epochs=300, opt="adamw", lr=2e-3, weight_decay=0.05, lr_scheduler="cosine", lr_warmup_epochs=5.0,
                   label_smoothing=0.1, model_ema=True, model_ema_decay=0.9998),
}


# The recipes state lr for this many images per step (TF-slim's MobileNet v1 runs; torchvision's and timm's
# recipes state theirs per 256 and scale it the same way): at batch 16 the paper's 0.045 swung held-out
# top-1 between 62% and 100% from seed to seed on a 4-class folder, a quarter of it did not.
LR_BATCH = 64


class ConfigError(MobilenetsError):
    """A training setting out of its range; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class Bound:
    """An interval a number must lie in; ``describe`` is what error messages and ``--help`` print."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        low, high = _text(self.low), _text(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'<' if self.high_open else '<='} {high}"


def _text(bound: float | None) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}" if bound is not None else ""


def option(default, help: str, *, flags: tuple[str, ...] | None = None, bound: Bound | None = None,
           choices: tuple | None = None, cli: str = "value", example: str = "", metavar: str | None = None):
    """A TrainConfig field with what the CLI and the checks need.

    ``cli``: "value" (a flag taking a value), "switch" (``--amp``), "toggle"
    (``--model-ema`` / ``--no-model-ema``), "negate" (``--no-progress`` sets
    False) or "none" (not a flag).  ``flags`` defaults to the field name with
    dashes.
    """
    return field(default=default, metadata=dict(help=help, flags=flags, bound=bound, choices=choices, cli=cli,
                                                 example=example, metavar=metavar))


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in ``last.pt`` so a resume needs only the folder.

    The defaults are the paper's recipe (TF-slim's train_image_classifier.py).
    """

    out: str = option("runs/mobilenet", "run folder (locked while a run uses it)", metavar="RUN_DIR")
    data: str | None = option(None, "DIR/train/<class>/* and DIR/val/<class>/*; default: built-in digits",
                              metavar="DIR")
    recipe: str = option("paper", "named preset; flags override it", choices=tuple(RECIPES))
    alpha: float = option(1.0, "width multiplier", bound=Bound(0, MAX_ALPHA, low_open=True),
                          example="1.0, 0.75, 0.5, 0.25")
    resolution: int = option(224, "input size in pixels", bound=Bound(MIN_RESOLUTION, MAX_RESOLUTION),
                             example="224, 192, 160, 128")
    # The epoch count was never published; 90 is torchvision's default.
    epochs: int = option(90, "epochs to train", bound=Bound(1))
    # Per process, as in torchvision's reference scripts; BatchNorm needs two images per batch.
    batch_size: int = option(64, "images per process per step", flags=("-b", "--batch-size"), bound=Bound(2))
    opt: str = option("rmsprop_tf", "optimizer (rmsprop_tf: RMSprop as TensorFlow 1 implements it)",
                      choices=OPTIMIZERS)
    lr: float = option(0.045, f"initial learning rate, used as given; not given: the recipe's, which is for "
                              f"{LR_BATCH} images per step, times batch-size/{LR_BATCH}", bound=Bound(0, low_open=True))
    momentum: float = option(0.9, "momentum (RMSprop, SGD)", bound=Bound(0, 1, high_open=True))
    rmsprop_decay: float = option(0.9, "RMSprop decay of the mean square (TF: 0.9)", bound=Bound(0, 1, high_open=True))
    rmsprop_eps: float = option(1.0, "RMSprop epsilon, inside the square root (TF-slim: 1.0)",
                                bound=Bound(0, low_open=True))
    weight_decay: float = option(4e-5, "L2 on conv/FC weights; never on depthwise, BN or bias",
                                 flags=("--wd", "--weight-decay"), bound=Bound(0))
    lr_scheduler: str = option("exponential", "learning-rate schedule after the warm-up", choices=SCHEDULERS)
    lr_step_size: float = option(2.5, "epochs between exponential decays (staircase)", bound=Bound(0, low_open=True))
    lr_gamma: float = option(0.94, "exponential decay factor", bound=Bound(0, 1, low_open=True))
    lr_warmup_epochs: float = option(0.0, "linear warm-up over its steps, n steps running lr/n, 2lr/n, ..., lr "
                                          "(from lr/100 at most; at most a tenth of the run)", bound=Bound(0))
    lr_min: float = option(0.0, "final lr of the cosine schedule", bound=Bound(0))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", bound=Bound(0, 1, high_open=True))
    model_ema: bool = option(False, "keep an EMA of the weights, evaluated beside them", cli="toggle")
    model_ema_decay: float = option(0.9999, "EMA decay (warmed up as TF's num_updates)",
                                    bound=Bound(0, 1, low_open=True, high_open=True))
    min_scale: float | None = option(None, "smallest training crop area; default by alpha",
                                     bound=Bound(0, 1, low_open=True))
    hflip: float | None = option(None, "horizontal flip probability; default 0.5, digits 0 (a mirrored digit is "
                                       "not a digit)", bound=Bound(0, 1))
    # PyTorch and NumPy take seeds of at most 64 and 32 bits; a larger one fails deep inside setup
    seed: int = option(0, "seed of every random draw of the run", bound=Bound(0, 2**32 - 1))
    num_workers: int | None = option(None, "data loading processes; default chosen from the cores, the model and "
                                           "the data (0 for the built-in digits)",
                                     flags=("-j", "--num-workers", "--workers"), bound=Bound(0, MAX_WORKERS))
    amp: bool = option(False, "bfloat16 autocast", cli="switch")
    channels_last: bool = option(False, "NHWC memory format", cli="switch")
    sync_bn: bool = option(False, "SyncBatchNorm across processes (GPUs only)", cli="switch")
    finetune: str | None = option(None, "start from these weights (a checkpoint, run folder file or .safetensors); "
                                        "new head if the classes differ; lr and warm-up from the fine-tuning preset "
                                        "unless given", metavar="CHECKPOINT")
    device: str | None = option(None, "cpu, cuda or cuda:N; default cuda when available")
    threads: int | None = option(None, "CPU threads per process; default chosen from the cores, the model and the "
                                       "loader processes (1 for small models)", bound=Bound(1, MAX_THREADS))
    qat: int | None = option(None, "after training, write int8.safetensors: int8-ready weights (mobilenets.quantize) "
                                   "fine-tuned for N steps with fake quantization on the labels and the float "
                                   "model's answers, kept only if int8 val top-1 does not fall (0: post-training "
                                   "only); default: no int8", bound=Bound(0), metavar="N")
    progress: bool = option(True, "no progress line", flags=("--no-progress",), cli="negate")
    plot: bool = option(True, "no loss/accuracy PNGs at the end", flags=("--no-plot",), cli="negate")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fine-tuning starts from weights that already sit in a good minimum: the from-scratch learning rate
# (0.045) throws them out of it (val top-1 67% -> 25% in issue 11), a tenth of it does not; a short
# warm-up lets the new head settle before the body moves.
FINETUNE_LR_FACTOR = 0.1
FINETUNE_WARMUP_EPOCHS = 1.0


def fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_type(name: str) -> type:
    """The field's value type (int, float, str or bool), without the ``| None``."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def default_lr(recipe: str, batch_size=LR_BATCH) -> float:
    """The recipe's lr (stated for :data:`LR_BATCH` images per step) scaled linearly to ``batch_size``."""
    lr = RECIPES[recipe].get("lr", fields()["lr"].default)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, float)) or not batch_size > 0:
        return lr  # check_config refuses the batch size itself
    return lr * batch_size / LR_BATCH


def finetune_preset(recipe: str, batch_size=LR_BATCH) -> dict:
    """The fields ``finetune`` changes, for the given recipe: a tenth of its lr and a one-epoch warm-up."""
    return {"lr": default_lr(recipe, batch_size) * FINETUNE_LR_FACTOR, "lr_warmup_epochs": FINETUNE_WARMUP_EPOCHS}


def make_config(recipe: str = "paper", **overrides) -> TrainConfig:
    """The recipe's values, overridden by every option that is not None; checked before anything runs.

    lr not given is the recipe's scaled to the batch size (:func:`default_lr`). With ``finetune`` set,
    :func:`finetune_preset` fills lr and the warm-up wherever they were not given.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    unknown = set(overrides) - set(fields())
    if unknown:
        raise ConfigError(f"unknown training options {sorted(unknown)}; known: {sorted(fields())}")
    given = {k: v for k, v in overrides.items() if v is not None}
    batch_size = given.get("batch_size", RECIPES[recipe].get("batch_size", fields()["batch_size"].default))
    preset = finetune_preset(recipe, batch_size) if given.get("finetune") else {"lr": default_lr(recipe, batch_size)}
    config = TrainConfig(**{**RECIPES[recipe], **preset, **given, "recipe": recipe})
    check_config(config)
    return config


def preset_applied(config: TrainConfig, given: dict) -> dict:
    """The values ``config`` took because ``given`` did not set them: the fine-tuning preset, or an lr scaled to
    a batch size other than :data:`LR_BATCH`."""
    if not config.finetune:
        scaled = given.get("lr") is None and config.batch_size != LR_BATCH
        return {"lr": config.lr} if scaled else {}
    return {k: v for k, v in finetune_preset(config.recipe, config.batch_size).items() if given.get(k) is None}


def check_device(name: str | None) -> None:
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible; use device 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_config(c: TrainConfig) -> None:
    """Every field against its bound and choices, then the rules that tie fields together."""
    for name, f in fields().items():
        value = getattr(c, name)
        if value is None:
            continue
        kind, bound, choices = field_type(name), f.metadata.get("bound"), f.metadata.get("choices")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or (kind is int and not float(value).is_integer())):
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if bound is not None and not bound.contains(value):
            example = f" such as {f.metadata['example']}" if f.metadata.get("example") else ""
            raise ConfigError(f"{name} must be {bound.describe()}{example}, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if c.recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {c.recipe!r}")
    if c.lr_min >= c.lr:
        raise ConfigError(f"lr_min must be below lr ({c.lr:g}), got {c.lr_min!r}")
    check_device(c.device)
