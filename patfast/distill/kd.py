"""Logit knowledge distillation (Hinton et al.): loss_gt + w_kd * T^2 * KL(teacher || student) at temperature T."""

from __future__ import annotations

from patfast import ops
from patfast.distill.base import Distiller
from patfast.models.teacher import Teacher


class KD(Distiller):
    terms = ("loss_gt", "loss_kd")

    def __init__(self, student, teacher: Teacher, *, temperature: float = 1.0, w_kd: float = 1.0,
                 backend: str = "auto", **kw):
        super().__init__(student, **kw)
        self.teacher = teacher
        self.temperature = temperature
        self.w_kd = w_kd
        self.backend = backend

    def forward(self, images, targets, *, first_batch: bool = False):
        logits_t = self.teacher.clean(images)
        logits = self.student(images)
        return logits, {
            "loss_gt": self.gt_loss(logits, targets),
            "loss_kd": self.w_kd * ops.kd_loss(logits, logits_t, self.temperature, backend=self.backend),
        }
