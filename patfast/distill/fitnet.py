"""FitNet (Romero et al., 2015), heterogeneous: loss_gt + w_fit * sum over stages of MSE(proj_i(F_S,i), F_T,i).

proj_i takes the student's stage i (map, or tokens without the class token, as a map on their grid) to the teacher
stage's layout and size: nearest resize to its H x W, BatchNorm, 1x1 conv to its channels (PAT's feedback aligner);
token teacher stages are compared as maps on their grid (the same elements, so the same MSE). The teacher's stage
features come from its clean forward, without a graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from patfast.distill.aligners import FeedbackAligner
from patfast.distill.base import Distiller
from patfast.kernels.reference import fitnet_loss_ref
from patfast.models.stages import StageShape, StageTaps
from patfast.models.teacher import Teacher
from patfast.models.tokens import tokens_to_grid


def as_map(x: torch.Tensor, shape: StageShape) -> torch.Tensor:
    """A canonical stage feature (map, or tokens on shape's grid) -> (B, C, H, W)."""
    return x if x.dim() == 4 else tokens_to_grid(x, shape.height, shape.width)


class FitNet(Distiller):
    terms = ("loss_gt", "loss_fit")

    def __init__(self, student, student_taps: StageTaps, teacher: Teacher, *, stages: Sequence[int] = (1, 2, 3, 4),
                 w_fit: float = 1.0, **kw):
        super().__init__(student, **kw)
        self.student_taps = student_taps
        self.teacher = teacher
        self.stages = tuple(sorted(set(stages)))
        self.w_fit = w_fit
        s_shapes, t_shapes = student_taps.stage_shapes, teacher.taps.stage_shapes
        self.projectors = nn.ModuleDict({
            str(i): FeedbackAligner(s_shapes[i - 1].channels, t_shapes[i - 1].channels,
                                    (t_shapes[i - 1].height, t_shapes[i - 1].width)) for i in self.stages})

    def forward(self, images, targets, *, first_batch: bool = False):
        _, feats_t = self.teacher.features(images)
        logits = self.student(images)
        feats_s = self.student_taps.features()
        s_shapes, t_shapes = self.student_taps.stage_shapes, self.teacher.taps.stage_shapes
        hint = sum(fitnet_loss_ref(self.projectors[str(i)](as_map(feats_s[i - 1], s_shapes[i - 1])),
                                   as_map(feats_t[i - 1], t_shapes[i - 1])) for i in self.stages)
        return logits, {"loss_gt": self.gt_loss(logits, targets), "loss_fit": self.w_fit * hint}

    def without_hooks(self, copy_of_student: nn.Module) -> nn.Module:
        return self.student_taps.strip_hooks(copy_of_student)
