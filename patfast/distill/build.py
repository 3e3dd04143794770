"""Building a distiller (pat | kd | none) around a student and, where needed, a teacher."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from patfast.distill.base import Distiller, Vanilla
from patfast.distill.kd import KD
from patfast.distill.pat import PAT
from patfast.distill.variant import PatVariant
from patfast.errors import UserError
from patfast.models.stages import StageTaps
from patfast.models.teacher import Teacher

DISTILLERS = ("pat", "kd", "none")


def build_distiller(name: str, student: nn.Module, teacher_model: nn.Module | None, *, img_size: int,
                    data_mean: Sequence[float], data_std: Sequence[float],
                    teacher_mean: Sequence[float] | None = None, teacher_std: Sequence[float] | None = None,
                    variant: str = "paper", afp_stages: Sequence[int] = (1, 2, 3, 4),
                    student_stages: Sequence[str] | None = None, teacher_stages: Sequence[str] | None = None,
                    teacher_prompt_points: Sequence[str] | None = None, smoothing: float = 0.1,
                    w_gt: float = 1.0, w_kd: float = 1.0, w_fd: float = 1.0, w_reg: float = 1.0,
                    temperature: float = 1.0, dim: int = 512, num_heads: int = 8, queries_per_stage: int = 16,
                    backend: str = "auto", feedback: bool = True, upsample_last: bool | None = None) -> Distiller:
    """upsample_last: the aligners' order (PAT); None: the plain order for backend "reference" (the reference
    path, as the authors compute), the cheaper exact one otherwise."""
    if name not in DISTILLERS:
        raise UserError(f"unknown distiller '{name}' (choose from {', '.join(DISTILLERS)})")
    common = {"smoothing": smoothing, "w_gt": w_gt}
    if name == "none":
        return Vanilla(student, **common)
    if teacher_model is None:
        raise UserError(f"distiller '{name}' needs a teacher")
    try:
        pv = PatVariant.named(variant)
    except ValueError as e:
        raise UserError(str(e)) from None
    bad = [s for s in afp_stages if s not in (1, 2, 3, 4)]
    if bad:  # none at all: the ablation without AFP
        raise UserError(f"--pat-afp-stage takes stages among 1,2,3,4, got {','.join(map(str, afp_stages))}")
    if dim % num_heads:
        raise UserError(f"--pat-dim {dim} is not divisible by --pat-heads {num_heads}")
    teacher_taps = StageTaps(teacher_model, img_size, stage_modules=teacher_stages,
                             prompt_points=teacher_prompt_points, class_token=pv.class_token_rule,
                             token_return=pv.token_return_rule, flag="--teacher-stages")
    teacher = Teacher(teacher_model, teacher_taps, mean=teacher_mean or data_mean, std=teacher_std or data_std,
                      data_mean=data_mean, data_std=data_std)
    if name == "kd":
        return KD(student, teacher, temperature=temperature, w_kd=w_kd, backend=backend, **common)
    student_taps = StageTaps(student, img_size, stage_modules=student_stages, class_token=pv.class_token_rule,
                             flag="--student-stages")
    return PAT(student, student_taps, teacher, variant=pv, afp_stages=afp_stages, dim=dim, num_heads=num_heads,
               queries_per_stage=queries_per_stage, temperature=temperature, w_kd=w_kd, w_fd=w_fd, w_reg=w_reg,
               backend=backend, feedback=feedback,
               upsample_last=backend != "reference" if upsample_last is None else upsample_last, **common)
