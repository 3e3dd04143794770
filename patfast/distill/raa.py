"""Region-Aware Attention (SPEC section 3): per-stage patch projectors, then self-attention over all stages' tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patfast import ops
from patfast.kernels.reference import LAYER_NORM_EPS
from patfast.models.stages import StageShape
from patfast.models.tokens import tokens_to_map


def sinusoid_table(length: int, dim: int, float32_arith: bool = False) -> torch.Tensor:
    """(length, dim) float32: enc[p, 2i] = sin(p * 10000^(-2i/dim)), enc[p, 2i+1] = cos(same).

    float32_arith=False: computed in float64, then rounded (each entry within half a float32 step of the truth).
    True (official variant): computed in float32 as the common PyTorch form does, 10000^(-2i/dim) as
    exp(2i * -ln(10000) / dim); its rounding grows with p (measured against the float64 table: <= 3.1e-6 for
    p < 64, 6e-5 for p < 1024, 4e-4 over all 5000).
    """
    if float32_arith:
        pos = torch.arange(length, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    else:
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=pos.dtype)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


class StageProjector(nn.Module):
    """A student stage (map (B, C, H, W) or tokens (B, L, C)) -> grid x grid tokens (B, grid^2, dim).

    patch = ceil(H / grid) from the stage shape at construction; maps smaller than grid or than grid*patch are
    nearest-resized first (14 -> 16, 7 -> 8), then a patch x patch conv with stride patch (timm PatchEmbed, no norm).
    """

    def __init__(self, shape: StageShape, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.patch = math.ceil(shape.height / grid)
        self.size = self.patch * grid
        self.proj = nn.Conv2d(shape.channels, dim, kernel_size=self.patch, stride=self.patch)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = tokens_to_map(feat) if feat.dim() == 3 else feat
        if x.shape[-2] < self.grid:
            x = F.interpolate(x, size=(self.grid, self.grid), mode="nearest")
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        return self.proj(x).flatten(2).transpose(1, 2)


class RegionAwareAttention(nn.Module):
    """4 student stages -> 4 x (B, queries_per_stage, dim): one shared LayerNorm, q and kv projections, positional
    term on q and k, multi-head softmax attention over all stages' tokens; no output projection or residual.

    pos_by_batch_index=False (paper): P = table[:N] as (1, N, dim); True (official): P = table[:B] as (B, 1, dim).
    float32_pos_table: the table's float32 arithmetic (official variant), see sinusoid_table.
    """

    def __init__(self, stage_shapes: Sequence[StageShape], dim: int = 512, num_heads: int = 8,
                 queries_per_stage: int = 16, pos_by_batch_index: bool = False, float32_pos_table: bool = False,
                 backend: str = "auto"):
        super().__init__()
        grid = math.isqrt(queries_per_stage)
        if grid * grid != queries_per_stage:
            raise ValueError(f"queries_per_stage must be a square number (a grid), got {queries_per_stage}")
        self.queries = grid * grid
        self.num_heads = num_heads
        self.pos_by_batch_index = pos_by_batch_index
        self.backend = backend
        self.projectors = nn.ModuleList(StageProjector(s, dim, grid) for s in stage_shapes)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)  # the eps the ops apply (they take only its weights)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.register_buffer("pos_table", sinusoid_table(5000, dim, float32_pos_table),
                             persistent=False)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([p(f) for p, f in zip(self.projectors, feats)], dim=1)  # (B, 4*queries, dim) stage-major
        b, n, _ = x.shape
        pos = self.pos_table[:b, None] if self.pos_by_batch_index else self.pos_table[None, :n]
        out = ops.raa_attention(x, self.norm.weight, self.norm.bias, self.q.weight, self.q.bias,
                                self.kv.weight, self.kv.bias, pos.to(x.dtype), self.num_heads, backend=self.backend)
        return list(out.split(self.queries, dim=1))
