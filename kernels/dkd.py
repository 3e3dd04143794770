"""Fused Triton kernels for Decoupled KD (DKD, mdistiller's ``dkd_loss``), forward and backward.

``dkd_loss(logits_s, logits_t, target, alpha, beta, T)`` -> alpha * TCKD + beta * NCKD, fp32 scalar
(patfast.kernels.reference.dkd_loss_ref): TCKD the T^2-batchmean KL of the binary [p_y, 1 - p_y], NCKD the
T^2-batchmean KL of the softmaxes at T with the target's logit lowered by DKD_MASK = 1000.
Grid: forward in two launches, kd.py's per-chunk kernel (softmax statistics over the NON-target classes of both
sides, a 2-D grid over row tiles x class chunks) and ONE program merging the chunks in a fixed order and finishing
each row from them and its target logit (deterministic, no atomics); backward a 2-D grid over (row tiles, class
chunks) from saved per-row statistics. Each logits input fp32/fp16/bf16 in its own
dtype, any row/class strides; target (B,) int64 with any stride; fp32 arithmetic.
Traffic: forward reads each logit tensor once (+ one target logit per row), backward reads them again and writes
the gradients (B x K each). Derivation and numerics: docs/kernels.md#dkd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_dkd_inputs, check_finite_number
from .kd import _bwd_config, _check, _kl_partial_kernel, _layout, _merge_config, _merge_term, _partial_config
from .reference import DKD_MASK

__all__ = ["dkd_loss"]

_NSTAT = 11  # per row: m_s, log z_s, m_t, log z_t (non-target softmaxes at T), then 7 gradient coefficients


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(d):
    # log(1 + exp(d)) for any finite d, without overflow and without losing small values: max(d, 0) +
    # log1p(exp(-|d|)), log1p(v) = log(w) * v / (w - 1) with w = 1 + v (exact where w rounds to 1: then v).
    v = tl.exp(-tl.abs(d))
    w = 1.0 + v
    small = w == 1.0
    return tl.maximum(d, 0.0) + tl.where(small, v, tl.log(w) * (v / tl.where(small, 1.0, w - 1.0)))


@triton.jit
def _kl_term(q, p, d):
    # q log(q / p) - q + p = q * (d - 1 + exp(-d)) with d = log q - log p: >= 0, so a sum of these (a KL of two
    # distributions, since sum q = sum p) has no cancellation; a series for |d| < 0.5 (error < 1e-8 relative).
    series = d * d * (0.5 - d * (1.0 / 6 - d * (1.0 / 24 - d * (1.0 / 120 - d * (1.0 / 720 - d * (
        1.0 / 5040 - d * (1.0 / 40320)))))))
    return tl.where(tl.abs(d) < 0.5, q * series, q * (d - 1.0) + p)


@triton.jit
def _dkd_merge_kernel(
    s_ptr,  # [B, K] student logits (fp32 / fp16 / bf16): only the target logit of each row is read here
    t_ptr,  # [B, K] teacher logits (fp32 / fp16 / bf16): likewise
    y_ptr,  # [B] int64 target classes
    part_ptr,  # [N_CHUNKS, 5, B] fp32: kd's partial kernel over the non-target classes (m_s, z_s, m_t, z_t, w)
    loss_ptr,  # [] fp32 out: alpha * TCKD + beta * NCKD (NaN if a target is outside [0, K))
    stats_ptr,  # [11, B] fp32 out: m_s, lz_s, m_t, lz_t, fs, ft, tp, dxy, tq, shift, duy (see the backward)
    B,  # rows
    K,  # classes
    s_stride_b, t_stride_b,  # row strides (elements)
    s_stride_k, t_stride_k,  # class strides (elements)
    y_stride,  # target stride (elements)
    alpha, beta,  # weights of TCKD and NCKD
    temperature,  # T > 0
    mask_value,  # DKD_MASK, subtracted from the target logit at T before NCKD's softmaxes
    N_CHUNKS: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # ONE program, the forward's second stage: the chunks merged in a fixed order, then each row's closed form.
    inv_t = 1.0 / temperature
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r = tl.minimum(rows, B - 1).to(tl.int64)  # padding rows re-read the last row; dropped below
        y = tl.load(y_ptr + r * y_stride)
        y_ok = (y >= 0) & (y < K)
        y_c = tl.where(y_ok, y, 0)  # never read out of bounds; the row's loss is NaN instead
        # softmax of x = s/T and u = t/T over the non-target classes, w = sum exp(u - m_t) (u - x)
        m_s, z_s, m_t, z_t, w = _merge_term(part_ptr, 0, B, rows, row_ok, N_CHUNKS, 5)
        x_y = tl.load(s_ptr + r * s_stride_b + y_c * s_stride_k).to(tl.float32) * inv_t
        u_y = tl.load(t_ptr + r * t_stride_b + y_c * t_stride_k).to(tl.float32) * inv_t
        lz_s = tl.log(z_s)
        lz_t = tl.log(z_t)
        d_s = (x_y - m_s) - lz_s  # target logit minus the non-target log-sum-exp: log(p_y / (1 - p_y))
        d_t = (u_y - m_t) - lz_t
        # TCKD on [p_y, 1 - p_y]: log p_y = -softplus(-d), log(1 - p_y) = -softplus(d) (the non-target mass)
        lp_y = -_softplus(-d_s)
        lp_n = -_softplus(d_s)
        lq_y = -_softplus(-d_t)
        lq_n = -_softplus(d_t)
        p_y = tl.exp(lp_y)
        p_n = tl.exp(lp_n)
        q_y = tl.exp(lq_y)
        q_n = tl.exp(lq_n)
        tckd = _kl_term(q_y, p_y, lq_y - lp_y) + _kl_term(q_n, p_n, lq_n - lp_n)
        # NCKD: the target logit lowered by mask_value; sp = log(1 + exp(target' - non-target lse))
        sp_s = _softplus(d_s - mask_value)
        sp_t = _softplus(d_t - mask_value)
        f_s = tl.exp(-sp_s)  # non-target mass of the masked softmaxes
        f_t = tl.exp(-sp_t)
        pm_y = tl.exp((d_s - mask_value) - sp_s)  # masked target probabilities (0 unless |d| ~ mask_value)
        qm_y = tl.exp((d_t - mask_value) - sp_t)
        dl = ((m_t - m_s) + (lz_t - lz_s)) + (sp_t - sp_s)  # difference of the masked log-sum-exps
        nckd = f_t * (w / z_t) + qm_y * (u_y - x_y) - dl
        nan = tl.where(y_ok, 0.0, float("nan"))
        acc += tl.where(row_ok, alpha * tckd + beta * nckd + nan, 0.0)
        # gradient coefficients (times g T / B in the backward); d = p_y - q_y from the smaller masses
        dpq = tl.where(p_y + q_y < 1.0, p_y - q_y, q_n - p_n)
        delta = (lq_y - lp_y) - (lq_n - lp_n)
        st = stats_ptr + rows
        tl.store(st, m_s, mask=row_ok)
        tl.store(st + B, lz_s, mask=row_ok)
        tl.store(st + 2 * B, m_t, mask=row_ok)
        tl.store(st + 3 * B, lz_t, mask=row_ok)
        # d/dx_c = (phat_c fs - qhat_c ft) - phat_c tp (NCKD's difference formed before TCKD's term is added)
        tl.store(st + 4 * B, beta * f_s + nan, mask=row_ok)  # fs
        tl.store(st + 5 * B, beta * f_t + nan, mask=row_ok)  # ft
        tl.store(st + 6 * B, alpha * dpq + nan, mask=row_ok)  # tp
        tl.store(st + 7 * B, alpha * dpq + beta * (pm_y - qm_y) + nan, mask=row_ok)  # dxy: d/dx_y
        # d/du_c = qhat_c (ft ((u_c - x_c) - shift) - tq)
        tl.store(st + 8 * B, alpha * delta * q_y * q_n + nan, mask=row_ok)  # tq
        tl.store(st + 9 * B, dl + nckd, mask=row_ok)  # shift
        tl.store(st + 10 * B, alpha * delta * q_y * q_n + beta * qm_y * ((u_y - x_y) - (dl + nckd)) + nan,
                 mask=row_ok)  # duy: d/du_y
    tl.store(loss_ptr, tl.sum(acc, axis=0) * (temperature * temperature / B))


@triton.jit
def _dkd_bwd_kernel(
    s_ptr,  # [B, K] student logits (as in the forward)
    t_ptr,  # [B, K] teacher logits
    y_ptr,  # [B] int64 target classes
    stats_ptr,  # [11, B] fp32 per-row statistics written by the forward
    g_ptr,  # [] fp32 upstream gradient (device memory)
    ds_ptr,  # [B, K] out, contiguous, dtype of s (written only when GRAD_S)
    dt_ptr,  # [B, K] out, contiguous, dtype of t (written only when GRAD_T)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    y_stride,  # target stride (elements)
    temperature,  # T > 0
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < K)[None, :]
    r = rows.to(tl.int64)
    out_offs = r[:, None] * K + cols[None, :]  # the gradients are contiguous [B, K]

    x = tl.load(s_ptr + r[:, None] * (s_stride_q * ALIGN) + cols[None, :] * s_stride_k,
                mask=mask, other=0.0).to(tl.float32) * inv_t
    u = tl.load(t_ptr + r[:, None] * (t_stride_q * ALIGN) + cols[None, :] * t_stride_k,
                mask=mask, other=0.0).to(tl.float32) * inv_t
    y = tl.load(y_ptr + r * y_stride, mask=row_ok, other=0)
    is_y = cols[None, :] == y[:, None]
    st = stats_ptr + rows
    m_s = tl.load(st, mask=row_ok, other=0.0)
    lz_s = tl.load(st + B, mask=row_ok, other=0.0)
    m_t = tl.load(st + 2 * B, mask=row_ok, other=0.0)
    lz_t = tl.load(st + 3 * B, mask=row_ok, other=0.0)
    ft = tl.load(st + 5 * B, mask=row_ok, other=0.0)
    c = tl.load(g_ptr).to(tl.float32) * temperature / B
    # non-target softmaxes phat, qhat; the min keeps the target column (>= the non-target lse) finite, discarded
    qhat = tl.exp(tl.minimum((u - m_t[:, None]) - lz_t[:, None], 0.0))
    if GRAD_S:
        phat = tl.exp(tl.minimum((x - m_s[:, None]) - lz_s[:, None], 0.0))
        fs = tl.load(st + 4 * B, mask=row_ok, other=0.0)
        tp = tl.load(st + 6 * B, mask=row_ok, other=0.0)
        dxy = tl.load(st + 7 * B, mask=row_ok, other=0.0)
        ds = c * tl.where(is_y, dxy[:, None], (phat * fs[:, None] - qhat * ft[:, None]) - phat * tp[:, None])
        tl.store(ds_ptr + out_offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        tq = tl.load(st + 8 * B, mask=row_ok, other=0.0)
        shift = tl.load(st + 9 * B, mask=row_ok, other=0.0)
        duy = tl.load(st + 10 * B, mask=row_ok, other=0.0)
        dt = c * tl.where(is_y, duy[:, None], qhat * (ft[:, None] * ((u - x) - shift[:, None]) - tq[:, None]))
        tl.store(dt_ptr + out_offs, dt.to(dt_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (tile sizes: kd.py's _partial_config / _merge_config / _bwd_config, the same tiles as KD's)
# ----------------------------------------------------------------------------------------------------------------


def _forward(s, t, y, alpha: float, beta: float, temperature: float):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    loss = torch.empty((), device=s.device, dtype=torch.float32)
    stats = torch.empty((_NSTAT, b), device=s.device, dtype=torch.float32)
    cfg, merge = _partial_config(b, k), _merge_config(b, k)
    partials = torch.empty((merge["N_CHUNKS"], 5, b), device=s.device, dtype=torch.float32)
    y_stride = y.stride(0) if b > 1 else 0
    _kl_partial_kernel[(triton.cdiv(b, cfg["BLOCK_B"]), merge["N_CHUNKS"])](
        s, t, s, partials, y, b, k // align, *row_q, row_q[0], *col, col[0], y_stride, temperature,
        PAIR=False, T_IS_ONE=False, EXCLUDE_TARGET=True,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    _dkd_merge_kernel[(1,)](
        s, t, y, partials, loss, stats, b, k, *(q * align for q in row_q), *col, y_stride,
        alpha, beta, temperature, DKD_MASK,
        N_CHUNKS=merge["N_CHUNKS"], BLOCK_B=merge["BLOCK_B"], num_warps=merge["num_warps"],
    )
    return loss, stats


def _backward(s, t, y, stats, g, temperature: float, grad_s: bool, grad_t: bool):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    ds = torch.empty((b, k), device=s.device, dtype=s.dtype) if grad_s else None
    dt = torch.empty((b, k), device=t.device, dtype=t.dtype) if grad_t else None
    cfg = _bwd_config(b, k)
    grid = (triton.cdiv(b, cfg["BLOCK_B"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _dkd_bwd_kernel[grid](
        s, t, y, stats, g.to(torch.float32), ds if grad_s else stats, dt if grad_t else stats,
        b, k // align, *row_q, *col, y.stride(0) if b > 1 else 0, temperature,
        GRAD_S=grad_s, GRAD_T=grad_t,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    return ds, dt


class _DKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_t, target, alpha, beta, temperature):
        loss, stats = _forward(logits_s, logits_t, target, alpha, beta, temperature)
        ctx.save_for_backward(logits_s, logits_t, target, stats)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s, t, y, stats = ctx.saved_tensors
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (grad_s or grad_t):
            return None, None, None, None, None, None
        ds, dt = _backward(s, t, y, stats, grad_loss, ctx.temperature, grad_s, grad_t)
        return ds, dt, None, None, None, None


def dkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD -> fp32 scalar, fused (see the module docstring).

    logits_s, logits_t: (B, K), K >= 2, same shape and device, each float32 / float16 / bfloat16 in its own dtype;
    any strides. target: (B,) int64 class indices (ops.dkd_loss also takes (B, K) soft labels and passes their
    argmax). A target outside [0, K) is a ValueError for CPU tensors; on a GPU (no host sync to look) it makes the
    loss and that row's gradients NaN. Differentiable in both logits (each gradient in its input's dtype). Two
    kernel launches forward, one backward.
    """
    temperature = _check("dkd_loss", ("logits_s", "logits_t"), (logits_s, logits_t), temperature)
    check_dkd_inputs("dkd_loss", logits_s, logits_t, target, soft_labels=False)
    alpha, beta = check_finite_number("dkd_loss", "alpha", alpha), check_finite_number("dkd_loss", "beta", beta)
    return _DKDLoss.apply(logits_s, logits_t, target, alpha, beta, temperature)
