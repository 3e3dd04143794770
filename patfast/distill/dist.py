"""DIST (Huang et al., NeurIPS 2022; OFA-KD's dist_loss): loss_gt + w_kd * (beta T^2 inter + gamma T^2 intra).

inter = 1 - mean over samples of the Pearson correlation across classes of softmax(z_S / T) and softmax(z_T / T);
intra = 1 - mean over classes of the correlation across the batch.
"""

from __future__ import annotations

from patfast import ops
from patfast.distill.base import Distiller
from patfast.models.teacher import Teacher


class DIST(Distiller):
    terms = ("loss_gt", "loss_kd")

    def __init__(self, student, teacher: Teacher, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
                 w_kd: float = 1.0, backend: str = "auto", **kw):
        super().__init__(student, **kw)
        self.teacher = teacher
        self.beta, self.gamma, self.temperature = beta, gamma, temperature
        self.w_kd = w_kd
        self.backend = backend

    def forward(self, images, targets, *, first_batch: bool = False):
        logits_t = self.teacher.clean(images)
        logits = self.student(images)
        loss = ops.dist_loss(logits, logits_t, self.beta, self.gamma, self.temperature, backend=self.backend)
        return logits, {"loss_gt": self.gt_loss(logits, targets), "loss_kd": self.w_kd * loss}
