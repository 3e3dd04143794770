"""OFA's exit branches (OFA-KD, NeurIPS 2023): a student stage -> class logits, to be taught by the teacher's logits.

CNN stages (maps): stage s < 4 gets 4 - s SepConv blocks (each halves H and W; channels double, the last block's go
to `width` = max(D_S, D_T)), stage 4 a 1x1 conv to `width`; then global average pooling and Linear(width, K).
Token stages (ViT/MLP/Swin students): patch merging until the grid is about 7 x 7 (floor(log2(grid / 7)) merges; the
first to D_S, GELU after every merge but the last; the class token is kept aside), then max(4 - s, 1) ViT blocks
(4 heads) over the class token and the merged tokens, then the class token (or the mean of the tokens, without one)
and Linear(D_S, K). Initialisation as OFA-KD's: convs kaiming fan-out, BatchNorm 1/0, Linear truncated normal 0.02.

Two cases OFA-KD's code cannot build are completed here, and only they: an odd grid is zero-padded to even before a
merge (timm's Swin does the same), and a token stage whose width is not D_S when no merge is due (a Swin student at
a small image size) gets a Linear to D_S first; so does a class token of another width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from patfast.models.stages import StageShape

FINAL_GRID = 7  # token branches merge patches down to about this grid
BRANCH_HEADS = 4


class SepConv(nn.Module):
    """dw3x3 stride 2, 1x1, BN, ReLU, dw3x3, 1x1 (to out), BN, ReLU: (B, C, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        c = channels
        self.op = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False), nn.Conv2d(c, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class PatchMerge(nn.Module):
    """(B, h*w, C) -> (B, ceil(h/2)*ceil(w/2), out): 2x2 neighbours concatenated (odd sides zero-padded), LayerNorm,
    Linear(4C, out, no bias), then `act`."""

    def __init__(self, height: int, width: int, channels: int, out_channels: int, act: bool):
        super().__init__()
        self.height, self.width = height, width
        self.norm = nn.LayerNorm(4 * channels)
        self.reduction = nn.Linear(4 * channels, out_channels, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.height, self.width, c)
        x = F.pad(x, (0, 0, 0, self.width % 2, 0, self.height % 2))
        # order of the four: (0, 0), (1, 0), (0, 1), (1, 1) as (row, column) offsets, as Swin's patch merging
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.reshape(b, -1, 4 * c))))


class CnnBranch(nn.Module):
    """A map stage (B, C, H, W) -> logits (B, K)."""

    def __init__(self, stage: int, shape: StageShape, width: int, num_classes: int):
        super().__init__()
        c = shape.channels
        if stage < 4:
            blocks = []
            for i in range(4 - stage):
                last = i == 3 - stage
                blocks.append(SepConv(c, width if last else 2 * c))
                c *= 2
        else:
            blocks = [nn.Conv2d(c, width, 1)]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class TokenBranch(nn.Module):
    """A token stage (B, h*w, C) on shape's grid, with its prefix tokens (B, P, C') or None -> logits (B, K)."""

    def __init__(self, stage: int, shape: StageShape, dim: int, num_classes: int, prefix_dim: int | None):
        super().__init__()
        h, w, c = shape.height, shape.width, shape.channels
        merges = max(int(math.log2(h / FINAL_GRID)), 0) if h > 0 else 0
        layers: list[nn.Module] = []
        for i in range(merges):
            layers.append(PatchMerge(h, w, c if i == 0 else dim, dim, act=i == 0 or i != merges - 1))
            h, w = (h + 1) // 2, (w + 1) // 2
        if not merges and c != dim:
            layers.append(nn.Linear(c, dim))  # not in OFA-KD (it would fail here): see the module docstring
        self.merge = nn.Sequential(*layers)
        self.prefix_proj = nn.Linear(prefix_dim, dim) if prefix_dim not in (None, dim) else nn.Identity()
        heads = BRANCH_HEADS if dim % BRANCH_HEADS == 0 else 1
        self.blocks = nn.Sequential(*[Block(dim=dim, num_heads=heads) for _ in range(max(4 - stage, 1))])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        x = self.merge(x)
        if prefix is None:
            return self.head(self.blocks(x).mean(dim=1))
        x = self.blocks(torch.cat([self.prefix_proj(prefix), x], dim=1))
        return self.head(x[:, 0])  # the (first) class token; OFA-KD's models have one


def init_branch(module: nn.Module) -> None:
    """OFA-KD's init: Conv2d kaiming normal (fan_out, relu; its bias left as built); BatchNorm2d 1/0; Linear
    truncated normal 0.02, bias 0. LayerNorms keep their 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def ofa_branch(stage: int, shape: StageShape, *, student_dim: int, teacher_dim: int, num_classes: int,
               prefix_dim: int | None = None) -> nn.Module:
    """The branch of student stage `stage` (1..4) of shape `shape`; student_dim / teacher_dim: the channels of
    each model's stage 4 (D_S, D_T)."""
    if shape.kind == "map":
        branch = CnnBranch(stage, shape, max(student_dim, teacher_dim), num_classes)
    else:
        branch = TokenBranch(stage, shape, student_dim, num_classes, prefix_dim)
    init_branch(branch)
    return branch
