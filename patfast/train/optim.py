"""Optimiser (SGD or AdamW, no weight decay on 1-D parameters) and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two groups: >= 2-D tensors with weight decay; biases, norms, scalars (PAT's beta) without."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: list[nn.Parameter], opt: str, lr: float, weight_decay: float,
                   momentum: float = 0.9, fused: bool = False) -> torch.optim.Optimizer:
    """fused: one kernel for the whole update (CUDA and CPU; same arithmetic as the for-each implementation), and
    the one kind whose update a non-finite step can skip on the device (train/step.py)."""
    groups = param_groups(params, weight_decay)
    extra = {"fused": True} if fused else {}
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **extra)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **extra)
    raise ValueError(f"unknown optimizer {opt!r}")


class WarmupCosine:
    """lr at step s: linear warm-up to `lr` over `warmup` steps, then cosine from `lr` down to `min_lr`."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int, total: int):
        self.optimizer, self.lr, self.min_lr = optimizer, lr, min_lr
        self.warmup, self.total = warmup, max(total, 1)

    def value(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))

    def step(self, step: int) -> float:
        lr = self.value(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr
