"""What every distiller shares: the student, the ground-truth loss and the parameters that learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing for int labels (B,); soft-target CE for (B, K) targets (mixup/cutmix).
    Computed in at least float32 (16-bit logits are promoted, float64 stays float64)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


class Distiller(nn.Module):
    """forward(images (B,3,H,W), targets) -> (student logits (B, K), {"loss_gt": ..., ...}) with weighted terms;
    the training loss is the sum of the terms."""

    def __init__(self, student: nn.Module, *, smoothing: float = 0.1, w_gt: float = 1.0):
        super().__init__()
        self.student = student
        self.smoothing = smoothing
        self.w_gt = w_gt

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and distillation modules; never the (frozen) teacher."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict without the teacher (it is loaded from its own checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def gt_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.w_gt * classification_loss(logits, targets, self.smoothing)


class Vanilla(Distiller):
    """The student alone (no distillation): loss_gt only."""

    def forward(self, images, targets, *, first_batch: bool = False):
        logits = self.student(images)
        return logits, {"loss_gt": self.gt_loss(logits, targets)}
