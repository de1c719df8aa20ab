"""The optimizer, the learning-rate schedule and the EMA of the weights, as TF-slim defines them."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig


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
            # linear over the warm-up's steps, ending at lr on its last: a warm-up of n steps runs lr/n, 2lr/n, ...
            # (from lr/100 at most), so on a tiny set, where an epoch is two steps, no step is spent at lr/100
            return max(0.01, min(1.0, (step + 1) / (warmup * self.steps_per_epoch)))
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
        return {"state_dict": contiguous(self.module.state_dict()), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])


def contiguous(state_dict: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state_dict.items()}
