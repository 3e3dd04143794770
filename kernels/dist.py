"""Fused Triton kernels for DIST (OFA-KD's ``dist_loss``), forward and backward.

``dist_loss(logits_s, logits_t, beta, gamma, T)`` -> fp32 scalar (patfast.kernels.reference.dist_loss_ref):
beta T^2 (1 - mean over rows of the Pearson correlation across classes of softmax(s/T), softmax(t/T)) +
gamma T^2 (1 - mean over classes of their correlation across the batch); eps 1e-8 in each divisor.
Grid: forward ONE program (deterministic, one launch): walk 1 over row tiles gives each row's softmax statistics and
correlation (and, when K fits one chunk of BLOCK_K classes, the class sums); after a barrier, walk 2 per chunk of
classes gives the batch-centred class moments and the rounding residual of the centring. Backward a 1-D grid over
row tiles, each owning whole rows (the softmax backward needs a sum over the row): one pass when K fits one chunk,
else two. Each input fp32/fp16/bf16 in its own dtype, any row/class strides; fp32 arithmetic.
Traffic: forward reads each logit tensor twice (K <= MAX_BLOCK_K; else 4 times), backward once (else twice) and
writes the gradients (B x K each). Derivation and numerics: docs/kernels.md#dist.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_finite_number
from .kd import MAX_BLOCK_K, _bwd_config, _check, _fwd_config, _layout, _online_lse

__all__ = ["dist_loss"]

EPS = 1e-8  # OFA-KD's eps in the divisor of each correlation (reference._pearson_rows)
_NROW = 7  # per row: m_s, log z_s, m_t, log z_t, then the row correlation's gradient coefficients c1, c2s, c2t
_NCOL = 7  # per class: batch means of p and q, their centring residuals, the class correlation's c1, c2s, c2t


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_scaled(ptr, r, cols, mask, stride_q, stride_k, inv_t, ALIGN: tl.constexpr):
    # logits / T of a [BLOCK_B, BLOCK_K] tile, in fp32
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
def _class_moments(s_ptr, t_ptr, row_ptr, B, K, cols, mean_p, mean_q, s_stride_q, t_stride_q, s_stride_k,
                   t_stride_k, inv_t, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr):
    # The second pass over the batch for a chunk of classes, given the batch means: the centred values
    # ca = p - mean_p, cb = q - mean_q, exactly as the backward forms them (p from the stored row statistics by
    # _softmax), their batch means res (0 in exact arithmetic, a rounding residual in fp32) and the moments of
    # ca - res, cb - res. The backward centres by (p - mean_p) - res_p: its vectors then sum to ~0 and are the ones
    # these moments describe, as autograd's centring backward subtracts the gradient's mean. Without that, where a
    # class correlation's divisor is tiny (near-constant classes, small batches) its huge coefficient times the
    # residual dominated the gradient.
    s_a = tl.zeros_like(mean_p)
    s_b = tl.zeros_like(mean_p)
    s_aa = tl.zeros_like(mean_p)
    s_bb = tl.zeros_like(mean_p)
    s_ab = tl.zeros_like(mean_p)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r = tl.minimum(rows, B - 1).to(tl.int64)
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = _load_scaled(s_ptr, r, cols, ok, s_stride_q, s_stride_k, inv_t, ALIGN)
        u = _load_scaled(t_ptr, r, cols, ok, t_stride_q, t_stride_k, inv_t, ALIGN)
        ca = tl.where(ok, _softmax(x, tl.load(row_ptr + r), tl.load(row_ptr + B + r), ok) - mean_p[None, :], 0.0)
        cb = tl.where(ok, _softmax(u, tl.load(row_ptr + 2 * B + r), tl.load(row_ptr + 3 * B + r), ok)
                      - mean_q[None, :], 0.0)
        s_a += tl.sum(ca, axis=0)
        s_b += tl.sum(cb, axis=0)
        s_aa += tl.sum(ca * ca, axis=0)
        s_bb += tl.sum(cb * cb, axis=0)
        s_ab += tl.sum(ca * cb, axis=0)
    res_p = s_a / B
    res_q = s_b / B
    m_pp = tl.maximum(s_aa - s_a * res_p, 0.0)  # sum (ca - res)^2; res is rounding-sized, no cancellation
    m_qq = tl.maximum(s_bb - s_b * res_q, 0.0)
    m_pq = s_ab - s_a * res_q
    return res_p, res_q, m_pp, m_qq, m_pq


@triton.jit
def _finish_classes(col_ptr, K, cols, col_ok, mean_p, mean_q, res_p, res_q, m_pp, m_qq, m_pq, weight, eps):
    # The class correlations of one chunk of classes; stores the means, residuals and coefficients, returns the
    # chunk's sum of correlations
    rho, c1, c2a, c2b = _corr_coefs(m_pq, m_pp, m_qq, weight, eps)
    tl.store(col_ptr + cols, mean_p, mask=col_ok)
    tl.store(col_ptr + K + cols, mean_q, mask=col_ok)
    tl.store(col_ptr + 2 * K + cols, res_p, mask=col_ok)
    tl.store(col_ptr + 3 * K + cols, res_q, mask=col_ok)
    tl.store(col_ptr + 4 * K + cols, c1, mask=col_ok)
    tl.store(col_ptr + 5 * K + cols, c2a, mask=col_ok)
    tl.store(col_ptr + 6 * K + cols, c2b, mask=col_ok)
    return tl.sum(tl.where(col_ok, rho, 0.0), axis=0)


@triton.jit
def _dist_fwd_kernel(
    s_ptr,  # [B, K] student logits (fp32 / fp16 / bf16)
    t_ptr,  # [B, K] teacher logits (fp32 / fp16 / bf16)
    loss_ptr,  # [] fp32 out
    row_ptr,  # [7, B] fp32 out: m_s, 1/z_s, m_t, 1/z_t, c1, c2s, c2t (the last three times beta T^2 / B)
    col_ptr,  # [7, K] fp32 out: batch means of p, q, their residuals, c1, c2s, c2t (times gamma T^2 / K)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    beta, gamma,  # weights of the inter-class (rows) and intra-class (classes) terms
    temperature,  # T > 0
    eps,  # 1e-8
    ONE_CHUNK: tl.constexpr,  # K <= BLOCK_K: a row tile is one load, the class moments stay in registers
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    inv_k = 1.0 / K
    t2 = temperature * temperature
    w_row = beta * t2 / B
    w_col = gamma * t2 / K
    acc_rows = tl.zeros([BLOCK_B], dtype=tl.float32)
    cols0 = tl.arange(0, BLOCK_K)
    sum_p = tl.zeros([BLOCK_K], dtype=tl.float32)
    sum_q = tl.zeros([BLOCK_K], dtype=tl.float32)
    # Walk 1, row tiles: softmax statistics, the row correlations, (one chunk) the class sums
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r = tl.minimum(rows, B - 1).to(tl.int64)  # padding rows re-read the last row; zeroed below
        if ONE_CHUNK:  # the tile is loaded once: exact softmax statistics, then the softmaxes
            col_ok = (cols0 < K)[None, :]
            ok = row_ok[:, None] & col_ok
            x = _load_scaled(s_ptr, r, cols0, col_ok, s_stride_q, s_stride_k, inv_t, ALIGN)
            u = _load_scaled(t_ptr, r, cols0, col_ok, t_stride_q, t_stride_k, inv_t, ALIGN)
            x = tl.where(col_ok, x, float("-inf"))
            u = tl.where(col_ok, u, float("-inf"))
            m_s = tl.max(x, axis=1)
            m_t = tl.max(u, axis=1)
            e_s = tl.exp(x - m_s[:, None])  # 0 in the padding columns
            e_t = tl.exp(u - m_t[:, None])
            iz_s = 1.0 / tl.sum(e_s, axis=1)
            iz_t = 1.0 / tl.sum(e_t, axis=1)
            p = tl.where(ok, e_s * iz_s[:, None], 0.0)  # = _softmax(x, m_s, iz_s, ok), the backward's formula
            q = tl.where(ok, e_t * iz_t[:, None], 0.0)
            a = tl.where(ok, p - inv_k, 0.0)  # row-centred: a softmax's row mean is exactly 1 / K
            b = tl.where(ok, q - inv_k, 0.0)
            s_aa = tl.sum(a * a, axis=1)
            s_bb = tl.sum(b * b, axis=1)
            s_ab = tl.sum(a * b, axis=1)
            sum_p += tl.sum(p, axis=0)
            sum_q += tl.sum(q, axis=0)
        else:  # online softmax over the class chunks, then a second pass for the row moments
            m_s = tl.full([BLOCK_B], float("-inf"), tl.float32)
            z_s = tl.zeros([BLOCK_B], dtype=tl.float32)
            m_t = tl.full([BLOCK_B], float("-inf"), tl.float32)
            z_t = tl.zeros([BLOCK_B], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                col_ok = (cols < K)[None, :]
                x = _load_scaled(s_ptr, r, cols, col_ok, s_stride_q, s_stride_k, inv_t, ALIGN)
                u = _load_scaled(t_ptr, r, cols, col_ok, t_stride_q, t_stride_k, inv_t, ALIGN)
                m_s, z_s, _, _ = _online_lse(tl.where(col_ok, x, float("-inf")), m_s, z_s)
                m_t, z_t, _, _ = _online_lse(tl.where(col_ok, u, float("-inf")), m_t, z_t)
            iz_s = 1.0 / z_s
            iz_t = 1.0 / z_t
            s_aa = tl.zeros([BLOCK_B], dtype=tl.float32)
            s_bb = tl.zeros([BLOCK_B], dtype=tl.float32)
            s_ab = tl.zeros([BLOCK_B], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                ok = row_ok[:, None] & (cols < K)[None, :]
                x = _load_scaled(s_ptr, r, cols, ok, s_stride_q, s_stride_k, inv_t, ALIGN)
                u = _load_scaled(t_ptr, r, cols, ok, t_stride_q, t_stride_k, inv_t, ALIGN)
                a = tl.where(ok, _softmax(x, m_s, iz_s, ok) - inv_k, 0.0)
                b = tl.where(ok, _softmax(u, m_t, iz_t, ok) - inv_k, 0.0)
                s_aa += tl.sum(a * a, axis=1)
                s_bb += tl.sum(b * b, axis=1)
                s_ab += tl.sum(a * b, axis=1)
        rho, c1, c2a, c2b = _corr_coefs(s_ab, s_aa, s_bb, w_row, eps)
        acc_rows += tl.where(row_ok, rho, 0.0)
        tl.store(row_ptr + rows, m_s, mask=row_ok)
        tl.store(row_ptr + B + rows, iz_s, mask=row_ok)
        tl.store(row_ptr + 2 * B + rows, m_t, mask=row_ok)
        tl.store(row_ptr + 3 * B + rows, iz_t, mask=row_ok)
        tl.store(row_ptr + 4 * B + rows, c1, mask=row_ok)
        tl.store(row_ptr + 5 * B + rows, c2a, mask=row_ok)
        tl.store(row_ptr + 6 * B + rows, c2b, mask=row_ok)
    # The walks below read the row statistics walk 1 stored (other threads' stores): a barrier first
    tl.debug_barrier()
    if ONE_CHUNK:  # walk 2: the centred moments of the one chunk of classes
        mean_p = sum_p / B
        mean_q = sum_q / B
        res_p, res_q, m_pp, m_qq, m_pq = _class_moments(s_ptr, t_ptr, row_ptr, B, K, cols0, mean_p, mean_q,
                                                        s_stride_q, t_stride_q, s_stride_k, t_stride_k, inv_t,
                                                        ALIGN, BLOCK_B)
        acc_cols = _finish_classes(col_ptr, K, cols0, cols0 < K, mean_p, mean_q, res_p, res_q, m_pp, m_qq, m_pq,
                                   w_col, eps)
    else:  # walk 2, class chunk by class chunk: the batch means over the row tiles, then the centred moments
        acc_cols = 0.0
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            sum_p = tl.zeros([BLOCK_K], dtype=tl.float32)
            sum_q = tl.zeros([BLOCK_K], dtype=tl.float32)
            for b0 in range(0, B, BLOCK_B):
                rows = b0 + tl.arange(0, BLOCK_B)
                row_ok = rows < B
                r = tl.minimum(rows, B - 1).to(tl.int64)
                ok = row_ok[:, None] & (cols < K)[None, :]
                x = _load_scaled(s_ptr, r, cols, ok, s_stride_q, s_stride_k, inv_t, ALIGN)
                u = _load_scaled(t_ptr, r, cols, ok, t_stride_q, t_stride_k, inv_t, ALIGN)
                p = _softmax(x, tl.load(row_ptr + r), tl.load(row_ptr + B + r), ok)
                q = _softmax(u, tl.load(row_ptr + 2 * B + r), tl.load(row_ptr + 3 * B + r), ok)
                sum_p += tl.sum(p, axis=0)
                sum_q += tl.sum(q, axis=0)
            mean_p = sum_p / B
            mean_q = sum_q / B
            res_p, res_q, m_pp, m_qq, m_pq = _class_moments(s_ptr, t_ptr, row_ptr, B, K, cols, mean_p, mean_q,
                                                            s_stride_q, t_stride_q, s_stride_k, t_stride_k, inv_t,
                                                            ALIGN, BLOCK_B)
            acc_cols += _finish_classes(col_ptr, K, cols, cols < K, mean_p, mean_q, res_p, res_q, m_pp, m_qq, m_pq,
                                        w_col, eps)
    inter = 1.0 - tl.sum(acc_rows, axis=0) / B
    intra = 1.0 - acc_cols / K
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
# Launch configuration (kd.py's tiles: the forward's is one program's loop tile, the backward's one program's rows)
# ----------------------------------------------------------------------------------------------------------------


def _one_chunk(k: int) -> bool:
    return triton.next_power_of_2(k) <= MAX_BLOCK_K


def _forward(s, t, beta: float, gamma: float, temperature: float):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    loss = torch.empty((), device=s.device, dtype=torch.float32)
    row_stats = torch.empty((_NROW, b), device=s.device, dtype=torch.float32)
    col_stats = torch.empty((_NCOL, k), device=s.device, dtype=torch.float32)
    cfg = _fwd_config(b, k)
    _dist_fwd_kernel[(1,)](
        s, t, loss, row_stats, col_stats, b, k // align, *row_q, *col, beta, gamma, temperature, EPS,
        ONE_CHUNK=_one_chunk(k), ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
    )
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
    def forward(ctx, logits_s, logits_t, beta, gamma, temperature):
        loss, row_stats, col_stats = _forward(logits_s, logits_t, beta, gamma, temperature)
        ctx.save_for_backward(logits_s, logits_t, row_stats, col_stats)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s, t, row_stats, col_stats = ctx.saved_tensors
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (grad_s or grad_t):
            return None, None, None, None, None
        ds, dt = _backward(s, t, row_stats, col_stats, grad_loss, ctx.temperature, grad_s, grad_t)
        return ds, dt, None, None, None


def dist_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST: beta T^2 (1 - mean row correlation) + gamma T^2 (1 - mean class correlation) -> fp32 scalar, fused.

    logits_s, logits_t: (B, K), same shape and device, each float32 / float16 / bfloat16 in its own dtype; any
    strides. B = 1 or K = 1 are allowed (a correlation of zero-variance vectors is 0, as in the reference).
    Differentiable in both inputs (each gradient in its input's dtype). One kernel launch forward, one backward.
    """
    temperature = _check("dist_loss", ("logits_s", "logits_t"), (logits_s, logits_t), temperature)
    beta, gamma = check_finite_number("dist_loss", "beta", beta), check_finite_number("dist_loss", "gamma", gamma)
    return _DISTLoss.apply(logits_s, logits_t, beta, gamma, temperature)
