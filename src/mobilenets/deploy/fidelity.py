"""How close a deployed model's logits are to the float model's: the figures parity, export and benchmark report."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits)), in nats (0 when the distributions agree)."""
    p_log = F.log_softmax(reference.double(), dim=1)
    q_log = F.log_softmax(logits.double(), dim=1)
    return float((p_log.exp() * (p_log - q_log)).sum(1).mean())


def parity(reference: torch.Tensor, logits: torch.Tensor, labels=None) -> dict:
    """How close ``logits`` are to ``reference`` (fp32 eager), both (N, classes).

    Keys: ``top1_agreement`` (fraction of images whose arg-max agrees),
    ``cosine`` (of the flattened logits), ``mean_kl`` (mean KL(softmax(reference)
    || softmax(logits)) in nats), ``max_abs_diff``, ``images``; with ``labels``
    also ``accuracy`` and ``reference_accuracy``.
    """
    reference, logits = reference.float(), logits.float()
    out = {
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).float().mean()),
        "cosine": float(F.cosine_similarity(reference.flatten(), logits.flatten(), dim=0)),
        "mean_kl": mean_kl(reference, logits),
        "max_abs_diff": float((reference - logits).abs().max()),
        "images": int(reference.shape[0]),
    }
    if labels is not None:
        y = torch.as_tensor(labels)
        out["reference_accuracy"] = float((reference.argmax(1) == y).float().mean())
        out["accuracy"] = float((logits.argmax(1) == y).float().mean())
    return out
