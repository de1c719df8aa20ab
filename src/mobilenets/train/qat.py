"""int8 at the end of a run (``qat``): int8-ready weights of the final model, fine-tuned with the labels.

The final model is the one the run folder stands for (``best.pt``, else ``last.pt``: what
``mobilenets.load(RUN_DIR)`` gives).  :func:`mobilenets.quantize.prepare_int8` makes it int8-ready on
a sample of training images; then :func:`mobilenets.quantize.qat.distill` fine-tunes the
fake-quantized model on more training images with their labels and the float model's softmax.
The fine-tuned weights are kept only if the simulated int8 top-1 on the validation images does not
fall, as prepare_int8 keeps its steps only if the divergence falls.  Rank 0 alone does this, on
the CPU: it is a few hundred small steps, and the int8 graph is a CPU deployment.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import data, quantize, weights
from ..evaluate import evaluate
from ..folding import fold_batchnorm
from ..quantize import qat as distillation

INT8 = "int8.safetensors"
CALIBRATION_IMAGES = 128  # as `mobilenets quantize` and the int8 benchmark calibrate
FINETUNE_IMAGES = 1024  # a pool the random crops draw new views from; bounded so it fits in memory at 224 px
# In units of each channel's int8 weight step per Adam step.  prepare_int8's 0.02 moved every weight of
# a layer by about a fiftieth of a step at once, which over a fan-in of hundreds shifted outputs and
# made the real ImageNet weights' int8 worse; a tenth of it was about neutral there.
LR = 0.002


class _Simulated(torch.nn.Module):
    """The int8 graph (fake-quantized, in float) as a module, so :func:`evaluate` scores it like the float model."""

    def __init__(self, ready: quantize.Int8Ready):
        super().__init__()
        self.ready = ready

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ready.simulate(x)


def _sample(dataset, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` decodable images of ``dataset`` (drawn with ``seed``) and their labels."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    images, labels = [], []
    for index in order:
        item = dataset[index]
        if isinstance(item, data.Skipped):
            continue
        images.append(item[0])
        labels.append(item[1])
        if len(images) == count:
            break
    return torch.stack(images), torch.tensor(labels)


def int8_top1(model: torch.nn.Module, val_loader) -> float:
    return float(evaluate(model, val_loader)["top1"])


def finish(s, log) -> dict:
    """Write ``int8.safetensors`` into the run folder; returns the numbers for the last metrics row."""
    c = s.config
    model = weights.load(s.out, progress=False).cpu().eval()  # best.pt, else last.pt
    normalization = s.meta.normalization
    # the training images as the model sees them at inference: no random crop, no flip
    train_images = copy.copy(s.train_set)
    train_images.transform = data.EvalTransform(c.resolution, normalization)
    images, labels = _sample(train_images, max(CALIBRATION_IMAGES, FINETUNE_IMAGES), c.seed)
    calibration = list(images[:CALIBRATION_IMAGES].split(c.batch_size))
    val_set = s.val_loader.dataset
    # every validation image, whatever this rank's shard was
    val_loader = data.loader(val_set, data.ShardSampler(len(val_set)), c.batch_size, 0)

    ready = quantize.prepare_int8(model, calibration, seed=c.seed)
    float_top1 = int8_top1(model, val_loader)
    ptq_top1 = int8_top1(_Simulated(ready), val_loader)
    result = {"int8_float_val_top1": float_top1, "int8_ptq_val_top1": ptq_top1, "int8_qat_steps": c.qat}
    if c.qat:
        teacher = fold_batchnorm(model).eval()
        tuned = distillation.distill(ready.folded, teacher, ready.ranges, [images], steps=c.qat, lr=LR,
                                     batch_size=c.batch_size, seed=c.seed, labels=labels, augment=False,
                                     weight_qmax=ready.weight_qmax)
        candidate = quantize.Int8Ready(tuned, ready.ranges, ready.scales, ready.resolution,
                                       {**ready.report, "qat_steps": c.qat, "qat_lr": LR,
                                        "qat_images": len(images)}, ready.weight_qmax)
        # the form a saved file reloads as, so the accuracy measured is the file's
        candidate = quantize.from_model(quantize.to_model(candidate, model))
        qat_top1 = int8_top1(_Simulated(candidate), val_loader)
        kept = qat_top1 >= ptq_top1
        result.update(int8_qat_val_top1=qat_top1, int8_qat_kept=kept)
        if kept:
            ready = candidate
        else:
            log(f"int8 fine-tuning lowered the simulated int8 val top-1 from {ptq_top1:.2f}% to {qat_top1:.2f}%; "
                f"keeping the post-training weights")
    result["int8_val_top1"] = result["int8_qat_val_top1"] if result.get("int8_qat_kept") else ptq_top1
    ready.report.update(float_val_top1=float_top1, int8_val_top1=result["int8_val_top1"])
    path = quantize.save(ready, model, Path(s.out) / INT8)
    log(f"int8: val top-1 {result['int8_val_top1']:.2f}% (simulated) against {float_top1:.2f}% float "
        f"({result['int8_val_top1'] - float_top1:+.2f} points); wrote {path}")
    return result
