"""Adaptive Feedback Prompts (SPEC section 4): a learnable prompt added to the tensor entering a teacher stage,
conditioned on the previous step's feedback (aligned student minus prompted teacher)."""

from __future__ import annotations

import torch
from torch import nn

from patfast.distill.aligners import FeedbackAligner
from patfast.models.stages import StageShape
from patfast.models.tokens import tokens_to_map


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv c -> c/r -> ReLU -> 1x1 conv c/r -> c -> sigmoid; returns x * gate, or the gate (B, c, 1, 1)
    alone when gate_only (the official code's behaviour)."""

    def __init__(self, channels: int, reduction: int = 16, gate_only: bool = False):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate_only = gate_only
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))
        return gate if self.gate_only else x * gate


def _groups(channels: int, groups: int = 4) -> int:
    return groups if channels % groups == 0 else 1


class PromptBlock(nn.Module):
    """x (B, c, h, w) -> x + beta * prompt(fusion(cat[x, fb]) or x).

    fusion = 1x1 (2c -> c), dense 5x5, 1x1, SE, 1x1; prompt = grouped 1x1, depthwise 5x5, 1x1, SE, grouped 1x1.
    `feedback` holds the previous step's (aligned student - prompted teacher) at the teacher stage OUTPUT shape
    (detached; None before the first training step, then the fusion block is skipped); `fb_align` maps it to the
    stage INPUT shape (identity when both are the same).
    """

    def __init__(self, entry: StageShape, stage_out: StageShape, *, se_gate_only: bool = False):
        super().__init__()
        c = entry.channels
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, c, 5, padding=2), nn.Conv2d(c, c, 1),
            SqueezeExcite(c, 16, se_gate_only), nn.Conv2d(c, c, 1))
        self.prompt = nn.Sequential(
            nn.Conv2d(c, c, 1, groups=_groups(c)), nn.Conv2d(c, c, 5, padding=2, groups=c), nn.Conv2d(c, c, 1),
            SqueezeExcite(c, 16, se_gate_only), nn.Conv2d(c, c, 1, groups=_groups(c)))
        self.beta = nn.Parameter(torch.zeros(()))
        same = (stage_out.channels, stage_out.height, stage_out.width) == (c, entry.height, entry.width)
        self.fb_align = nn.Identity() if same else FeedbackAligner(
            stage_out.channels, c, (entry.height, entry.width))
        self.feedback: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x
        if self.feedback is not None:
            fb = self.feedback
            fb = self.fb_align(tokens_to_map(fb) if fb.dim() == 3 else fb)
            xf = self.fusion(torch.cat([x, fb.to(x.dtype)], dim=1))
        return x + self.beta * self.prompt(xf)
