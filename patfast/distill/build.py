"""Building a distiller (pat | kd | ofa | dkd | dist | fitnet | none) around a student and, where needed, a teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from torch import nn

from patfast.distill import DISTILLERS
from patfast.distill.base import Distiller, Vanilla
from patfast.distill.dist import DIST
from patfast.distill.dkd import DKD
from patfast.distill.fitnet import FitNet
from patfast.distill.kd import KD
from patfast.distill.ofa import OFA
from patfast.distill.pat import PAT
from patfast.distill.variant import PatVariant
from patfast.errors import UserError
from patfast.models.stages import StageTaps
from patfast.models.teacher import Teacher


@dataclass(frozen=True)
class DistillSettings:
    """What a distiller is built with, each field named as its key in the run configuration (patfast/train/config.py:
    one spelling per setting). Fields a distiller does not use are ignored (KD reads no pat_*)."""

    pat_variant: str = "paper"  # SPEC section 6
    pat_afp_stage: Sequence[int] = (1, 2, 3, 4)  # teacher stages with a feedback prompt; () = no AFP
    pat_feedback: bool = True
    pat_aligner_order: str = "upsample-last"  # | "plain" (resize first, the authors' order): the same function
    pat_dim: int = 512
    pat_heads: int = 8
    pat_queries_per_stage: int = 16
    student_stages: Sequence[str] | None = None
    teacher_stages: Sequence[str] | None = None
    teacher_prompt_points: Sequence[str] | None = None
    smoothing: float = 0.1
    gt_weight: float = 1.0
    kd_weight: float = 1.0
    fd_weight: float = 1.0
    reg_weight: float = 1.0
    kd_temperature: float = 1.0
    ofa_stages: Sequence[int] = (1, 2, 3, 4)  # student stages with an exit branch
    ofa_eps: Sequence[float] = (1.0,)  # one per stage + one for the logits, or one for all
    ofa_weight: float | None = None  # None: 1.0 (the run configuration resolves the recipe's value)
    ofa_temperature: float = 1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_temperature: float = 4.0
    dkd_warmup_epochs: float = 20.0
    dist_beta: float = 1.0
    dist_gamma: float = 1.0
    dist_temperature: float = 1.0
    fitnet_weight: float = 1.0
    fitnet_stages: Sequence[int] = (1, 2, 3, 4)
    backend: str = "auto"  # the ops' implementation (reference | triton | auto); never the algorithm

    @classmethod
    def from_config(cls, cfg: Mapping, **override) -> DistillSettings:
        """The settings a resolved run configuration holds (keys it lacks keep their defaults)."""
        return cls(**{**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}, **override})


def build_distiller(name: str, student: nn.Module, teacher_model: nn.Module | None,
                    settings: DistillSettings = DistillSettings(), *, img_size: int, data_mean: Sequence[float],
                    data_std: Sequence[float], teacher_mean: Sequence[float] | None = None,
                    teacher_std: Sequence[float] | None = None) -> Distiller:
    """The distiller `name` around `student` (and the teacher it needs), built with `settings`."""
    o = settings
    if name not in DISTILLERS:
        raise UserError(f"unknown distiller '{name}' (choose from {', '.join(DISTILLERS)})")
    common = {"smoothing": o.smoothing, "w_gt": o.gt_weight}
    if name == "none":
        return Vanilla(student, **common)
    if teacher_model is None:
        raise UserError(f"distiller '{name}' needs a teacher")
    try:
        pv = PatVariant.named(o.pat_variant)
    except ValueError as e:
        raise UserError(str(e)) from None
    bad = [s for s in o.pat_afp_stage if s not in (1, 2, 3, 4)]
    if bad:  # none at all: the ablation without AFP
        raise UserError(f"--pat-afp-stage takes stages among 1,2,3,4, got {','.join(map(str, o.pat_afp_stage))}")
    if o.pat_dim % o.pat_heads:
        raise UserError(f"--pat-dim {o.pat_dim} is not divisible by --pat-heads {o.pat_heads}")
    if o.pat_aligner_order not in ("upsample-last", "plain"):
        raise UserError(f"--pat-aligner-order must be upsample-last or plain, got '{o.pat_aligner_order}'")
    teacher_taps = StageTaps(teacher_model, img_size, stage_modules=o.teacher_stages,
                             prompt_points=o.teacher_prompt_points, class_token=pv.class_token_rule,
                             token_return=pv.token_return_rule, flag="--teacher-stages")
    teacher = Teacher(teacher_model, teacher_taps, mean=teacher_mean or data_mean, std=teacher_std or data_std,
                      data_mean=data_mean, data_std=data_std)
    if name == "kd":
        return KD(student, teacher, temperature=o.kd_temperature, w_kd=o.kd_weight, backend=o.backend, **common)
    if name == "dkd":
        return DKD(student, teacher, alpha=o.dkd_alpha, beta=o.dkd_beta, temperature=o.dkd_temperature,
                   warmup_epochs=o.dkd_warmup_epochs, w_kd=o.kd_weight, backend=o.backend, **common)
    if name == "dist":
        return DIST(student, teacher, beta=o.dist_beta, gamma=o.dist_gamma, temperature=o.dist_temperature,
                    w_kd=o.kd_weight, backend=o.backend, **common)
    student_taps = StageTaps(student, img_size, stage_modules=o.student_stages, class_token=pv.class_token_rule,
                             flag="--student-stages")
    if name == "ofa":
        stages = _stages(o.ofa_stages, "--ofa-stages")
        if len(o.ofa_eps) not in (1, len(stages) + 1):
            raise UserError(f"--ofa-eps takes one value, or one per stage of --ofa-stages plus one for the logits "
                            f"({len(stages) + 1}), got {len(o.ofa_eps)}")
        return OFA(student, student_taps, teacher, num_classes=_num_classes(student), stages=stages,
                   eps=o.ofa_eps, temperature=o.ofa_temperature, w_kd=o.kd_weight,
                   w_ofa=1.0 if o.ofa_weight is None else o.ofa_weight, backend=o.backend, **common)
    if name == "fitnet":
        return FitNet(student, student_taps, teacher, stages=_stages(o.fitnet_stages, "--fitnet-stages"),
                      w_fit=o.fitnet_weight, **common)
    return PAT(student, student_taps, teacher, variant=pv, afp_stages=o.pat_afp_stage, dim=o.pat_dim,
               num_heads=o.pat_heads, queries_per_stage=o.pat_queries_per_stage, temperature=o.kd_temperature,
               w_kd=o.kd_weight, w_fd=o.fd_weight, w_reg=o.reg_weight, backend=o.backend, feedback=o.pat_feedback,
               upsample_last=o.pat_aligner_order == "upsample-last", **common)


def _stages(stages: Sequence[int], flag: str) -> tuple[int, ...]:
    if not stages or any(s not in (1, 2, 3, 4) for s in stages) or len(set(stages)) != len(stages):
        raise UserError(f"{flag} takes distinct stages among 1,2,3,4, got {','.join(map(str, stages)) or 'none'}")
    return tuple(stages)


def _num_classes(model: nn.Module) -> int:
    k = getattr(model, "num_classes", None)
    if not isinstance(k, int) or k <= 0:
        raise UserError(f"{type(model).__name__} has no classifier (num_classes {k!r}): OFA's branches need the "
                        "number of classes")
    return k
