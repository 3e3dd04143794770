"""Decoupled KD (Zhao et al., CVPR 2022; mdistiller): loss_gt + w_kd * ramp * (alpha TCKD + beta NCKD).

TCKD: T^2 KL of the binary [target, non-target] probabilities; NCKD: T^2 KL among the non-target classes (the target
logit lowered by 1000 before the softmaxes at T). ramp = min(epoch / warm-up epochs, 1), epochs counted from 1, as
mdistiller's trainer passes them (20 on CIFAR: the first epoch at 1/20). Soft labels (mixup) target their argmax.
"""

from __future__ import annotations

import torch

from patfast import ops
from patfast.distill.base import Distiller
from patfast.models.teacher import Teacher


class DKD(Distiller):
    terms = ("loss_gt", "loss_kd")

    def __init__(self, student, teacher: Teacher, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: float = 20.0, w_kd: float = 1.0, backend: str = "auto", **kw):
        super().__init__(student, **kw)
        self.teacher = teacher
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs = warmup_epochs
        self.w_kd = w_kd
        self.backend = backend
        # a tensor, not a float: the compiled step reads it each call instead of recompiling when it changes
        self.register_buffer("ramp", torch.ones(()), persistent=False)

    def start_epoch(self, epoch: int) -> None:
        self.ramp.fill_(min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0)

    def forward(self, images, targets, *, first_batch: bool = False):
        logits_t = self.teacher.clean(images)
        logits = self.student(images)
        loss = ops.dkd_loss(logits, logits_t, targets, self.alpha, self.beta, self.temperature, backend=self.backend)
        return logits, {"loss_gt": self.gt_loss(logits, targets), "loss_kd": self.w_kd * self.ramp * loss}
