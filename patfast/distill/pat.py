"""PAT (Perspective-Aware Teaching): RAA + aligners on the student side, AFP prompts in the teacher, four losses.

L = w_gt CE(z_S, y) + w_kd T^2 KL(z_T || z_S at T) + w_fd sum_i HCL(align_i(RAA(F_S))_i, F'_T,i)
    + w_reg KL(z_T || z'_T)
z_T: clean teacher (no prompts, no graph); z'_T, F'_T: the prompted teacher forward (graph through the frozen
teacher into the prompt blocks). SPEC sections 1-4; the variant switches in variant.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from patfast import ops
from patfast.distill.aligners import stage_aligner
from patfast.distill.base import Distiller
from patfast.distill.prompts import PromptBlock
from patfast.distill.raa import RegionAwareAttention
from patfast.distill.variant import PatVariant
from patfast.models.stages import StageTaps
from patfast.models.teacher import Teacher


class PAT(Distiller):
    terms = ("loss_gt", "loss_kd", "loss_fd", "loss_reg")

    def __init__(self, student: nn.Module, student_taps: StageTaps, teacher: Teacher, *,
                 variant: PatVariant | None = None, afp_stages: Sequence[int] = (1, 2, 3, 4), dim: int = 512,
                 num_heads: int = 8, queries_per_stage: int = 16, temperature: float = 1.0, w_kd: float = 1.0,
                 w_fd: float = 1.0, w_reg: float = 1.0, backend: str = "auto", feedback: bool = True,
                 upsample_last: bool = True, **kw):
        super().__init__(student, **kw)
        self.student_taps = student_taps
        self.teacher = teacher
        self.variant = variant = variant or PatVariant()
        self.afp_stages = tuple(sorted(set(afp_stages)))
        self.temperature, self.w_kd, self.w_fd, self.w_reg = temperature, w_kd, w_fd, w_reg
        self.backend = backend
        self.feedback = feedback  # False: the ablation "AFP without feedback" (the fusion block is never used)
        self.raa = RegionAwareAttention(student_taps.stage_shapes, dim, num_heads, queries_per_stage,
                                        pos_by_batch_index=variant.pos_by_batch_index,
                                        float32_pos_table=variant.float32_pos_table, backend=backend)
        targets = teacher.taps.stage_shapes
        # upsample_last: the aligners' cheaper exact order (BatchNorm + conv on the grid, resize last); False: the
        # plain order (resize, then BatchNorm + conv), the authors' way
        self.aligners = nn.ModuleList(stage_aligner(dim, t, self.raa.queries, upsample_last=upsample_last)
                                      for t in targets)
        self.prompts = nn.ModuleDict({
            str(i): PromptBlock(teacher.taps.prompt_shapes[i - 1], targets[i - 1], se_gate_only=variant.se_gate_only)
            for i in self.afp_stages})
        teacher.taps.set_prompts([self.prompts[str(i)] if str(i) in self.prompts else None for i in range(1, 5)])

    def forward(self, images, targets, *, first_batch: bool = False):
        # official bug 5: the clean forward of an epoch's first batch runs in train mode; the authors' code puts the
        # teacher back in eval mode before the prompted forward, so only that one forward sees train mode
        bug_mode = self.training and first_batch and self.variant.teacher_train_first_batch
        if bug_mode:
            self.teacher.model_mode(True)
        try:
            logits_t = self.teacher.clean(images)
        finally:
            if bug_mode:
                self.teacher.model_mode(False)
        logits_pt, feats_t = self.teacher.prompted(images)
        logits = self.student(images)
        aligned = [a(q) for a, q in zip(self.aligners, self.raa(self.student_taps.features()))]
        fd = ops.hcl_loss_stages(aligned, feats_t, backend=self.backend)
        loss_kd, loss_reg = ops.kd_loss_pair(logits, logits_pt, logits_t, self.temperature, backend=self.backend)
        if self.training and self.feedback:
            for i in self.afp_stages:  # feedback for the NEXT step (a different batch: intended)
                # one fixed layout (standard strides, even on size-1 axes) whatever produced it, eager or compiled,
                # so the compiled step never recompiles on the feedback's strides
                diff = (aligned[i - 1] - feats_t[i - 1]).detach()
                self.prompts[str(i)].feedback = diff.clone(memory_format=torch.contiguous_format)
        return logits, {
            "loss_gt": self.gt_loss(logits, targets),
            "loss_kd": self.w_kd * loss_kd,
            "loss_fd": self.w_fd * fd,
            "loss_reg": self.w_reg * loss_reg,
        }

    def feedback_state(self) -> dict[str, torch.Tensor | None]:
        return {i: p.feedback for i, p in self.prompts.items()}

    # --- what the training loop needs (Distiller) ------------------------------------------------------------------
    def process_state(self) -> dict[str, torch.Tensor | None]:
        """The feedback of every prompt block (per process: it comes from that process's previous batch)."""
        return self.feedback_state()

    def load_process_state(self, state: dict[str, torch.Tensor | None]) -> None:
        for i, p in self.prompts.items():
            p.feedback = state.get(i)

    @property
    def first_batch_special(self) -> bool:
        return self.variant.teacher_train_first_batch

    def compile_ready(self) -> bool:
        """Once every prompt has feedback (from the second step on) the forward keeps one graph; without feedback
        (the ablation) it is that graph from the start."""
        return not self.feedback or all(p.feedback is not None for p in self.prompts.values())

    def without_hooks(self, copy_of_student: nn.Module) -> nn.Module:
        return self.student_taps.strip_hooks(copy_of_student)
