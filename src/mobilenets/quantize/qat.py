"""Quantization-aware fine-tuning: the fake-quantized model learns the float model's softmax (and any labels)."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..folding import FoldedMobileNet
from ..errors import QuantizeError
from . import sim


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random flip and a random crop (50-100% of the side) resized back: new views of the same photos."""
    n, _, h, w = x.shape
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    side = float(torch.empty(()).uniform_(0.5, 1.0, generator=g))
    ch, cw = max(8, int(h * side)), max(8, int(w * side))
    top = int(torch.randint(0, h - ch + 1, (), generator=g))
    left = int(torch.randint(0, w - cw + 1, (), generator=g))
    x = x[:, :, top:top + ch, left:left + cw]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False) if (ch, cw) != (h, w) else x


class _InUnits(torch.nn.Module):
    """A parametrization ``value = units * step``: the optimizer sees each tensor in its own int8 steps."""

    def __init__(self, step: torch.Tensor):
        super().__init__()
        self.register_buffer("step", step)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        return units * self.step

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value / self.step


def _learnable(student: FoldedMobileNet, ranges: dict, weight_qmax: int) -> list:
    """Each conv / classifier of ``student`` with its weight in its output channel's int8 weight step and its
    bias in its output's activation step (parametrized in place); returns those modules."""
    modules = [(layer.conv, ranges[f"features.{i}"]) for i, layer in enumerate(student.features)]
    modules.append((student.classifier, ranges["logits"]))
    for module, rng in modules:
        w = module.weight
        step = sim.weight_scales(w, weight_qmax).reshape(-1, *([1] * (w.dim() - 1)))
        parametrize.register_parametrization(module, "weight", _InUnits(step.clone()))
        parametrize.register_parametrization(module, "bias",
                                             _InUnits(torch.full_like(module.bias, sim.act_qparams(*rng)[0])))
    return [m for m, _ in modules]


def schedule(step: int, steps: int) -> float:
    """The learning-rate factor of ``step`` (0-based) of ``steps``: a linear warm-up over the first fifth, then
    a cosine decay to 0.

    Adam's first updates are about ``lr`` in the sign of each gradient, for every weight at once: over a
    fan-in of 1024 those same-signed moves add up and shift a layer's outputs before its moments know the
    gradients' scale.  The warm-up keeps the first updates small; the decay settles the weights at the end.
    """
    warm = max(1, steps // 5)
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


def distill(folded: FoldedMobileNet, teacher: FoldedMobileNet, ranges: dict, batches, *, steps: int,
            lr: float = 0.002, batch_size: int = 16, seed: int = 0, log=None, labels: torch.Tensor | None = None,
            augment: bool = True, weight_qmax: int = sim.WEIGHT_QMAX) -> FoldedMobileNet:
    """Fine-tune ``folded``'s weights and biases for ``steps`` Adam steps on KL(teacher || int8 student).

    Ranges stay fixed (those chosen after calibration).  Step sizes are relative: ``lr`` is the
    fraction of each output channel's int8 weight step (and of its layer's output activation step,
    for the bias) that Adam moves a value per step, so channels with tiny and huge weights learn
    alike (:func:`schedule` gives its warm-up and decay).  With
    ``labels`` (one class index per image of ``batches``, in order) the loss adds the
    cross-entropy on them: the labels correct what the teacher gets wrong, the teacher keeps the
    student from drifting away from the float model.  ``augment``: train on random flips and
    crops of the images (new views where the images are few and unlabeled), else on the images
    as given; labels call for the latter, since half a digit or a mirrored one is not its class
    (on the digits, crops with labels cost 1-3 of 359 answers; the plain images none).  ``weight_qmax``: the
    int8 weights' grid (:func:`sim.simulate`).
    """
    student = copy.deepcopy(folded).train()
    g = torch.Generator().manual_seed(seed)
    pool = torch.cat(list(batches))
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) != len(pool):
            raise QuantizeError(f"labels must give one class per image: {len(labels)} labels for {len(pool)} images")
    modules = _learnable(student, ranges, weight_qmax)
    params = [p for m in modules for p in (m.parametrizations.weight.original, m.parametrizations.bias.original)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * schedule(step, steps)
        idx = torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=g)
        x = _augment(pool[idx], g) if augment else pool[idx]
        with torch.no_grad():
            target = teacher(x).log_softmax(1)
        out = sim.simulate(student, ranges, x, weight_qmax=weight_qmax).log_softmax(1)
        loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
        if labels is not None:
            loss = loss + F.nll_loss(out, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} {'KL + CE' if labels is not None else 'KL'} {loss.item():.4f}")
    for module in modules:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        parametrize.remove_parametrizations(module, "bias", leave_parametrized=True)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student
