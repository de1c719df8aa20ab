"""Weight rounding by output error: each layer's int8 weights chosen one input column at a time, the
rounding error of each column spread over the columns not yet rounded in proportion to how the layer's
inputs correlate (the second-order rounding of Frantar et al., "GPTQ", 2022, after "Optimal Brain
Compression", 2022), so the layer's outputs on the calibration images move as little as the int8 grid
allows instead of each weight moving as little as it allows.

The grid is the one every int8 backend uses (symmetric, per output channel, step max|w| / qmax): the
largest weight of each channel stays where rounding to nearest puts it (on +-qmax steps), so the
result lies on the same grid and round-to-nearest of it, in any runtime, gives back these integers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..folding import FoldedConv
from . import sim

# Hessian damping, as a fraction of its mean diagonal: keeps the Cholesky factor finite where the
# calibration images leave an input direction (nearly) unseen
DAMPING = 0.01
# input windows needed per weight of a filter before its Hessian is trusted: with fewer, the rounding fits
# the calibration images rather than the layer (the digits model at 32 px, whose last layers see one
# position per image, lost 2 of 359 validation digits to it)
SAMPLES_PER_INPUT = 4
# input-window values unfolded at once (8 M: 64 MB in double), whatever the batch size
WINDOW_VALUES = 1 << 23


def input_windows(layer: FoldedConv, x: torch.Tensor) -> torch.Tensor:
    """The layer's input windows in double: (N * positions, groups, inputs per group * kh * kw), contiguous.

    The windows are a strided view of the padded input, gathered and widened to double in one copy
    (unfold, its transpose and the conversion took three passes over nine times the input).
    """
    c = layer.conv
    x = sim.pad_same(layer, x)
    ph, pw = c.padding
    if ph or pw:
        x = F.pad(x, [pw, pw, ph, ph])
    (kh, kw), (sh, sw), (dh, dw) = c.kernel_size, c.stride, c.dilation
    # (N, C, out_h, out_w, kh, kw): each position's window, channel-major within it as F.unfold orders it
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, channels, out_h, out_w = windows.shape[:4]
    out = torch.empty((n, out_h, out_w, channels, kh, kw), dtype=torch.float64)
    out.copy_(windows.permute(0, 2, 3, 1, 4, 5))
    return out.view(n * out_h * out_w, c.groups, channels // c.groups * kh * kw)


@torch.no_grad()
def input_hessian(layer: FoldedConv, xs) -> torch.Tensor | None:
    """Per group, the mean outer product of the layer's input windows over ``xs``: (groups, K, K); None when
    ``xs`` hold fewer than :data:`SAMPLES_PER_INPUT` windows per filter weight."""
    total, count = None, 0
    kh, kw = layer.conv.kernel_size
    for x in xs:
        # a few images at a time: the windows of a whole batch of 112 x 112 inputs are gigabytes in double
        for chunk in x.split(max(1, WINDOW_VALUES // max(1, x[0].numel() * kh * kw))):
            p = input_windows(layer, chunk)
            h = torch.einsum("ngi,ngj->gij", p, p)
            total = h if total is None else total + h
            count += p.shape[0]
    if total is None or count < SAMPLES_PER_INPUT * total.shape[-1]:
        return None
    return total / count


@torch.no_grad()
def round_weights(weight: torch.Tensor, hessian: torch.Tensor, qmax: int = sim.WEIGHT_QMAX) -> torch.Tensor:
    """``weight`` (out, in/groups, kh, kw) on its int8 grid of [-qmax, qmax] steps, rounded to least output error
    under ``hessian``.

    ``hessian`` is (groups, K, K) from :func:`input_hessian`; the output channels of group g see
    ``hessian[g]``.  Returns float weights that are exact multiples of each channel's step.
    """
    out_channels = weight.shape[0]
    groups, k, _ = hessian.shape
    # columns are stored contiguous, (groups, K, out / groups): the update after column j is one contiguous
    # block, written through a buffer allocated once (a fresh product each column cost a page-faulted
    # allocation of up to 8 MB, 1024 times for a 1024-input layer)
    w = weight.detach().double().reshape(groups, out_channels // groups, k).transpose(1, 2).contiguous()
    step = sim.weight_scales(weight, qmax).double().reshape(groups, -1)
    h = hessian.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0  # inputs that never fire: their weights cannot matter here; round them plainly
    diag += DAMPING * diag.mean(1, keepdim=True).clamp_min(1e-12) + dead.double()
    # upper Cholesky factor of the inverse Hessian: row j holds how column j's error carries to columns > j
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # the largest weight of a channel fixes the channel's step: it is rounded to nearest and never moved
    peak = F.one_hot(w.abs().argmax(1), k).bool().transpose(1, 2)
    pinned = w.clone()
    q = torch.empty_like(w)
    update = torch.empty_like(w)
    for j in range(k):
        column = torch.where(peak[:, j], pinned[:, j], w[:, j])
        q[:, j] = torch.clamp(torch.round(column / step), -qmax, qmax) * step
        err = (w[:, j] - q[:, j]) / u[:, j, j].unsqueeze(1)
        carried = update[:, : k - j - 1]
        torch.mul(err.unsqueeze(1), u[:, j, j + 1:].unsqueeze(-1), out=carried)
        w[:, j + 1:] -= carried
    return q.transpose(1, 2).reshape(weight.shape).to(weight.dtype)
