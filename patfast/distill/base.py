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
    """forward(images (B,3,H,W), targets, first_batch=False) -> (student logits (B, K), {"loss_gt": ..., ...}) with
    weighted terms; the training loss is the sum of the terms.

    What the training loop needs from a distiller, so that it knows none by name: the modules that learn (all but
    the frozen `teacher`, if any), the state a checkpoint carries beside them (`shared_state`: the same on every
    process, e.g. the teacher's buffers; `process_state`: each process's own, e.g. PAT's feedback), whether the
    first batch of an epoch is special, and when the forward has reached the graph worth compiling; `terms`: the
    names of the loss terms forward returns, in the order the log shows them.
    """

    terms: tuple[str, ...] = ("loss_gt",)

    def __init__(self, student: nn.Module, *, smoothing: float = 0.1, w_gt: float = 1.0):
        super().__init__()
        self.student = student
        self.smoothing = smoothing
        self.w_gt = w_gt

    def frozen_teacher(self) -> nn.Module | None:
        """The teacher (a child named `teacher`), frozen: never trained, never in trainable_state_dict."""
        return self._modules.get("teacher")

    def learning_modules(self) -> dict[str, nn.Module]:
        """name -> child module that learns: every child but the teacher."""
        teacher = self.frozen_teacher()
        return {n: m for n, m in self.named_children() if m is not teacher}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and distillation modules; never the (frozen) teacher."""
        return [p for m in self.learning_modules().values() for p in m.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict of the learning modules (keys as in state_dict(); the teacher has its own checkpoint)."""
        return {f"{n}.{k}": v for n, m in self.learning_modules().items() for k, v in m.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load what trainable_state_dict wrote; returns (missing, unexpected) keys."""
        missing, unexpected = [], set(state)
        for n, m in self.learning_modules().items():
            own = {k.removeprefix(n + "."): v for k, v in state.items() if k.startswith(n + ".")}
            unexpected -= {f"{n}.{k}" for k in own}
            result = m.load_state_dict(own, strict=False)
            missing += [f"{n}.{k}" for k in result.missing_keys]
            unexpected |= {f"{n}.{k}" for k in result.unexpected_keys}
        return missing, sorted(unexpected)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """State outside the learning modules that a forward may change, the same on every process: the teacher's
        buffers (the official variant's first-batch switch moves its BatchNorm statistics)."""
        teacher = self.frozen_teacher()
        return dict(teacher.model.named_buffers()) if teacher is not None else {}

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.shared_state()
        for name, value in state.items():
            own[name].copy_(value)

    def process_state(self) -> dict[str, torch.Tensor | None]:
        """Each process's own state that a training forward changes (none here; PAT: its feedback)."""
        return {}

    def load_process_state(self, state: dict[str, torch.Tensor | None]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no per-process state, got {sorted(state)}")

    def start_epoch(self, epoch: int) -> None:
        """Called before the training steps of epoch `epoch` (counted from 1; on resume, the resumed epoch): a
        distiller whose loss changes with the epoch (DKD's warm-up) sets it here."""

    @property
    def first_batch_special(self) -> bool:
        """Whether forward's `first_batch` changes what it computes (then the loop passes it)."""
        return False

    def compile_ready(self) -> bool:
        """False while the forward still runs a start-up graph (PAT's first step, before any feedback) that is not
        worth compiling; the step then runs it eagerly."""
        return True

    def without_hooks(self, copy_of_student: nn.Module) -> nn.Module:
        """A copy of the student (e.g. the EMA's) with this distiller's stage hooks removed."""
        return copy_of_student

    def gt_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.w_gt * classification_loss(logits, targets, self.smoothing)


class Vanilla(Distiller):
    """The student alone (no distillation): loss_gt only."""

    def forward(self, images, targets, *, first_batch: bool = False):
        logits = self.student(images)
        return logits, {"loss_gt": self.gt_loss(logits, targets)}
