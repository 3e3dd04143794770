"""Fused Triton kernels of the hierarchical context loss (HCL, SPEC section 2), forward and backward.

``hcl_loss(feat_s, feat_t)`` -> fp32 scalar, one stage; ``hcl_loss_stages(feats_s, feats_t)`` -> the sum over
stages (PAT's loss_fd), one kernel per stage into one partials buffer. Inputs: (B, C, H, W) maps of any strides or
(B, L, C) tokens read in place, each fp32/fp16/bf16 in its own dtype; fp32 arithmetic; gradients in each input's
dtype.
Grid: B * cdiv(C, BLOCK_C) programs (>= 4 per SM of an H200 on a GPU), each owning whole (b, c) planes (rows in
bin-aligned segments, a 21-bin table per plane); the row loop software-pipelined NUM_STAGES deep (cp.async copies of
the next rows in flight on sm_80+); every stride passed with its power-of-two alignment (``_layout``), so rows of
56 or 28 pixels of an NCHW map load as vectors too; no atomics; the loss is the deterministic sum of per-program
partials.
Traffic: forward reads fs and ft once, backward reads both (and 21 fp32 coefficients per plane) and writes both
gradients: 6 passes, e.g. 867 MB in bf16 for Swin-T's four stages at B = 128.
Derivation, launch counts and the byte model: docs/kernels.md#hcl.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .checks import KERNEL_DTYPES, check_feature_pair
from .reference import HCL_LEVELS

__all__ = ["hcl_loss", "hcl_loss_stages", "COMPILE_CONFIGS"]

_NUM_COEFS = 21  # per plane: 16 bins of level 4, 4 of level 2, 1 of level 1


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _strides(sb, sc, sh, sw, LAYOUT: tl.constexpr):
    """A tensor's (b, c, h, w) strides in elements from the launcher's encoding (``_layout``): LAYOUT = 4 A + unit,
    unit 1 = channels contiguous, 2 = columns contiguous, 0 = neither; every other stride was passed divided by A
    (a power of two), so the compiler knows each row starts A elements aligned and can vectorise its loads."""
    A: tl.constexpr = LAYOUT // 4
    UNIT: tl.constexpr = LAYOUT % 4
    if UNIT == 1:
        return sb * A, 1, sh * A, sw * A
    elif UNIT == 2:
        return sb * A, sc * A, sh * A, 1
    else:
        return sb * A, sc * A, sh * A, sw * A


@triton.jit
def _hcl_fwd_kernel(
    s_ptr,  # [B, C, H, W] student map (tokens: (B, L, C) seen through strides), fp32 / fp16 / bf16
    t_ptr,  # [B, C, H, W] teacher map, same shape as s_ptr, its own dtype (fp32 / fp16 / bf16) and strides
    coef_ptr,  # [B, 21, C] fp32 out: per plane, the bin coefficients as prefix sums over column bins (see below)
    partial_ptr,  # [B * cdiv(C, BLOCK_C)] fp32 out: this program's weighted share of the loss
    C,
    H,
    W,  # divided by W_ALIGN
    s_sb,  # strides as encoded by the launcher's _layout (see _strides)
    s_sc,
    s_sh,
    s_sw,
    t_sb,
    t_sc,
    t_sh,
    t_sw,
    scale_full,  # 1 / (N * total)
    scale4,  # w_4 / (N_4 * total), 0 when level 4 is skipped (4 >= H)
    scale2,  # w_2 / (N_2 * total), 0 when skipped
    scale1,  # w_1 / (N_1 * total), 0 when skipped
    S_LAYOUT: tl.constexpr,
    T_LAYOUT: tl.constexpr,
    W_ALIGN: tl.constexpr,  # the largest power of two <= 16 dividing W: column masks constant over W_ALIGN columns
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # rows of loads in flight (software-pipelined through shared memory on sm_80+)
):
    W = W * W_ALIGN
    pid = tl.program_id(0)
    n_cblk = tl.cdiv(C, BLOCK_C)
    b = (pid // n_cblk).to(tl.int64)
    c_offs = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    s_sb, s_sc, s_sh, s_sw = _strides(s_sb, s_sc, s_sh, s_sw, S_LAYOUT)
    t_sb, t_sc, t_sh, t_sw = _strides(t_sb, t_sc, t_sh, t_sw, T_LAYOUT)
    s_plane = s_ptr + b * s_sb  # scalar pointers to sample b; the tiles hold int32 offsets, not 64-bit pointers
    t_plane = t_ptr + b * t_sb

    # Slot k of a plane's bin table: level 4 bin (i, j) at k = 4 i + j, level 2 bin (i, j) at 16 + 4 i + j,
    # level 1 at 24 (i = row bin, j = column bin); the other slots are unused. Bin (i, j) of level l covers rows
    # [floor(i H / l), ceil((i + 1) H / l)) and columns [floor(j W / l), ceil((j + 1) W / l)).
    k = tl.arange(0, 32)
    lvl = tl.where(k < 16, 4, tl.where(k < 24, 2, 1))
    bi = tl.where(k < 24, (k % 16) // 4, 0)
    bj = k % 4
    valid = (bj < lvl) & (k < 25)
    row_lo = (bi * H) // lvl
    row_hi = ((bi + 1) * H + lvl - 1) // lvl
    col_lo = (bj * W) // lvl
    col_hi = ((bj + 1) * W + lvl - 1) // lvl
    sel = tl.where(lvl == 4, bj, tl.where(lvl == 2, 4 + bj, 6))[None, :]  # which column-bin sum feeds slot k
    # The rows where a bin starts or ends cut the plane into at most 7 segments of rows that share their bins
    # (the level-2 edges H // 2 and ceil(H / 2) are also level-4 edges).
    e1 = H // 4
    e2 = (H + 3) // 4
    e3 = H // 2
    e4 = (H + 1) // 2
    e5 = (3 * H) // 4
    e6 = (3 * H + 3) // 4

    bins = tl.zeros([BLOCK_C, 32], dtype=tl.float32)  # bin sums of d, slot layout above
    sq = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        w_offs = w0 + tl.arange(0, BLOCK_W)
        mask = c_mask[:, None] & (w_offs < W)[None, :]
        s_off = c_offs[:, None] * s_sc + w_offs[None, :] * s_sw
        t_off = c_offs[:, None] * t_sc + w_offs[None, :] * t_sw
        m40 = (w_offs < (W + 3) // 4).to(tl.float32)[None, :]  # column bins of the chunk's columns
        m41 = ((w_offs >= W // 4) & (w_offs < (2 * W + 3) // 4)).to(tl.float32)[None, :]
        m42 = ((w_offs >= (2 * W) // 4) & (w_offs < (3 * W + 3) // 4)).to(tl.float32)[None, :]
        m43 = (w_offs >= (3 * W) // 4).to(tl.float32)[None, :]
        m20 = (w_offs < (W + 1) // 2).to(tl.float32)[None, :]
        m21 = (w_offs >= W // 2).to(tl.float32)[None, :]
        seg = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)  # sum of d over the rows of the current segment
        for h in tl.range(0, H, num_stages=NUM_STAGES):
            x = tl.load(s_plane + h * s_sh + s_off, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(t_plane + h * t_sh + t_off, mask=mask, other=0.0).to(tl.float32)
            d = x - y
            sq += d * d
            seg += d
            nh = h + 1
            if (nh == e1) | (nh == e2) | (nh == e3) | (nh == e4) | (nh == e5) | (nh == e6) | (nh == H):
                # end of a segment: its column-bin sums go to every bin whose rows hold the segment (row h's bins)
                in_rows = ((h >= row_lo) & (h < row_hi) & valid).to(tl.float32)[None, :]
                add = tl.where(sel == 0, tl.sum(seg * m40, axis=1)[:, None], 0.0)
                add = tl.where(sel == 1, tl.sum(seg * m41, axis=1)[:, None], add)
                add = tl.where(sel == 2, tl.sum(seg * m42, axis=1)[:, None], add)
                add = tl.where(sel == 3, tl.sum(seg * m43, axis=1)[:, None], add)
                add = tl.where(sel == 4, tl.sum(seg * m20, axis=1)[:, None], add)
                add = tl.where(sel == 5, tl.sum(seg * m21, axis=1)[:, None], add)
                add = tl.where(sel == 6, tl.sum(seg, axis=1)[:, None], add)
                bins += add * in_rows
                seg = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)

    area = ((row_hi - row_lo) * (col_hi - col_lo) * 1.0)[None, :]
    scale = (tl.where(lvl == 4, scale4, tl.where(lvl == 2, scale2, scale1)) * valid.to(tl.float32))[None, :]
    pooled = bins / area  # pooled d of each bin
    part = scale_full * tl.sum(tl.sum(sq, axis=1), axis=0) + tl.sum(tl.sum(scale * pooled * pooled, axis=1), axis=0)
    tl.store(partial_ptr + pid, part)
    # dL/d(element) gets 2 scale_l pooled / area from every bin holding it. The backward sums the bins (i, j) with
    # j in a column's range [j_lo, j_hi] as prefix[j_hi] - prefix[j_lo - 1]: store prefix sums over j per row bin.
    coef = 2.0 * scale * pooled / area
    coef = tl.reshape(tl.cumsum(tl.reshape(coef, (BLOCK_C, 8, 4)), axis=2), (BLOCK_C, 32))
    # stored packed, 21 per plane: level 4 (i, j) at 4 i + j, level 2 (i, j) at 16 + 2 i + j, level 1 at 20
    packed = tl.where(k < 16, k, tl.where(k < 24, 16 + 2 * bi + bj, 20))[None, :]
    tl.store(coef_ptr + b * (21 * C) + packed * C + c_offs[:, None], coef, mask=c_mask[:, None] & valid[None, :])


@triton.jit
def _hcl_bwd_kernel(
    s_ptr,  # [B, C, H, W] student map (as in the forward)
    t_ptr,  # [B, C, H, W] teacher map
    gs_ptr,  # [B, C, H, W] out: dL/dfs, dtype of s_ptr, its own strides
    gt_ptr,  # [B, C, H, W] out: dL/dft = -dL/dfs, dtype of t_ptr, its own strides
    coef_ptr,  # [B, 21, C] fp32: the forward's prefix-summed bin coefficients
    gout_ptr,  # [] fp32: grad_output of the loss
    C,
    H,
    W,  # divided by W_ALIGN
    s_sb,  # strides as encoded by the launcher's _layout (see _strides)
    s_sc,
    s_sh,
    s_sw,
    t_sb,
    t_sc,
    t_sh,
    t_sw,
    gs_sb,
    gs_sc,
    gs_sh,
    gs_sw,
    gt_sb,
    gt_sc,
    gt_sh,
    gt_sw,
    scale_full,  # 1 / (N * total)
    S_LAYOUT: tl.constexpr,
    T_LAYOUT: tl.constexpr,
    GS_LAYOUT: tl.constexpr,
    GT_LAYOUT: tl.constexpr,
    W_ALIGN: tl.constexpr,
    WRITE_S: tl.constexpr,
    WRITE_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    W = W * W_ALIGN
    pid = tl.program_id(0)
    n_cblk = tl.cdiv(C, BLOCK_C)
    b = (pid // n_cblk).to(tl.int64)
    c_offs = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    s_sb, s_sc, s_sh, s_sw = _strides(s_sb, s_sc, s_sh, s_sw, S_LAYOUT)
    t_sb, t_sc, t_sh, t_sw = _strides(t_sb, t_sc, t_sh, t_sw, T_LAYOUT)
    gs_sb, gs_sc, gs_sh, gs_sw = _strides(gs_sb, gs_sc, gs_sh, gs_sw, GS_LAYOUT)
    gt_sb, gt_sc, gt_sh, gt_sw = _strides(gt_sb, gt_sc, gt_sh, gt_sw, GT_LAYOUT)
    s_plane = s_ptr + b * s_sb
    t_plane = t_ptr + b * t_sb
    gs_plane = gs_ptr + b * gs_sb
    gt_plane = gt_ptr + b * gt_sb

    g = tl.load(gout_ptr).to(tl.float32)
    k_full = 2.0 * scale_full * g
    cb = coef_ptr + b * (21 * C) + c_offs[:, None]  # [BLOCK_C, 1]: entry k of a plane at cb + k * C
    k_one = g * tl.load(cb + 20 * C, mask=c_mask[:, None], other=0.0)  # level 1: every element
    e1 = H // 4  # rows where the set of row bins changes (see the forward)
    e2 = (H + 3) // 4
    e3 = H // 2
    e4 = (H + 1) // 2
    e5 = (3 * H) // 4
    e6 = (3 * H + 3) // 4

    for w0 in range(0, W, BLOCK_W):
        w_offs = w0 + tl.arange(0, BLOCK_W)
        mask = c_mask[:, None] & (w_offs < W)[None, :]
        s_off = c_offs[:, None] * s_sc + w_offs[None, :] * s_sw
        t_off = c_offs[:, None] * t_sc + w_offs[None, :] * t_sw
        gs_off = c_offs[:, None] * gs_sc + w_offs[None, :] * gs_sw
        gt_off = c_offs[:, None] * gt_sc + w_offs[None, :] * gt_sw
        # the column bins holding column w: j in [j_lo, j_hi] (level 4, level 2)
        j4_hi = (((w_offs + 1) * 4 + W - 1) // W - 1)[None, :]
        j4_lo = ((w_offs * 4) // W)[None, :]
        j2_hi = (((w_offs + 1) * 2 + W - 1) // W - 1)[None, :]
        j2_lo = ((w_offs * 2) // W)[None, :]
        lo4 = mask & (j4_lo > 0)
        lo2 = mask & (j2_lo > 0)
        extra = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.float32)  # g * sum of the coefficients of the element's bins
        for h in tl.range(0, H, num_stages=NUM_STAGES):
            if (h == 0) | (h == e1) | (h == e2) | (h == e3) | (h == e4) | (h == e5) | (h == e6):
                # a new segment of rows: the row bins holding row h are i in [i_lo, i_hi], at most 2 at a used
                # level (l < H; a skipped level's coefficients are all 0)
                i4a = (h * 4) // H
                i4b = ((h + 1) * 4 + H - 1) // H - 1
                i2a = (h * 2) // H
                i2b = ((h + 1) * 2 + H - 1) // H - 1
                two4 = mask & (i4b > i4a)
                two2 = mask & (i2b > i2a)
                k4a = cb + (4 * i4a) * C
                k4b = cb + (4 * i4b) * C
                k2a = cb + (16 + 2 * i2a) * C
                k2b = cb + (16 + 2 * i2b) * C
                acc = tl.load(k4a + j4_hi * C, mask=mask, other=0.0)
                acc -= tl.load(k4a + (j4_lo - 1) * C, mask=lo4, other=0.0)
                acc += tl.load(k4b + j4_hi * C, mask=two4, other=0.0)
                acc -= tl.load(k4b + (j4_lo - 1) * C, mask=two4 & lo4, other=0.0)
                acc += tl.load(k2a + j2_hi * C, mask=mask, other=0.0)
                acc -= tl.load(k2a + (j2_lo - 1) * C, mask=lo2, other=0.0)
                acc += tl.load(k2b + j2_hi * C, mask=two2, other=0.0)
                acc -= tl.load(k2b + (j2_lo - 1) * C, mask=two2 & lo2, other=0.0)
                extra = acc * g + k_one
            x = tl.load(s_plane + h * s_sh + s_off, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(t_plane + h * t_sh + t_off, mask=mask, other=0.0).to(tl.float32)
            grad = (x - y) * k_full + extra
            if WRITE_S:
                tl.store(gs_plane + h * gs_sh + gs_off, grad.to(gs_ptr.dtype.element_ty), mask=mask)
            if WRITE_T:
                tl.store(gt_plane + h * gt_sh + gt_off, (-grad).to(gt_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _launch_config(b: int, c: int, w: int, channel_contiguous: bool, fill: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_W, NUM_STAGES, num_warps): a tile of up to 2048 elements and 128 channels, wide along the
    contiguous axis; with ``fill`` (a GPU), made narrower in channels while that leaves fewer than 4 programs per
    SM of a 132-SM H100 / H200. The row loop is software-pipelined NUM_STAGES deep (the loads of the next rows in
    flight, through shared memory)."""
    pc, pw = triton.next_power_of_2(c), triton.next_power_of_2(w)
    if channel_contiguous:  # tokens, channels_last: a row of W pixels is W runs of C channels
        block_w = min(pw, 64)
        block_c = min(pc, max(32, _TILE // block_w))
        min_c = 8
    else:  # NCHW: each (c, h) row is a run of W pixels
        block_w = min(pw, 128)
        block_c = min(pc, max(1, _TILE // block_w))
        min_c = 1
    block_c = min(block_c, _MAX_BLOCK_C)
    while fill and block_c > min_c and b * triton.cdiv(c, block_c) < _MIN_PROGRAMS:
        block_c //= 2
    num_warps = max(1, min(8, block_c * block_w // 128))
    return block_c, block_w, _NUM_STAGES, num_warps


def _w_align(w: int) -> int:
    return math.gcd(w, 16)


def fwd_maxnreg(block_c: int, num_warps: int) -> int:
    """The forward's register cap, 128 for every tile. Left to itself ptxas (triton 3.6) went past it (164 at
    ResNet-50's fp32-vs-bf16 channels_last 256 x 56 x 56 stage, 188 at 1024 x 14 x 14) or spilled to stay under it
    (16-32 bytes at 2048 x 7 x 7, 512 x 28 x 28, Swin's (B, 49, 768)); capped it takes <= 128 and spills nothing
    at every PAT stage and recorded step layout (the compile-only tests)."""
    return MAX_REGISTERS


MAX_REGISTERS = 128


_TILE = 2048  # elements of a row tile
_NUM_STAGES = 4  # the row loop's pipeline depth
# The forward's [BLOCK_C, 32] fp32 bin table is 16 registers a thread at 128 channels and 8 warps; 256 (ResNet-50's
# 2048 x 7 x 7 stage) spilled 8 bytes under the forward's 128-register cap
_MAX_BLOCK_C = 128
_MIN_PROGRAMS = 4 * 132  # was 512: 3.9 per SM (ResNet-50's stages at B = 64 launched exactly 512)


# The (C, H = W) of the four PAT stages at 224 (Swin-T tokens, ConvNeXt-T maps), at batch 128.
_PAT_STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]
# Every (BLOCK_C, BLOCK_W, NUM_STAGES, num_warps, channel_contiguous) those stages launch with; the compile-only test
# builds each.
COMPILE_CONFIGS = sorted({(*_launch_config(128, c, w, cc), cc) for c, w in _PAT_STAGES for cc in (True, False)})


def _as_map(x: torch.Tensor) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(B, C, H, W) and the four strides that address ``x`` in place as that map (tokens: see the module doc)."""
    if x.dim() == 4:
        return tuple(x.shape), tuple(x.stride())
    b, length, c = x.shape
    h = math.isqrt(length)
    w = length // h
    sb, sl, sc = x.stride()
    return (b, c, h, w), (sb, sc, w * sl, sl)


def _layout(x: torch.Tensor) -> tuple[tuple[int, int, int, int], int]:
    """``x``'s (b, c, h, w) strides as the kernels take them, and its LAYOUT constexpr (see the kernels'
    _strides): 4 A + unit, unit 1 if channels are contiguous, 2 if columns are, else 0; every other stride divided
    by A, the largest power of two <= 16 bytes / element size that divides them all (so a row of 56 bf16 pixels
    is known to start 16-byte aligned: vector loads)."""
    strides = _as_map(x)[1]
    unit = 1 if strides[1] == 1 else 2 if strides[3] == 1 else 0
    skip = {1: 1, 2: 3}.get(unit)  # the unit axis: passed as 1, a constexpr to the JIT
    a = 16 // x.element_size()
    while a > 1 and any(s % a for i, s in enumerate(strides) if i != skip):
        a //= 2
    return tuple(1 if i == skip else s // a for i, s in enumerate(strides)), 4 * a + unit


def _check(name: str, feat_s: torch.Tensor, feat_t: torch.Tensor) -> None:
    check_feature_pair(name, feat_s, feat_t)
    for which, x in (("student", feat_s), ("teacher", feat_t)):  # each in its own dtype: no common one needed
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name}: {which} dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if feat_s.device != feat_t.device:
        raise ValueError(
            f"{name}: student and teacher features are on different devices ({feat_s.device} and {feat_t.device})"
        )


def _check_device(name: str, device: torch.device) -> None:
    if device.type != "cuda" and isinstance(_hcl_fwd_kernel, JITFunction):
        raise ValueError(
            f"{name}: the Triton kernel needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before triton is "
            "imported to run it on the CPU, or use backend='reference'"
        )


def _scales(b: int, c: int, h: int, w: int) -> tuple[float, float, float, float]:
    """(1/(N total), w_4/(N_4 total), w_2/(N_2 total), w_1/(N_1 total)); 0 for a level skipped because l >= H."""
    weights, weight = {}, 1.0
    for level in HCL_LEVELS:
        if level < h:
            weight /= 2.0
            weights[level] = weight
    total = 1.0 + sum(weights.values())
    full = 1.0 / (b * c * h * w * total)
    return (full, *(weights.get(level, 0.0) / (b * c * level * level * total) for level in HCL_LEVELS))


def _plan(feat_s: torch.Tensor, fill: bool | None = None) -> tuple:
    """Launch parameters of one stage (plain ints, floats: torch.compile keeps them as constants on ctx):
    (programs, C, H, W, BLOCK_C, BLOCK_W, NUM_STAGES, num_warps, scales). ``fill``: as on a GPU (default: on
    CUDA)."""
    (b, c, h, w), strides = _as_map(feat_s)
    fill = feat_s.is_cuda if fill is None else fill
    block_c, block_w, stages, num_warps = _launch_config(b, c, w, strides[1] == 1, fill=fill)
    return (b * triton.cdiv(c, block_c), c, h, w, block_c, block_w, stages, num_warps, _scales(b, c, h, w))


def _forward(plan: tuple, fs: torch.Tensor, ft: torch.Tensor, coef: torch.Tensor, partials: torch.Tensor) -> None:
    programs, c, h, w, block_c, block_w, stages, num_warps, scales = plan
    (s_strides, s_layout), (t_strides, t_layout) = _layout(fs), _layout(ft)
    _hcl_fwd_kernel[(programs,)](
        fs, ft, coef, partials,
        c, h, w // _w_align(w),
        *s_strides,
        *t_strides,
        *scales,
        S_LAYOUT=s_layout, T_LAYOUT=t_layout, W_ALIGN=_w_align(w),
        BLOCK_C=block_c, BLOCK_W=block_w, NUM_STAGES=stages, num_warps=num_warps,
        maxnreg=fwd_maxnreg(block_c, num_warps),
    )  # fmt: skip


def _backward(
    plan: tuple, fs: torch.Tensor, ft: torch.Tensor, coef: torch.Tensor, g: torch.Tensor, need_s: bool, need_t: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    programs, c, h, w, block_c, block_w, stages, num_warps, scales = plan
    grad_s = torch.empty_like(fs) if need_s else None  # same layout as the input where it is dense
    grad_t = torch.empty_like(ft) if need_t else None
    gs = grad_s if need_s else grad_t  # a gradient not asked for is not written: any valid pointer will do
    gt = grad_t if need_t else grad_s
    layouts = [_layout(x) for x in (fs, ft, gs, gt)]
    _hcl_bwd_kernel[(programs,)](
        fs, ft, gs, gt, coef, g,
        c, h, w // _w_align(w),
        *(s for strides, _ in layouts for s in strides),
        scales[0],
        S_LAYOUT=layouts[0][1], T_LAYOUT=layouts[1][1], GS_LAYOUT=layouts[2][1], GT_LAYOUT=layouts[3][1],
        W_ALIGN=_w_align(w),
        WRITE_S=need_s, WRITE_T=need_t,
        BLOCK_C=block_c, BLOCK_W=block_w, NUM_STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
    return grad_s, grad_t


class _HclLoss(torch.autograd.Function):
    """Sum over stages of HCL; inputs are (feat_s_0, feat_t_0, feat_s_1, feat_t_1, ...)."""

    @staticmethod
    def forward(ctx, *feats: torch.Tensor) -> torch.Tensor:
        plans = tuple(_plan(feats[i]) for i in range(0, len(feats), 2))
        partials = torch.empty(sum(p[0] for p in plans), device=feats[0].device, dtype=torch.float32)
        coefs, offset = [], 0
        for i, plan in enumerate(plans):
            fs, ft = feats[2 * i], feats[2 * i + 1]
            coef = torch.empty((fs.shape[0], _NUM_COEFS, plan[1]), device=fs.device, dtype=torch.float32)
            _forward(plan, fs, ft, coef, partials[offset : offset + plan[0]])
            coefs.append(coef)
            offset += plan[0]
        ctx.plans = plans
        ctx.save_for_backward(*feats, *coefs)
        return partials.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = ctx.saved_tensors
        n = len(ctx.plans)
        # grad_output stays on the device: the kernel reads it (a 0-d fp32 tensor), the host never does
        g = grad_output if grad_output.dtype == torch.float32 else grad_output.float()
        grads: list[torch.Tensor | None] = []
        for i, plan in enumerate(ctx.plans):
            need_s, need_t = ctx.needs_input_grad[2 * i], ctx.needs_input_grad[2 * i + 1]
            if need_s or need_t:
                grads.extend(_backward(plan, saved[2 * i], saved[2 * i + 1], saved[2 * n + i], g, need_s, need_t))
            else:
                grads.extend((None, None))
        return tuple(grads)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def hcl_loss(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss of one stage -> float32 scalar (SPEC section 2).

    feat_s, feat_t: (B, C, H, W) maps (any strides) or (B, L, C) tokens (L = h * (L // h), h = floor(sqrt(L))),
    same shape and device, each float32 / float16 / bfloat16 (its own dtype). Differentiable in both; each
    gradient in its input's dtype.
    Launches: forward 2 (the fused kernel + a sum of its per-program partials), backward 1.
    """
    _check("hcl_loss", feat_s, feat_t)
    _check_device("hcl_loss", feat_s.device)
    return _HclLoss.apply(feat_s, feat_t)


def hcl_loss_stages(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over stages of ``hcl_loss(feats_s[i], feats_t[i])`` -> float32 scalar (PAT's loss_fd before its weight).

    Each pair follows ``hcl_loss``'s rules; stages may differ in shape, layout, rank and dtypes, but all must be on
    one device. Launches: forward S + 1 (one kernel per stage into one shared partials buffer, then a single
    sum), backward S (one per stage), against 3S - 1 forward launches for S separate ``hcl_loss`` calls and a sum.
    """
    feats_s, feats_t = list(feats_s), list(feats_t)
    if len(feats_s) != len(feats_t):
        raise ValueError(
            f"hcl_loss_stages: got {len(feats_s)} student and {len(feats_t)} teacher stages; they must pair up"
        )
    if not feats_s:
        raise ValueError("hcl_loss_stages: no stages given")
    for i, (fs, ft) in enumerate(zip(feats_s, feats_t)):
        _check(f"hcl_loss_stages (stage {i})", fs, ft)
        if fs.device != feats_s[0].device:
            raise ValueError(
                f"hcl_loss_stages: stage {i} is on {fs.device}, stage 0 on {feats_s[0].device}; all stages must be "
                "on one device"
            )
    _check_device("hcl_loss_stages", feats_s[0].device)
    return _HclLoss.apply(*(x for pair in zip(feats_s, feats_t) for x in pair))
