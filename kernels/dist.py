"""Fused Triton kernels for DIST (OFA-KD's ``dist_loss``), forward and backward.

``dist_loss(logits_s, logits_t, beta, gamma, T)`` -> fp32 scalar (patfast.kernels.reference.dist_loss_ref):
beta T^2 (1 - mean over rows of the Pearson correlation across classes of softmax(s/T), softmax(t/T)) +
gamma T^2 (1 - mean over classes of their correlation across the batch); eps 1e-8 in each divisor.
Grid: forward in six launches (issue 15), the ones over the logits on 2-D grids of (row tiles x class chunks), every
reduction across programs done by a later launch in a fixed order (no atomics: the same bits every run):
  1 kd.py's per-chunk kernel: softmax statistics (max, sum of exps) of s/T and t/T per row and class chunk;
  2 per tile: the row statistics merged from launch 1, p and q, the tile's share of the row moments and its
    column sums of p and q;
  3 merge: the class (batch) means, and the row correlations with their gradient coefficients;
  4 per tile: the centred class values p - mean, q - mean and the tile's share of their moments;
  5 merge: the class correlations (centring residual removed) with their gradient coefficients;
  6 one program: the loss from the correlation sums.
Grids sized for the device (as hcl.py's): on a GPU (CUDA tensors) the tiles of launches 1, 2 and 4 shrink until
there are >= 4 x 132 programs (PARTIAL_PROGRAMS, where the shape has the elements) and the merges take MERGE_LANES
lanes a program; for CPU tensors (the Triton interpreter, which pays per program) the tiles keep their largest size
and the merges take up to MERGE_TILE lanes: the fewest programs. The same kernels and rule otherwise.
forward_plan(b, k) lists the GPU's launches (grid, tiles, passes) for the performance model, forward_plan(b, k,
fill=False) the interpreter's. Backward a 1-D grid over row tiles, each owning whole rows (the softmax backward needs
a sum over the row): one pass when K fits one chunk, else two.
Each input fp32/fp16/bf16 in its own dtype, any row/class strides; fp32 arithmetic.
Traffic: forward reads each logit tensor 3 times (launches 1, 2, 4) plus fp32 partials of the order of
B K (3 / BLOCK_K + 7 / BLOCK_B) floats each way; backward once (twice for K > MAX_BLOCK_K) and writes the gradients
(B x K each). Not measured on GPU. Derivation and numerics: docs/kernels.md#dist.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_finite_number
from .kd import (
    MAX_BLOCK_K,
    MAX_PARTIAL_TILE,
    PARTIAL_PROGRAMS,
    _bwd_config,
    _check,
    _kl_partial_kernel,
    _layout,
    _partial_config,
)

__all__ = ["dist_loss", "forward_plan"]

EPS = 1e-8  # OFA-KD's eps in the divisor of each correlation (reference._pearson_rows)
_NROW = 7  # per row: m_s, 1/z_s, m_t, 1/z_t, then the row correlation's gradient coefficients c1, c2s, c2t
_NCOL = 7  # per class: batch means of p and q, their centring residuals, the class correlation's c1, c2s, c2t
MIN_TILE = 128  # elements per input of one program of launches 2 and 4 at least (kd's go down to 32) ...
MIN_BLOCK_K = 32  # ... and classes at least (where K has them)
MERGE_LANES = 32  # classes (rows) per program of the merge launches 3 and 5 on a GPU (MERGE_TILE without fill) ...
MERGE_TILE = 1024  # ... and partials x lanes per step
MERGE_WARPS = 4
LOSS_BLOCK = 1024  # partial sums per step of the one-program launch 6


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_scaled(ptr, r, cols, mask, stride_q, stride_k, inv_t, ALIGN: tl.constexpr):
    # logits / T of a [BLOCK_B, BLOCK_K] tile, in fp32 (the backward's; the forward's launches 2 and 4 write out
    # this expression and _softmax's, the same operations in the same order, so their p has the backward's bits)
    v = tl.load(ptr + r[:, None] * (stride_q * ALIGN) + cols[None, :] * stride_k, mask=mask, other=0.0)
    return v.to(tl.float32) * inv_t


@triton.jit
def _softmax(v, m, iz, ok):
    # softmax(v) of a tile from its row statistics: max m, iz = 1 / sum exp(v - m); 0 where ok is False.
    # exp(v - m) / z and not exp(v - m - log z): an exponent rounded at |v - m| + log z (log z ~ log K) instead of
    # |v - m| makes every probability a few times less exact, and the class correlations of near-constant classes
    # over a small batch amplify exactly that error (measured: 5-50x worse gradients at B = 2, 3)
    return tl.where(ok, tl.exp(tl.minimum(v - m[:, None], 0.0)) * iz[:, None], 0.0)


@triton.jit
def _corr_coefs(s_ab, s_aa, s_bb, weight, eps):
    # rho = s_ab / (|a| |b| + eps) of centred a, b from their sums, and weight * (d rho / d a = c1 b - c2a a,
    # d rho / d b = c1 a - c2b b); the norm terms vanish where a norm is 0 (as in PyTorch's norm backward)
    na = tl.sqrt(s_aa)
    nb = tl.sqrt(s_bb)
    den = na * nb + eps
    c1 = weight / den
    c2 = c1 * s_ab / den
    c2a = tl.where(na > 0.0, c2 * nb / tl.where(na > 0.0, na, 1.0), 0.0)
    c2b = tl.where(nb > 0.0, c2 * na / tl.where(nb > 0.0, nb, 1.0), 0.0)
    return s_ab / den, c1, c2a, c2b


@triton.jit
def _dist_probs_kernel(
    s_ptr,  # [B, K] student logits (fp32 / fp16 / bf16)
    t_ptr,  # [B, K] teacher logits (fp32 / fp16 / bf16)
    part_ptr,  # [n_part, 5, B] fp32: kd's _kl_partial_kernel statistics per class chunk (launch 1; w unused)
    row_ptr,  # [7, B] fp32 out, slots 0-3: m_s, 1/z_s, m_t, 1/z_t (stored by the programs of class chunk 0)
    rowpart_ptr,  # [n_chunks, 3, B] fp32 out: per class chunk and row, sum a^2, b^2, ab (a = p - 1/K, b = q - 1/K)
    colpart_ptr,  # [n_row_tiles, 2, K] fp32 out: per row tile and class, sum p, sum q over the tile's rows
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    temperature,  # T > 0
    N_PART: tl.constexpr,  # class chunks of launch 1
    PART_BLOCK: tl.constexpr,  # launch 1's chunks merged per step: >= N_PART (one step) unless K is large
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Launch 2, one BLOCK_B x BLOCK_K tile: the row statistics (merged from launch 1), the softmaxes, the tile's
    # share of the row moments and its column sums. No helper calls (each costs the interpreter ~1.5 ms); the
    # softmax is _softmax's expression, so p has the bits the backward computes.
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    inv_k = 1.0 / K
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    col_ok = cols < K
    r = tl.minimum(rows, B - 1).to(tl.int64)  # padding rows take the last row's statistics; masked below
    # The row statistics: launch 1's chunks as a [rows, chunks] tile, m the max over them and z the sum of
    # z_c exp(m_c - m). Every program of a row tile merges the same values in the same order: the same bits in each.
    # Padding rows merge the last row's (finite; never stored).
    if PART_BLOCK >= N_PART:  # one [rows, chunks] tile of them (always unless K > PART_BLOCK * MAX_BLOCK_K)
        c_ok = (tl.arange(0, PART_BLOCK) < N_PART)[None, :]
        offs = tl.arange(0, PART_BLOCK).to(tl.int64)[None, :] * (5 * B) + r[:, None]
        ms_c = tl.load(part_ptr + offs, mask=c_ok, other=float("-inf"))
        mt_c = tl.load(part_ptr + 2 * B + offs, mask=c_ok, other=float("-inf"))
        m_s = tl.max(ms_c, axis=1)
        m_t = tl.max(mt_c, axis=1)
        # masked chunks: z_c = 0 times exp(-inf) = 0
        z_s = tl.sum(tl.load(part_ptr + B + offs, mask=c_ok, other=0.0) * tl.exp(ms_c - m_s[:, None]), axis=1)
        z_t = tl.sum(tl.load(part_ptr + 3 * B + offs, mask=c_ok, other=0.0) * tl.exp(mt_c - m_t[:, None]), axis=1)
    else:  # groups of PART_BLOCK chunks, merged in order
        m_s = tl.full([BLOCK_B], float("-inf"), tl.float32)
        z_s = tl.zeros([BLOCK_B], dtype=tl.float32)
        m_t = tl.full([BLOCK_B], float("-inf"), tl.float32)
        z_t = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in range(0, N_PART, PART_BLOCK):
            cs = c0 + tl.arange(0, PART_BLOCK)
            c_ok = (cs < N_PART)[None, :]
            offs = cs.to(tl.int64)[None, :] * (5 * B) + r[:, None]
            ms_c = tl.load(part_ptr + offs, mask=c_ok, other=float("-inf"))
            mt_c = tl.load(part_ptr + 2 * B + offs, mask=c_ok, other=float("-inf"))
            gm_s = tl.maximum(tl.max(ms_c, axis=1), m_s)
            gm_t = tl.maximum(tl.max(mt_c, axis=1), m_t)
            gz_s = tl.sum(tl.load(part_ptr + B + offs, mask=c_ok, other=0.0) * tl.exp(ms_c - gm_s[:, None]), axis=1)
            gz_t = tl.sum(tl.load(part_ptr + 3 * B + offs, mask=c_ok, other=0.0) * tl.exp(mt_c - gm_t[:, None]),
                          axis=1)
            # the earlier groups rescaled (nothing before the first: m = -inf, z = 0)
            z_s = tl.where(m_s == float("-inf"), 0.0, z_s * tl.exp(m_s - gm_s)) + gz_s
            z_t = tl.where(m_t == float("-inf"), 0.0, z_t * tl.exp(m_t - gm_t)) + gz_t
            m_s = gm_s
            m_t = gm_t
    iz_s = 1.0 / z_s
    iz_t = 1.0 / z_t
    if chunk == 0:
        tl.store(row_ptr + rows, m_s, mask=row_ok)
        tl.store(row_ptr + B + rows, iz_s, mask=row_ok)
        tl.store(row_ptr + 2 * B + rows, m_t, mask=row_ok)
        tl.store(row_ptr + 3 * B + rows, iz_t, mask=row_ok)
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(s_ptr + r[:, None] * (s_stride_q * ALIGN) + cols[None, :] * s_stride_k, mask=ok,
                other=0.0).to(tl.float32) * inv_t  # _load_scaled
    u = tl.load(t_ptr + r[:, None] * (t_stride_q * ALIGN) + cols[None, :] * t_stride_k, mask=ok,
                other=0.0).to(tl.float32) * inv_t
    p = tl.where(ok, tl.exp(tl.minimum(x - m_s[:, None], 0.0)) * iz_s[:, None], 0.0)  # _softmax
    q = tl.where(ok, tl.exp(tl.minimum(u - m_t[:, None], 0.0)) * iz_t[:, None], 0.0)
    a = tl.where(ok, p - inv_k, 0.0)  # row-centred: a softmax's row mean is exactly 1 / K
    b = tl.where(ok, q - inv_k, 0.0)
    rp = rowpart_ptr + chunk.to(tl.int64) * (3 * B) + rows
    tl.store(rp, tl.sum(a * a, axis=1), mask=row_ok)
    tl.store(rp + B, tl.sum(b * b, axis=1), mask=row_ok)
    tl.store(rp + 2 * B, tl.sum(a * b, axis=1), mask=row_ok)
    cp = colpart_ptr + tile.to(tl.int64) * (2 * K) + cols
    tl.store(cp, tl.sum(p, axis=0), mask=col_ok)
    tl.store(cp + K, tl.sum(q, axis=0), mask=col_ok)


@triton.jit
def _sum_parts(ptr, n_parts, stride_part, lanes, lane_ok, BLOCK_P: tl.constexpr):
    # sum over n_parts partials (part i at ptr + i * stride_part + lane) of each lane, BLOCK_P parts per step, in a
    # fixed order
    acc = tl.zeros(lanes.shape, dtype=tl.float32)
    for i0 in range(0, n_parts, BLOCK_P):
        ps = i0 + tl.arange(0, BLOCK_P)
        ok = (ps < n_parts)[:, None] & lane_ok[None, :]
        acc += tl.sum(tl.load(ptr + ps.to(tl.int64)[:, None] * stride_part + lanes[None, :], mask=ok, other=0.0),
                      axis=0)
    return acc


@triton.jit
def _dist_means_rows_kernel(
    rowpart_ptr,  # [n_chunks, 3, B] fp32: launch 2's row moments per class chunk
    colpart_ptr,  # [n_row_tiles, 2, K] fp32: launch 2's column sums per row tile
    row_ptr,  # [7, B] fp32 out, slots 4-6: the row correlation's c1, c2s, c2t (times beta T^2 / B)
    col_ptr,  # [7, K] fp32 out, slots 0-1: the batch means of p and q
    rho_ptr,  # [n_row_programs] fp32 out: each row program's sum of row correlations
    B,  # rows
    K,  # classes
    n_row_tiles,  # launch 2's row tiles
    n_chunks,  # launch 2's class chunks
    n_col_programs,  # programs 0 .. n_col_programs - 1 take classes, the rest rows
    beta,  # weight of the inter-class (rows) term
    temperature,  # T > 0
    eps,  # 1e-8
    BLOCK_C: tl.constexpr,  # classes per class program ...
    BLOCK_T: tl.constexpr,  # ... summing BLOCK_T row tiles per step
    BLOCK_R: tl.constexpr,  # rows per row program ...
    BLOCK_N: tl.constexpr,  # ... summing BLOCK_N class chunks per step
):
    # Launch 3: the fixed-order merge of launch 2's partials, class means and row correlations.
    pid = tl.program_id(0)
    if pid < n_col_programs:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < K
        sum_p = _sum_parts(colpart_ptr, n_row_tiles, 2 * K, cols, col_ok, BLOCK_T)
        sum_q = _sum_parts(colpart_ptr + K, n_row_tiles, 2 * K, cols, col_ok, BLOCK_T)
        tl.store(col_ptr + cols, sum_p / B, mask=col_ok)
        tl.store(col_ptr + K + cols, sum_q / B, mask=col_ok)
    else:
        rows = (pid - n_col_programs) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        s_aa = _sum_parts(rowpart_ptr, n_chunks, 3 * B, rows, row_ok, BLOCK_N)
        s_bb = _sum_parts(rowpart_ptr + B, n_chunks, 3 * B, rows, row_ok, BLOCK_N)
        s_ab = _sum_parts(rowpart_ptr + 2 * B, n_chunks, 3 * B, rows, row_ok, BLOCK_N)
        w_row = beta * (temperature * temperature) / B
        rho, c1, c2a, c2b = _corr_coefs(s_ab, s_aa, s_bb, w_row, eps)
        tl.store(row_ptr + 4 * B + rows, c1, mask=row_ok)
        tl.store(row_ptr + 5 * B + rows, c2a, mask=row_ok)
        tl.store(row_ptr + 6 * B + rows, c2b, mask=row_ok)
        tl.store(rho_ptr + (pid - n_col_programs), tl.sum(tl.where(row_ok, rho, 0.0), axis=0))


@triton.jit
def _dist_moments_kernel(
    s_ptr,  # [B, K] student logits (as in launch 2)
    t_ptr,  # [B, K] teacher logits
    row_ptr,  # [7, B] fp32: slots 0-3 (launch 2)
    col_ptr,  # [7, K] fp32: slots 0-1, the batch means (launch 3)
    movpart_ptr,  # [n_row_tiles, 5, K] fp32 out: per row tile and class, sum ca, cb, ca^2, cb^2, ca cb
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    temperature,  # T > 0
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Launch 4 (no helper calls, as launch 2), the second pass over the batch for the class moments, given the
    # batch means: the centred values ca = p - mean_p, cb = q - mean_q, exactly as the backward forms them (p from
    # the stored row statistics by _softmax's expression), and the tile's share of their sums and moments. Launch 5
    # makes their batch means res (0 in exact arithmetic, a rounding residual in fp32) and the moments of ca - res,
    # cb - res. The backward centres by (p - mean_p) - res_p: its vectors then sum to ~0 and are the ones these
    # moments describe, as autograd's centring backward subtracts the gradient's mean. Without that, where a class
    # correlation's divisor is tiny (near-constant classes, small batches) its huge coefficient times the residual
    # dominated the gradient.
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    tile = tl.program_id(0)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    col_ok = cols < K
    r = tl.minimum(rows, B - 1).to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    mean_p = tl.load(col_ptr + cols, mask=col_ok, other=0.0)
    mean_q = tl.load(col_ptr + K + cols, mask=col_ok, other=0.0)
    x = tl.load(s_ptr + r[:, None] * (s_stride_q * ALIGN) + cols[None, :] * s_stride_k, mask=ok,
                other=0.0).to(tl.float32) * inv_t  # _load_scaled
    u = tl.load(t_ptr + r[:, None] * (t_stride_q * ALIGN) + cols[None, :] * t_stride_k, mask=ok,
                other=0.0).to(tl.float32) * inv_t
    m_s = tl.load(row_ptr + r)
    iz_s = tl.load(row_ptr + B + r)
    m_t = tl.load(row_ptr + 2 * B + r)
    iz_t = tl.load(row_ptr + 3 * B + r)
    p = tl.where(ok, tl.exp(tl.minimum(x - m_s[:, None], 0.0)) * iz_s[:, None], 0.0)  # _softmax: launch 2's p
    q = tl.where(ok, tl.exp(tl.minimum(u - m_t[:, None], 0.0)) * iz_t[:, None], 0.0)
    ca = tl.where(ok, p - mean_p[None, :], 0.0)
    cb = tl.where(ok, q - mean_q[None, :], 0.0)
    mp = movpart_ptr + tile.to(tl.int64) * (5 * K) + cols
    tl.store(mp, tl.sum(ca, axis=0), mask=col_ok)
    tl.store(mp + K, tl.sum(cb, axis=0), mask=col_ok)
    tl.store(mp + 2 * K, tl.sum(ca * ca, axis=0), mask=col_ok)
    tl.store(mp + 3 * K, tl.sum(cb * cb, axis=0), mask=col_ok)
    tl.store(mp + 4 * K, tl.sum(ca * cb, axis=0), mask=col_ok)


@triton.jit
def _dist_classes_kernel(
    movpart_ptr,  # [n_row_tiles, 5, K] fp32: launch 4's partials
    col_ptr,  # [7, K] fp32 out, slots 2-6: the centring residuals of p and q, the class correlation's c1, c2s, c2t
    rho_ptr,  # [n_col_programs] fp32 out: each program's sum of class correlations
    B,  # rows
    K,  # classes
    n_row_tiles,  # launch 4's row tiles
    gamma,  # weight of the intra-class (classes) term
    temperature,  # T > 0
    eps,  # 1e-8
    BLOCK_C: tl.constexpr,  # classes per program ...
    BLOCK_T: tl.constexpr,  # ... summing BLOCK_T row tiles per step
):
    # Launch 5: the fixed-order merge of launch 4's partials into the class correlations.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < K
    s_a = _sum_parts(movpart_ptr, n_row_tiles, 5 * K, cols, col_ok, BLOCK_T)
    s_b = _sum_parts(movpart_ptr + K, n_row_tiles, 5 * K, cols, col_ok, BLOCK_T)
    s_aa = _sum_parts(movpart_ptr + 2 * K, n_row_tiles, 5 * K, cols, col_ok, BLOCK_T)
    s_bb = _sum_parts(movpart_ptr + 3 * K, n_row_tiles, 5 * K, cols, col_ok, BLOCK_T)
    s_ab = _sum_parts(movpart_ptr + 4 * K, n_row_tiles, 5 * K, cols, col_ok, BLOCK_T)
    res_p = s_a / B
    res_q = s_b / B
    m_pp = tl.maximum(s_aa - s_a * res_p, 0.0)  # sum (ca - res)^2; res is rounding-sized, no cancellation
    m_qq = tl.maximum(s_bb - s_b * res_q, 0.0)
    m_pq = s_ab - s_a * res_q
    w_col = gamma * (temperature * temperature) / K
    rho, c1, c2a, c2b = _corr_coefs(m_pq, m_pp, m_qq, w_col, eps)
    tl.store(col_ptr + 2 * K + cols, res_p, mask=col_ok)
    tl.store(col_ptr + 3 * K + cols, res_q, mask=col_ok)
    tl.store(col_ptr + 4 * K + cols, c1, mask=col_ok)
    tl.store(col_ptr + 5 * K + cols, c2a, mask=col_ok)
    tl.store(col_ptr + 6 * K + cols, c2b, mask=col_ok)
    tl.store(rho_ptr + tl.program_id(0), tl.sum(tl.where(col_ok, rho, 0.0), axis=0))


@triton.jit
def _dist_loss_kernel(
    rho_ptr,  # [n_row_parts + n_col_parts] fp32: launch 3's row-correlation sums, then launch 5's class sums
    loss_ptr,  # [] fp32 out
    B,  # rows
    K,  # classes
    n_row_parts, n_col_parts,
    beta, gamma,  # weights of the inter-class (rows) and intra-class (classes) terms
    temperature,  # T > 0
    BLOCK: tl.constexpr,
):
    # Launch 6, ONE program: the two correlation sums in a fixed order, the loss written once.
    idx = tl.arange(0, BLOCK)
    acc_rows = tl.zeros([BLOCK], dtype=tl.float32)
    acc_cols = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n_row_parts, BLOCK):
        acc_rows += tl.load(rho_ptr + i0 + idx, mask=i0 + idx < n_row_parts, other=0.0)
    for i0 in range(0, n_col_parts, BLOCK):
        acc_cols += tl.load(rho_ptr + n_row_parts + i0 + idx, mask=i0 + idx < n_col_parts, other=0.0)
    t2 = temperature * temperature
    inter = 1.0 - tl.sum(acc_rows, axis=0) / B
    intra = 1.0 - tl.sum(acc_cols, axis=0) / K
    tl.store(loss_ptr, beta * t2 * inter + gamma * t2 * intra)


@triton.jit
def _dist_grad_tile(s_ptr, t_ptr, col_ptr, r, cols, ok, K, s_stride_q, t_stride_q, s_stride_k, t_stride_k,
                    m_s, iz_s, m_t, iz_t, rc1, rc2a, rc2b, inv_t, inv_k, ALIGN: tl.constexpr):
    # (p, q, dL/dp, dL/dq) on a tile: dL/dp = -(d rho_row / dp + d rho_class / dp), their weights folded in
    p = _softmax(_load_scaled(s_ptr, r, cols, ok, s_stride_q, s_stride_k, inv_t, ALIGN), m_s, iz_s, ok)
    q = _softmax(_load_scaled(t_ptr, r, cols, ok, t_stride_q, t_stride_k, inv_t, ALIGN), m_t, iz_t, ok)
    col_ok = cols < K
    mean_p = tl.load(col_ptr + cols, mask=col_ok, other=0.0)
    mean_q = tl.load(col_ptr + K + cols, mask=col_ok, other=0.0)
    res_p = tl.load(col_ptr + 2 * K + cols, mask=col_ok, other=0.0)
    res_q = tl.load(col_ptr + 3 * K + cols, mask=col_ok, other=0.0)
    cc1 = tl.load(col_ptr + 4 * K + cols, mask=col_ok, other=0.0)
    cc2a = tl.load(col_ptr + 5 * K + cols, mask=col_ok, other=0.0)
    cc2b = tl.load(col_ptr + 6 * K + cols, mask=col_ok, other=0.0)
    a = p - inv_k  # row-centred
    b = q - inv_k
    ca = (p - mean_p[None, :]) - res_p[None, :]  # batch-centred, the rounding residual of the centring removed
    cb = (q - mean_q[None, :]) - res_q[None, :]
    gp = -((rc1[:, None] * b - rc2a[:, None] * a) + (cc1[None, :] * cb - cc2a[None, :] * ca))
    gq = -((rc1[:, None] * a - rc2b[:, None] * b) + (cc1[None, :] * ca - cc2b[None, :] * cb))
    return p, q, tl.where(ok, gp, 0.0), tl.where(ok, gq, 0.0)


@triton.jit
def _dist_bwd_kernel(
    s_ptr,  # [B, K] student logits (as in the forward)
    t_ptr,  # [B, K] teacher logits
    row_ptr,  # [7, B] fp32 per-row statistics written by the forward
    col_ptr,  # [7, K] fp32 per-class statistics written by the forward
    g_ptr,  # [] fp32 upstream gradient (device memory)
    ds_ptr,  # [B, K] out, contiguous, dtype of s (written only when GRAD_S)
    dt_ptr,  # [B, K] out, contiguous, dtype of t (written only when GRAD_T)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    temperature,  # T > 0
    ONE_CHUNK: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    inv_k = 1.0 / K
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    r = rows.to(tl.int64)
    m_s = tl.load(row_ptr + rows, mask=row_ok, other=0.0)
    iz_s = tl.load(row_ptr + B + rows, mask=row_ok, other=0.0)
    m_t = tl.load(row_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    iz_t = tl.load(row_ptr + 3 * B + rows, mask=row_ok, other=0.0)
    rc1 = tl.load(row_ptr + 4 * B + rows, mask=row_ok, other=0.0)
    rc2a = tl.load(row_ptr + 5 * B + rows, mask=row_ok, other=0.0)
    rc2b = tl.load(row_ptr + 6 * B + rows, mask=row_ok, other=0.0)
    c = tl.load(g_ptr).to(tl.float32) * inv_t
    cols0 = tl.arange(0, BLOCK_K)
    # the softmax backward: d/dx = p (dL/dp - sum_row p dL/dp); the row sums first
    sum_p = tl.zeros([BLOCK_B], dtype=tl.float32)
    sum_q = tl.zeros([BLOCK_B], dtype=tl.float32)
    if ONE_CHUNK:
        ok = row_ok[:, None] & (cols0 < K)[None, :]
        p, q, gp, gq = _dist_grad_tile(s_ptr, t_ptr, col_ptr, r, cols0, ok, K, s_stride_q, t_stride_q, s_stride_k,
                                       t_stride_k, m_s, iz_s, m_t, iz_t, rc1, rc2a, rc2b, inv_t, inv_k, ALIGN)
        out_offs = r[:, None] * K + cols0[None, :]  # the gradients are contiguous [B, K]
        if GRAD_S:
            ds = c * p * (gp - tl.sum(p * gp, axis=1)[:, None])
            tl.store(ds_ptr + out_offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)
        if GRAD_T:
            dt = c * q * (gq - tl.sum(q * gq, axis=1)[:, None])
            tl.store(dt_ptr + out_offs, dt.to(dt_ptr.dtype.element_ty), mask=ok)
    else:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            ok = row_ok[:, None] & (cols < K)[None, :]
            p, q, gp, gq = _dist_grad_tile(s_ptr, t_ptr, col_ptr, r, cols, ok, K, s_stride_q, t_stride_q,
                                           s_stride_k, t_stride_k, m_s, iz_s, m_t, iz_t, rc1, rc2a, rc2b, inv_t,
                                           inv_k, ALIGN)
            sum_p += tl.sum(p * gp, axis=1)
            sum_q += tl.sum(q * gq, axis=1)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            ok = row_ok[:, None] & (cols < K)[None, :]
            p, q, gp, gq = _dist_grad_tile(s_ptr, t_ptr, col_ptr, r, cols, ok, K, s_stride_q, t_stride_q,
                                           s_stride_k, t_stride_k, m_s, iz_s, m_t, iz_t, rc1, rc2a, rc2b, inv_t,
                                           inv_k, ALIGN)
            out_offs = r[:, None] * K + cols[None, :]
            if GRAD_S:
                ds = c * p * (gp - sum_p[:, None])
                tl.store(ds_ptr + out_offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)
            if GRAD_T:
                dt = c * q * (gq - sum_q[:, None])
                tl.store(dt_ptr + out_offs, dt.to(dt_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration (plain functions of the shape, also used by forward_plan and the compile-only tests)
# ----------------------------------------------------------------------------------------------------------------


def _one_chunk(k: int) -> bool:
    return triton.next_power_of_2(k) <= MAX_BLOCK_K


def _tile_shape(b: int, k: int, tile: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_K) of a square-ish tile of ``tile`` elements: about sqrt(tile) classes (at least MIN_BLOCK_K
    where K has them), more where the batch is short."""
    k2, b2 = triton.next_power_of_2(k), triton.next_power_of_2(b)
    side = 1 << (tile.bit_length() // 2)  # sqrt(tile), rounded down to a power of two
    block_k = min(k2, MAX_BLOCK_K, max(MIN_BLOCK_K, side))
    block_b = max(1, min(b2, tile // block_k))
    return block_b, min(k2, MAX_BLOCK_K, max(block_k, tile // block_b))


def _part_config(b: int, k: int, fill: bool = True) -> dict:
    """Tile of one program of launch 1 (kd's per-chunk kernel). ``fill`` (a GPU): kd._partial_config's, shrunk
    until there are PARTIAL_PROGRAMS programs; else (the interpreter, which pays per program) the same rule without
    the shrinking: MAX_PARTIAL_TILE elements, chunks of up to MAX_BLOCK_K classes (what _partial_config gives where
    the shape has the elements for PARTIAL_PROGRAMS such tiles)."""
    if fill:
        return _partial_config(b, k)
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_b = max(1, min(MAX_PARTIAL_TILE // block_k, triton.next_power_of_2(b)))
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "num_warps": max(1, min(4, block_b * block_k // 256))}


def _tile_config(b: int, k: int, fill: bool = True) -> dict:
    """Tile of one program of launches 2 and 4; the grid is (cdiv(B, BLOCK_B), cdiv(K, BLOCK_K)).

    kd._partial_config's rule for the size (2048 elements, halved while the grid has fewer than PARTIAL_PROGRAMS
    programs, with ``fill`` only: a GPU; the interpreter keeps 2048) but down to MIN_TILE only, and square-ish
    rather than one row wide: these launches reduce along both axes, and their partials are
    B K (3 / BLOCK_K + 2 / BLOCK_B) floats (launch 2: row moments per class chunk, column sums per row tile) and
    5 B K / BLOCK_B (launch 4): one-row tiles would write 2.5 times as many floats as they read logits."""
    tile = MAX_PARTIAL_TILE
    block_b, block_k = _tile_shape(b, k, tile)
    while fill and tile > MIN_TILE and triton.cdiv(b, block_b) * triton.cdiv(k, block_k) < PARTIAL_PROGRAMS:
        tile //= 2
        block_b, block_k = _tile_shape(b, k, tile)
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "num_warps": max(1, min(4, block_b * block_k // 256))}


def _merge_blocks(n_parts: int, n_lanes: int, fill: bool = True) -> tuple[int, int]:
    """(lanes per merge program, partials per step) for a sum of n_parts partials of each of n_lanes lanes; with
    ``fill`` (a GPU) MERGE_LANES lanes a program, for many programs, else (the interpreter) up to MERGE_TILE."""
    lanes = min(triton.next_power_of_2(n_lanes), MERGE_LANES if fill else MERGE_TILE)
    return lanes, min(triton.next_power_of_2(n_parts), max(1, MERGE_TILE // lanes))


def _plan(b: int, k: int, fill: bool = True) -> dict:
    """Every forward launch's tiles and grid at (B, K) (the launcher, forward_plan and the tests read this).
    ``fill``: tiles shrunk for >= PARTIAL_PROGRAMS programs in each launch over the logits (a GPU); without it
    the largest tiles, the fewest programs (the interpreter: CPU tensors)."""
    part, tile = _part_config(b, k, fill), _tile_config(b, k, fill)
    n_part = triton.cdiv(k, part["BLOCK_K"])
    n_row_tiles, n_chunks = triton.cdiv(b, tile["BLOCK_B"]), triton.cdiv(k, tile["BLOCK_K"])
    block_c, block_t = _merge_blocks(n_row_tiles, k, fill)
    block_r, block_n = _merge_blocks(n_chunks, b, fill)
    n_col_programs, n_row_programs = triton.cdiv(k, block_c), triton.cdiv(b, block_r)
    return {
        "part": part, "n_part": n_part, "part_block": min(triton.next_power_of_2(n_part),
                                                          max(1, MERGE_TILE // tile["BLOCK_B"])),
        "tile": tile, "n_row_tiles": n_row_tiles, "n_chunks": n_chunks,
        "merge": {"BLOCK_C": block_c, "BLOCK_T": block_t, "BLOCK_R": block_r, "BLOCK_N": block_n},
        "n_col_programs": n_col_programs, "n_row_programs": n_row_programs,
        "loss_block": min(triton.next_power_of_2(max(n_col_programs, n_row_programs)), LOSS_BLOCK),
    }


def forward_plan(b: int, k: int, dtype: torch.dtype = torch.float32, fill: bool = True) -> list[dict]:
    """The forward's launches at contiguous (B, K) logits of ``dtype`` (both inputs), in launch order, for the
    performance model (``fill``: as on a GPU, the default; False: as for CPU tensors, the interpreter's larger
    tiles): one dict per launch,

        kernel       the @triton.jit function launched
        name         what it does
        programs     grid size
        num_warps
        constexprs   the tl.constexpr values the launcher passes (the JIT also makes a unit class stride constexpr)
        read_bytes_per_elem_pass   how many times the launch reads each logit tensor (0 or 1)
        steps        serial loop iterations per program (its tile loads per step)
        tile         elements per input (logits, or partials for the merges) per step
        stat_read_bytes, stat_write_bytes   its fp32 traffic besides the logits (statistics and partials; launch 2's
                     per-row merge of launch 1's chunks is counted once per program that does it)
    """
    pl = _plan(b, k, fill)
    x = torch.empty((b, k), device="meta", dtype=dtype)
    align = _layout((x, x))[0]
    part, tile, mg = pl["part"], pl["tile"], pl["merge"]
    rt, nc, n_part = pl["n_row_tiles"], pl["n_chunks"], pl["n_part"]
    ncp, nrp = pl["n_col_programs"], pl["n_row_programs"]
    n_tiles = rt * nc
    return [
        {"kernel": _kl_partial_kernel, "name": "dist fwd 1: per-chunk softmax statistics (kd.py's kernel)",
         "programs": triton.cdiv(b, part["BLOCK_B"]) * n_part, "num_warps": part["num_warps"],
         "constexprs": {"PAIR": False, "T_IS_ONE": False, "EXCLUDE_TARGET": False, "ALIGN": align,
                        "BLOCK_B": part["BLOCK_B"], "BLOCK_K": part["BLOCK_K"]},
         "read_bytes_per_elem_pass": 1, "steps": 1, "tile": part["BLOCK_B"] * part["BLOCK_K"],
         "stat_read_bytes": 0, "stat_write_bytes": 4 * 5 * n_part * b},
        {"kernel": _dist_probs_kernel, "name": "dist fwd 2: softmaxes, row moments and column sums per tile",
         "programs": n_tiles, "num_warps": tile["num_warps"],
         "constexprs": {"N_PART": n_part, "PART_BLOCK": pl["part_block"], "ALIGN": align, "BLOCK_B": tile["BLOCK_B"],
                        "BLOCK_K": tile["BLOCK_K"]},
         "read_bytes_per_elem_pass": 1, "steps": 1, "tile": tile["BLOCK_B"] * tile["BLOCK_K"],
         "stat_read_bytes": 4 * 4 * n_part * tile["BLOCK_B"] * n_tiles,
         "stat_write_bytes": 4 * (4 * b + 3 * nc * b + 2 * rt * k)},
        {"kernel": _dist_means_rows_kernel, "name": "dist fwd 3: merge: class means, row correlations",
         "programs": ncp + nrp, "num_warps": MERGE_WARPS, "constexprs": dict(mg),
         "read_bytes_per_elem_pass": 0,
         "steps": max(triton.cdiv(rt, mg["BLOCK_T"]), triton.cdiv(nc, mg["BLOCK_N"])),
         "tile": max(mg["BLOCK_T"] * mg["BLOCK_C"], mg["BLOCK_N"] * mg["BLOCK_R"]),
         "stat_read_bytes": 4 * (3 * nc * b + 2 * rt * k), "stat_write_bytes": 4 * (3 * b + 2 * k + nrp)},
        {"kernel": _dist_moments_kernel, "name": "dist fwd 4: centred class moments per tile",
         "programs": n_tiles, "num_warps": tile["num_warps"],
         "constexprs": {"ALIGN": align, "BLOCK_B": tile["BLOCK_B"], "BLOCK_K": tile["BLOCK_K"]},
         "read_bytes_per_elem_pass": 1, "steps": 1, "tile": tile["BLOCK_B"] * tile["BLOCK_K"],
         "stat_read_bytes": 4 * (4 * tile["BLOCK_B"] + 2 * tile["BLOCK_K"]) * n_tiles,
         "stat_write_bytes": 4 * 5 * rt * k},
        {"kernel": _dist_classes_kernel, "name": "dist fwd 5: merge: class correlations",
         "programs": ncp, "num_warps": MERGE_WARPS,
         "constexprs": {"BLOCK_C": mg["BLOCK_C"], "BLOCK_T": mg["BLOCK_T"]},
         "read_bytes_per_elem_pass": 0, "steps": triton.cdiv(rt, mg["BLOCK_T"]),
         "tile": mg["BLOCK_T"] * mg["BLOCK_C"],
         "stat_read_bytes": 4 * 5 * rt * k, "stat_write_bytes": 4 * (5 * k + ncp)},
        {"kernel": _dist_loss_kernel, "name": "dist fwd 6: the loss (one program)",
         "programs": 1, "num_warps": MERGE_WARPS, "constexprs": {"BLOCK": pl["loss_block"]},
         "read_bytes_per_elem_pass": 0,
         "steps": triton.cdiv(nrp, pl["loss_block"]) + triton.cdiv(ncp, pl["loss_block"]),
         "tile": pl["loss_block"], "stat_read_bytes": 4 * (nrp + ncp), "stat_write_bytes": 4},
    ]


def _forward(s, t, beta: float, gamma: float, temperature: float, fill: bool | None = None):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    pl = _plan(b, k, s.is_cuda if fill is None else fill)
    part, tile, mg = pl["part"], pl["tile"], pl["merge"]
    rt, nc, n_part = pl["n_row_tiles"], pl["n_chunks"], pl["n_part"]
    ncp, nrp = pl["n_col_programs"], pl["n_row_programs"]
    f32 = {"device": s.device, "dtype": torch.float32}
    loss = torch.empty((), **f32)
    row_stats = torch.empty((_NROW, b), **f32)
    col_stats = torch.empty((_NCOL, k), **f32)
    partials = torch.empty((n_part, 5, b), **f32)
    row_parts = torch.empty((nc, 3, b), **f32)
    col_sums = torch.empty((rt, 2, k), **f32)
    moments = torch.empty((rt, 5, k), **f32)
    rho = torch.empty((nrp + ncp,), **f32)
    # 1: kd's per-chunk softmax statistics of s/T and t/T (its w slot unused)
    _kl_partial_kernel[(triton.cdiv(b, part["BLOCK_B"]), n_part)](
        s, t, s, partials, partials, b, k // align, *row_q, row_q[0], *col, col[0], 0, temperature,
        PAIR=False, T_IS_ONE=False, EXCLUDE_TARGET=False,
        ALIGN=align, BLOCK_B=part["BLOCK_B"], BLOCK_K=part["BLOCK_K"], num_warps=part["num_warps"],
    )
    # 2: row statistics, softmaxes, row moments per class chunk, column sums per row tile
    _dist_probs_kernel[(rt, nc)](
        s, t, partials, row_stats, row_parts, col_sums, b, k // align, *row_q, *col, temperature,
        N_PART=n_part, PART_BLOCK=pl["part_block"], ALIGN=align, BLOCK_B=tile["BLOCK_B"], BLOCK_K=tile["BLOCK_K"],
        num_warps=tile["num_warps"],
    )
    # 3: class means, row correlations
    _dist_means_rows_kernel[(ncp + nrp,)](
        row_parts, col_sums, row_stats, col_stats, rho, b, k, rt, nc, ncp, beta, temperature, EPS,
        **mg, num_warps=MERGE_WARPS,
    )
    # 4: centred class moments per row tile
    _dist_moments_kernel[(rt, nc)](
        s, t, row_stats, col_stats, moments, b, k // align, *row_q, *col, temperature,
        ALIGN=align, BLOCK_B=tile["BLOCK_B"], BLOCK_K=tile["BLOCK_K"], num_warps=tile["num_warps"],
    )
    # 5: class correlations
    _dist_classes_kernel[(ncp,)](
        moments, col_stats, rho[nrp:], b, k, rt, gamma, temperature, EPS,
        BLOCK_C=mg["BLOCK_C"], BLOCK_T=mg["BLOCK_T"], num_warps=MERGE_WARPS,
    )
    # 6: the loss
    _dist_loss_kernel[(1,)](rho, loss, b, k, nrp, ncp, beta, gamma, temperature, BLOCK=pl["loss_block"],
                            num_warps=MERGE_WARPS)
    return loss, row_stats, col_stats


def _backward(s, t, row_stats, col_stats, g, temperature: float, grad_s: bool, grad_t: bool):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    ds = torch.empty((b, k), device=s.device, dtype=s.dtype) if grad_s else None
    dt = torch.empty((b, k), device=t.device, dtype=t.dtype) if grad_t else None
    cfg = _bwd_config(b, k)
    _dist_bwd_kernel[(triton.cdiv(b, cfg["BLOCK_B"]),)](
        s, t, row_stats, col_stats, g.to(torch.float32), ds if grad_s else row_stats, dt if grad_t else row_stats,
        b, k // align, *row_q, *col, temperature,
        ONE_CHUNK=_one_chunk(k), GRAD_S=grad_s, GRAD_T=grad_t,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    return ds, dt


class _DISTLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_t, beta, gamma, temperature, fill=None):
        # fill: the GPU's tiles (True) or the interpreter's (False); default: by the device (_plan)
        loss, row_stats, col_stats = _forward(logits_s, logits_t, beta, gamma, temperature, fill)
        ctx.save_for_backward(logits_s, logits_t, row_stats, col_stats)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s, t, row_stats, col_stats = ctx.saved_tensors
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (grad_s or grad_t):
            return None, None, None, None, None, None
        ds, dt = _backward(s, t, row_stats, col_stats, grad_loss, ctx.temperature, grad_s, grad_t)
        return ds, dt, None, None, None, None


def dist_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST: beta T^2 (1 - mean row correlation) + gamma T^2 (1 - mean class correlation) -> fp32 scalar, fused.

    logits_s, logits_t: (B, K), same shape and device, each float32 / float16 / bfloat16 in its own dtype; any
    strides. B = 1 or K = 1 are allowed (a correlation of zero-variance vectors is 0, as in the reference).
    Differentiable in both inputs (each gradient in its input's dtype). Six kernel launches forward (forward_plan),
    one backward.
    """
    temperature = _check("dist_loss", ("logits_s", "logits_t"), (logits_s, logits_t), temperature)
    beta, gamma = check_finite_number("dist_loss", "beta", beta), check_finite_number("dist_loss", "gamma", gamma)
    return _DISTLoss.apply(logits_s, logits_t, beta, gamma, temperature)
