"""Training and fine-tuning: recipes, the loop, checkpoints, exact resumption, distributed data parallel.

    config.py       TrainConfig (the one source of every setting and its CLI flag), recipes, fine-tuning preset
    optim.py        RMSprop as TensorFlow implements it, parameter groups, the lr schedule, the EMA
    distributed.py  torchrun's process group and the collectives the loop needs
    rundir.py       the run folder: file names, its lock, metrics.jsonl
    qat.py          int8.safetensors at the end of a run (qat): int8-ready weights fine-tuned with the labels
    console.py      the progress line, Ctrl-C and SIGTERM
    loop.py         setup -> train_one_epoch -> end_epoch over one TrainState
    plots.py        loss.png and accuracy.png

Both checkpoints of a run are in the format of ``mobilenets.checkpoint``;
``last.pt`` adds the optimizer, schedule, EMA, epoch, step and RNG state, so a
resume continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

from .. import checkpoint, data
from ..errors import MobilenetsError
from .config import (MAX_ALPHA, MAX_RESOLUTION, OPTIMIZERS, RECIPES, SCHEDULERS, ConfigError, TrainConfig,
                     check_config, fields, finetune_preset, make_config, preset_applied)
from .console import Interrupted, Progress, StopRequest
from .distributed import Dist, elastic_job, init_distributed
from .loop import NonFiniteLoss, TrainState, end_epoch, log, run, setup, train_one_epoch
from .optim import ModelEMA, RMSpropTF, Schedule, make_optimizer, parameter_groups
from .plots import plot
from .rundir import BEST, LAST, LOCK, METRICS, RunFolderError, RunLock, json_line, read_metrics, write_metrics

__all__ = [
    "BEST", "LAST", "LOCK", "MAX_ALPHA", "MAX_RESOLUTION", "METRICS", "OPTIMIZERS", "RECIPES", "SCHEDULERS",
    "ConfigError", "Dist", "Interrupted", "ModelEMA", "NonFiniteLoss", "Progress", "RMSpropTF", "RunFolderError",
    "RunLock", "Schedule", "StopRequest", "TrainConfig", "TrainState", "check_config", "end_epoch", "fields",
    "finetune_preset", "init_distributed", "json_line", "make_config", "make_optimizer", "parameter_groups",
    "plot", "preset_applied", "read_metrics", "resume_config", "run", "setup", "start", "train", "train_one_epoch",
]

# the settings a resumed run may change: they do not alter what it computes
RESUME_MAY_CHANGE = ("epochs", "num_workers", "device", "threads", "progress", "plot", "qat")


def train(config: TrainConfig, *, resume: str | Path | bool | None = None, notes: tuple[str, ...] = ()) -> dict:
    """Run (or resume) training; returns the last metrics row.  Raises :class:`Interrupted` on Ctrl-C/SIGTERM.

    ``resume``: True for ``config.out``'s ``last.pt``, or a path.  The run
    folder is locked first, so a second run on it and an unwritable folder
    fail before any data is read.  Workers that torchrun restarts after a
    failure (``--max-restarts``, same job id) resume from ``last.pt`` when their job wrote it.
    ``notes`` are printed (by the first process) once the data has been checked, beside the resources chosen:
    a run refused for its arguments or data says only why.
    """
    check_config(config)
    threads = torch.get_num_threads()  # setup chooses the run's; the caller gets its own back
    dist, device = init_distributed(config.device)
    try:
        job = elastic_job()
        if not resume and job is not None:
            # torchrun started this job's workers again after one died: continue from the last checkpoint.
            # Rank 0 decides for all (they must agree), from the job that holds the folder.
            mine = dist.main and (Path(config.out) / LAST).exists() and RunLock.held_by(config.out) == job
            resume = dist.any(mine, device) or None
        if config.sync_bn and device.type == "cpu":
            raise ConfigError("sync_bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation; "
                              "train without sync_bn")
        if config.data is not None:
            data.check_layout(config.data)  # a typo in the data path must not leave an empty run folder behind
        # rank 0 writes, so rank 0 holds the folder; under torchrun the other ranks stop with it
        with RunLock(config.out) if dist.main else contextlib.nullcontext() as lock:
            if lock is not None and job is not None:
                lock.claim(job)
            file = None if not resume else Path(config.out) / LAST if resume is True else Path(resume)
            state = setup(config, dist, device, file, notes)
            row = run(state)
            if config.qat is not None and dist.main and state.history:
                from . import qat  # the int8 machinery loads only for runs that ask for it

                row = {**row, **qat.finish(state, lambda message: log(dist, message))}
                state.history[-1] = row
                write_metrics(state.out, state.history)
            skipped = state.skips.everywhere(dist)
            if dist.main:
                if skipped:
                    print(f"skipped {len(skipped)} undecodable file(s) in total", file=sys.stderr, flush=True)
                if config.plot and state.history:
                    plot(config.out)
            dist.barrier()
            return row
    finally:
        dist.close()
        torch.set_num_threads(threads)


def resume_config(path: str | Path, **overrides) -> tuple[TrainConfig, Path]:
    """The stored settings of a run (from RUN_DIR or its last.pt), with the few a resume may change."""
    path = Path(path)
    file = path / LAST if path.is_dir() else path
    state = checkpoint.load(file, training=True)
    known = fields()
    config = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in known})
    changed = {k: v for k, v in overrides.items() if v is not None and k in known and getattr(config, k) != v}
    refused = sorted(set(changed) - set(RESUME_MAY_CHANGE))
    if refused:
        raise MobilenetsError(f"a resume continues the stored run; these settings differ from it and cannot "
                              f"change: {', '.join(refused)} (only {', '.join(RESUME_MAY_CHANGE)} can)")
    config = dataclasses.replace(config, **changed)
    config.out = str(file.parent)
    check_config(config)
    return config, file


def start(options: dict, *, resume: str | Path | bool | None = None) -> tuple[TrainConfig, dict]:
    """What ``mobilenets train`` runs: (the run's settings, its last metrics row).

    ``options``: the :class:`TrainConfig` fields the user gave (None or absent: not given), with ``recipe``
    (default "paper") and ``out`` (default runs/mobilenet).  ``resume``: True for ``out``'s run, or a run
    folder or ``last.pt``; it continues the stored settings, of which only :data:`RESUME_MAY_CHANGE` may be
    given.  A new run says which of the recipe's values were scaled (its lr to the batch size, or the
    fine-tuning preset), so that a value the user did not choose is never silent.
    """
    options = {k: v for k, v in options.items() if v is not None}
    out, recipe = options.pop("out", None), options.pop("recipe", None)
    if resume:
        where = out if resume is True else resume
        if where is None:
            raise ConfigError("--resume needs the run: --resume RUN_DIR (or --out RUN_DIR --resume)")
        config, file = resume_config(where, **options)
        return config, train(config, resume=file)
    if options.get("finetune") and "alpha" in options:
        raise ConfigError("--alpha comes from the --finetune checkpoint; drop --alpha")
    config = make_config(recipe or "paper", out=out or "runs/mobilenet", **options)
    preset = preset_applied(config, options)
    notes: tuple[str, ...] = ()
    if preset:
        what = "fine-tuning preset" if config.finetune else f"the recipe's lr scaled to batch {config.batch_size}"
        notes = (f"mobilenets: {what}: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in preset.items())
                 + " (give the flags to choose other values)",)
    return config, train(config, notes=notes)
