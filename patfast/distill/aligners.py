"""Aligners (SPEC section 3): RAA output (B, 16, d) -> the teacher's stage shape; the map -> map feedback aligner."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from patfast.models.stages import StageShape


def init_aligner(module: nn.Module) -> None:
    """Conv2d kaiming_normal (fan_out, relu); BatchNorm weight 1 bias 0; Linear trunc_normal(0.02) bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class MapAligner(nn.Module):
    """(B, g*g, d) -> (B, C_T, H, W): grid map, nearest resize to H x W, BatchNorm2d(d), 1x1 conv d -> C_T (no bias)."""

    def __init__(self, dim: int, target: StageShape, queries: int = 16):
        super().__init__()
        self.grid = math.isqrt(queries)
        self.size = (target.height, target.width)
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, target.channels, kernel_size=1, bias=False)
        init_aligner(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = F.interpolate(x, size=self.size, mode="nearest")
        return self.conv(self.bn(x))


class TokenAligner(nn.Module):
    """(B, Q, d) -> (B, L_T, D_T): BatchNorm1d(Q) over tokens, Linear d -> D_T, BatchNorm1d(D_T), Linear Q -> L_T."""

    def __init__(self, dim: int, target: StageShape, queries: int = 16):
        super().__init__()
        self.bn_tokens = nn.BatchNorm1d(queries)
        self.channels = nn.Linear(dim, target.channels)
        self.bn_channels = nn.BatchNorm1d(target.channels)
        self.tokens = nn.Linear(queries, target.tokens)
        init_aligner(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channels(self.bn_tokens(x)).transpose(1, 2)  # (B, D_T, Q)
        return self.tokens(self.bn_channels(x)).transpose(1, 2)


def stage_aligner(dim: int, target: StageShape, queries: int = 16) -> nn.Module:
    return (MapAligner if target.kind == "map" else TokenAligner)(dim, target, queries)


class FeedbackAligner(nn.Module):
    """Map -> map: nearest resize to the output size, BatchNorm2d(C_in), 1x1 conv C_in -> C_out (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]):
        super().__init__()
        self.size = size
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        init_aligner(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="nearest")
        return self.conv(self.bn(x))
