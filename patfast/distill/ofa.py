"""OFA-KD (Hao et al., NeurIPS 2023): the teacher's logits taught at the student's output and at an exit branch on
each chosen student stage, with OFA's target-enhanced loss.

L = w_gt CE(z_S, y) + w_kd ofa(z_S, eps_last) + w_ofa sum_i ofa(branch_i(F_S,i), eps_i),
ofa(z, eps) = -mean_b sum_c ((q_c + [c = y])^eps - [c = y]) log softmax(z / T)_c, q = softmax(z_T / T); no T^2.
Soft labels (mixup) target their argmax. Branches: ofa_branches.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from patfast import ops
from patfast.distill.base import Distiller
from patfast.distill.ofa_branches import ofa_branch
from patfast.kernels.reference import hard_targets
from patfast.models.stages import StageTaps
from patfast.models.teacher import Teacher


class OFA(Distiller):
    terms = ("loss_gt", "loss_kd", "loss_ofa")

    def __init__(self, student, student_taps: StageTaps, teacher: Teacher, *, num_classes: int,
                 stages: Sequence[int] = (1, 2, 3, 4), eps: Sequence[float] = (1.0,), temperature: float = 1.0,
                 w_kd: float = 1.0, w_ofa: float = 1.0, backend: str = "auto", **kw):
        super().__init__(student, **kw)
        self.student_taps = student_taps
        self.teacher = teacher
        self.stages = tuple(stages)
        eps = tuple(eps)
        if len(eps) == 1:
            eps = eps * (len(self.stages) + 1)
        if len(eps) != len(self.stages) + 1:
            raise ValueError(f"OFA needs one eps per stage plus one for the logits ({len(self.stages) + 1}) or a "
                             f"single one, got {len(eps)}")
        self.eps = eps
        self.temperature, self.w_kd, self.w_ofa = temperature, w_kd, w_ofa
        self.backend = backend
        shapes = student_taps.stage_shapes
        student_dim, teacher_dim = shapes[3].channels, teacher.taps.stage_shapes[3].channels
        prefix = bool(student_taps.num_prefix)  # a stage's class token has that stage's width
        self.branches = nn.ModuleDict({
            str(i): ofa_branch(i, shapes[i - 1], student_dim=student_dim, teacher_dim=teacher_dim,
                               num_classes=num_classes, prefix_dim=shapes[i - 1].channels if prefix else None)
            for i in self.stages})

    def forward(self, images, targets, *, first_batch: bool = False):
        logits_t = self.teacher.clean(images)
        logits = self.student(images)
        feats = self.student_taps.features_with_prefix()
        y = hard_targets(targets)
        t, backend = self.temperature, self.backend
        branch = sum(ops.ofa_loss(self.branches[str(i)](*feats[i - 1]), logits_t, y, e, t, backend=backend)
                     for i, e in zip(self.stages, self.eps))
        return logits, {
            "loss_gt": self.gt_loss(logits, targets),
            "loss_kd": self.w_kd * ops.ofa_loss(logits, logits_t, y, self.eps[-1], t, backend=backend),
            "loss_ofa": self.w_ofa * branch,
        }

    def without_hooks(self, copy_of_student: nn.Module) -> nn.Module:
        return self.student_taps.strip_hooks(copy_of_student)
