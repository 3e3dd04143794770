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


def nearest_counts(src: int, dst: int) -> torch.Tensor:
    """(src,) float64: how many of the `dst` outputs of a nearest resize src -> dst read each input position.

    Taken from F.interpolate itself, so it is exactly PyTorch's index rule whatever the sizes.
    """
    # on the CPU whatever the default device (a model built on the meta device still gets the real counts)
    index = F.interpolate(torch.arange(src, dtype=torch.float64, device="cpu").view(1, 1, src), size=dst,
                          mode="nearest")
    return torch.bincount(index.view(-1).long(), minlength=src).double()


class MapAligner(nn.Module):
    """(B, g*g, d) -> (B, C_T, H, W): grid map, nearest resize to H x W, BatchNorm2d(d), 1x1 conv d -> C_T (no bias).

    `upsample_last` (the default; off for the reference path) computes the same function in a cheaper order:
    BatchNorm and the 1x1 conv act on the g x g grid and the nearest resize comes last. Both are per-pixel, so they
    commute with a nearest resize exactly, provided BatchNorm's batch statistics are those of the resized map: each
    grid cell is weighted by how many output pixels copy it (nearest_counts), and the running variance gets the
    unbiased correction of the resized map's B*H*W values. Only float rounding differs (tests/distill/test_aligners).
    At Swin-T/ConvNeXt-T stage 1 (56 x 56) this turns a B x 512 x 3136 BatchNorm + 512 -> 96 conv into one on 16 cells.
    """

    def __init__(self, dim: int, target: StageShape, queries: int = 16, upsample_last: bool = True):
        super().__init__()
        self.grid = math.isqrt(queries)
        self.size = (target.height, target.width)
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, target.channels, kernel_size=1, bias=False)
        self.upsample_last = upsample_last
        weights = nearest_counts(self.grid, self.size[0])[:, None] * nearest_counts(self.grid, self.size[1])[None, :]
        self.register_buffer("cell_weights", weights / weights.sum(), persistent=False)  # (g, g) float64, sum 1
        init_aligner(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        if not self.upsample_last:
            x = F.interpolate(x, size=self.size, mode="nearest")
            return self.conv(self.bn(x))
        return F.interpolate(self.conv(self._weighted_bn(x)), size=self.size, mode="nearest")

    def _weighted_bn(self, x: torch.Tensor) -> torch.Tensor:
        """self.bn applied to the nearest-resized x, evaluated on the grid x (B, d, g, g)."""
        bn = self.bn
        if not (bn.training or bn.running_mean is None):
            return bn(x)  # eval mode: a per-channel affine map, commutes as it is
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # fp32 statistics under autocast
        w = self.cell_weights.to(xf.dtype) / x.shape[0]  # weight of one cell of one sample; sums to 1 over (B, g, g)
        mean = (xf * w).sum(dim=(0, 2, 3))
        var = ((xf - mean[:, None, None]) ** 2 * w).sum(dim=(0, 2, 3))  # biased, as BatchNorm normalises with
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                n = x.shape[0] * self.size[0] * self.size[1]
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
                bn.running_var.lerp_((var.detach() * (n / max(n - 1, 1))).to(bn.running_var.dtype), momentum)
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -mean * scale + (bn.bias if bn.affine else 0)
        return (xf * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


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


def stage_aligner(dim: int, target: StageShape, queries: int = 16, upsample_last: bool = True) -> nn.Module:
    if target.kind == "map":
        return MapAligner(dim, target, queries, upsample_last=upsample_last)
    return TokenAligner(dim, target, queries)


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
