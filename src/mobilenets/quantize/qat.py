"""Quantization-aware fine-tuning: the fake-quantized model learns the float model's softmax (and any labels)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..folding import FoldedMobileNet
from . import QuantizeError, sim


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


def distill(folded: FoldedMobileNet, teacher: FoldedMobileNet, ranges: dict, batches, *, steps: int,
            lr: float = 0.02, batch_size: int = 16, seed: int = 0, log=None, labels: torch.Tensor | None = None,
            augment: bool = True) -> FoldedMobileNet:
    """Fine-tune ``folded``'s weights and biases for ``steps`` Adam steps on KL(teacher || int8 student).

    Ranges stay fixed (those chosen after calibration).  Step sizes are relative: ``lr`` is the
    fraction of each layer's int8 weight step (and of its output's activation step, for the bias)
    that Adam may move per step, so layers with tiny and huge weights learn alike.  With
    ``labels`` (one class index per image of ``batches``, in order) the loss adds the
    cross-entropy on them: the labels correct what the teacher gets wrong, the teacher keeps the
    student from drifting away from the float model.  ``augment``: train on random flips and
    crops of the images (new views where the images are few and unlabeled), else on the images
    as given; labels call for the latter, since half a digit or a mirrored one is not its class
    (on the digits, crops with labels cost 1-3 of 359 answers; the plain images none).
    """
    student = copy.deepcopy(folded).train()
    g = torch.Generator().manual_seed(seed)
    pool = torch.cat(list(batches))
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) != len(pool):
            raise QuantizeError(f"labels must give one class per image: {len(labels)} labels for {len(pool)} images")
    groups = []
    for i, layer in enumerate(student.features):
        w, b = layer.conv.weight, layer.conv.bias
        w.requires_grad_(True)
        b.requires_grad_(True)
        groups.append({"params": [w], "lr": lr * float(sim.weight_scales(w).mean())})
        groups.append({"params": [b], "lr": lr * sim.act_qparams(*ranges[f"features.{i}"])[0]})
    head = student.classifier
    head.weight.requires_grad_(True)
    head.bias.requires_grad_(True)
    groups.append({"params": [head.weight], "lr": lr * float(sim.weight_scales(head.weight).mean())})
    groups.append({"params": [head.bias], "lr": lr * sim.act_qparams(*ranges["logits"])[0]})
    opt = torch.optim.Adam(groups)
    base = [grp["lr"] for grp in opt.param_groups]
    for step in range(steps):
        # cosine decay: large early moves across rounding boundaries, then settle
        factor = 0.5 * (1 + torch.cos(torch.tensor(step / max(steps, 1) * torch.pi))).item()
        for grp, lr0 in zip(opt.param_groups, base):
            grp["lr"] = lr0 * factor
        idx = torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=g)
        x = _augment(pool[idx], g) if augment else pool[idx]
        with torch.no_grad():
            target = teacher(x).log_softmax(1)
        out = sim.simulate(student, ranges, x).log_softmax(1)
        loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
        if labels is not None:
            loss = loss + F.nll_loss(out, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} {'KL + CE' if labels is not None else 'KL'} {loss.item():.4f}")
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student
