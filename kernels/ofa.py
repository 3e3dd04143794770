"""Fused Triton kernels for OFA's branch loss (OFA-KD's ``ofa_loss``), forward and backward.

``ofa_loss(logits_s, logits_t, target, eps, T)`` -> mean_b sum_c -w_c log softmax(s/T)_c, fp32 scalar
(patfast.kernels.reference.ofa_loss_ref), w_c = q_c^eps off the target and (q_y + 1)^eps - 1 on it, q = softmax(t/T).
Grid: forward in two launches, a 2-D grid over (row tiles, class chunks) (each chunk's log-sum-exp pairs of both
sides and two sums of the teacher's weights, relative to the chunk's maxima; kd.py's tiles) and ONE program merging
the chunks in a fixed order (deterministic, no atomics); backward a 2-D grid over (row tiles, class chunks) from
saved per-row statistics. Each logits input fp32/fp16/bf16 in its
own dtype, any row/class strides; target (B,) int64 with any stride; fp32 arithmetic.
Traffic: forward reads each logit tensor once (+ the target logits), backward reads them again and writes the
gradients (B x K each). Derivation and numerics: docs/kernels.md#ofa.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_dkd_inputs, check_finite_number
from .kd import _bwd_config, _check, _layout, _merge_config, _merge_lse, _partial_config

__all__ = ["ofa_loss"]

_NSTAT = 8  # per row: m_x, log z_x, m_u, log z_u, W (sum of the weights), S, w_y, qv_y (see the backward)


@triton.jit
def _log1p(v):
    # log(1 + v) without losing a small v to the rounding of 1 + v (exact where 1 + v rounds to 1: then v)
    w = 1.0 + v
    one = w == 1.0
    return tl.where(one, v, tl.log(w) * (v / tl.where(one, 1.0, w - 1.0)))


@triton.jit
def _expm1(z):
    # exp(z) - 1 for small z without the cancellation (Kahan: (u - 1) z / log u, u = exp(z); z where u rounds to 1)
    u = tl.exp(z)
    one = u == 1.0
    return tl.where(one, z, (u - 1.0) * (z / tl.log(tl.where(one, 2.0, u))))


@triton.jit
def _ofa_partial_kernel(
    s_ptr,  # [B, K] student (branch) logits (fp32 / fp16 / bf16)
    t_ptr,  # [B, K] teacher logits (fp32 / fp16 / bf16)
    y_ptr,  # [B] int64 target classes
    part_ptr,  # [n_chunks, 6, B] fp32 out: per class chunk and row m_x, z_x, m_u, z_u, E, A (see below)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    y_stride,  # target stride (elements)
    eps,  # the exponent of the teacher's probabilities
    temperature,  # T > 0
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One BLOCK_B x BLOCK_K tile, relative to the chunk's own maxima: the log-sum-exp pairs of x = s/T and u = t/T
    # over every class, and over its non-target classes e_c = exp(eps (u_c - m_u)): E = sum e_c and
    # A = sum e_c (m_x - x_c) >= 0.
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    r = tl.minimum(rows, B - 1).to(tl.int64)  # padding rows re-read the last row; never stored
    y = tl.load(y_ptr + r * y_stride)
    col_ok = (cols < K)[None, :]
    nt = col_ok & (cols[None, :] != y[:, None])  # a target outside [0, K) excludes nothing; the merge makes it NaN
    x = tl.load(s_ptr + r[:, None] * (s_stride_q * ALIGN) + cols[None, :] * s_stride_k,
                mask=col_ok, other=0.0).to(tl.float32) * inv_t
    u = tl.load(t_ptr + r[:, None] * (t_stride_q * ALIGN) + cols[None, :] * t_stride_k,
                mask=col_ok, other=0.0).to(tl.float32) * inv_t
    m_x = tl.max(tl.where(col_ok, x, float("-inf")), axis=1)
    m_u = tl.max(tl.where(col_ok, u, float("-inf")), axis=1)
    e = tl.where(nt, tl.exp(eps * (u - m_u[:, None])), 0.0)
    base = part_ptr + chunk.to(tl.int64) * (6 * B) + rows
    tl.store(base, m_x, mask=row_ok)
    tl.store(base + B, tl.sum(tl.where(col_ok, tl.exp(x - m_x[:, None]), 0.0), axis=1), mask=row_ok)
    tl.store(base + 2 * B, m_u, mask=row_ok)
    tl.store(base + 3 * B, tl.sum(tl.where(col_ok, tl.exp(u - m_u[:, None]), 0.0), axis=1), mask=row_ok)
    tl.store(base + 4 * B, tl.sum(e, axis=1), mask=row_ok)
    tl.store(base + 5 * B, tl.sum(e * tl.where(nt, m_x[:, None] - x, 0.0), axis=1), mask=row_ok)


@triton.jit
def _ofa_merge_kernel(
    s_ptr,  # [B, K] student logits: only the target logit of each row is read here
    t_ptr,  # [B, K] teacher logits: likewise
    y_ptr,  # [B] int64 target classes
    part_ptr,  # [N_CHUNKS, 6, B] fp32: the partial kernel's per-chunk statistics
    loss_ptr,  # [] fp32 out: the loss (NaN if a target is outside [0, K))
    stats_ptr,  # [8, B] fp32 out: m_x, lz_x, m_u, lz_u, W, S, w_y, qv_y
    B,  # rows
    K,  # classes
    s_stride_b, t_stride_b,  # row strides (elements)
    s_stride_k, t_stride_k,  # class strides (elements)
    y_stride,  # target stride (elements)
    eps,  # the exponent of the teacher's probabilities
    temperature,  # T > 0
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
        m_x = tl.full([BLOCK_B], float("-inf"), tl.float32)
        z_x = tl.zeros([BLOCK_B], dtype=tl.float32)
        m_u = tl.full([BLOCK_B], float("-inf"), tl.float32)
        z_u = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):  # the maxima first: E and A are then rescaled to them in one pass
            base = part_ptr + c * (6 * B) + rows
            m_x, z_x, _ = _merge_lse(m_x, z_x, tl.load(base, mask=row_ok, other=0.0),
                                     tl.load(base + B, mask=row_ok, other=0.0))
            m_u, z_u, _ = _merge_lse(m_u, z_u, tl.load(base + 2 * B, mask=row_ok, other=0.0),
                                     tl.load(base + 3 * B, mask=row_ok, other=0.0))
        e_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        a_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):  # sum e_c (m_x - x_c) of a chunk = A + E (m_x - its m_x): all >= 0
            base = part_ptr + c * (6 * B) + rows
            scale = tl.exp(eps * (tl.load(base + 2 * B, mask=row_ok, other=0.0) - m_u))
            e_c = tl.load(base + 4 * B, mask=row_ok, other=0.0)
            e_sum += scale * e_c
            a_sum += scale * (tl.load(base + 5 * B, mask=row_ok, other=0.0)
                              + e_c * (m_x - tl.load(base, mask=row_ok, other=0.0)))
        x_y = tl.load(s_ptr + r * s_stride_b + y_c * s_stride_k).to(tl.float32) * inv_t
        u_y = tl.load(t_ptr + r * t_stride_b + y_c * t_stride_k).to(tl.float32) * inv_t
        lz_x = tl.log(z_x)
        lz_u = tl.log(z_u)
        zf = tl.exp(-eps * lz_u)  # z_u^-eps: q_c^eps = e_c zf
        q_y = tl.exp((u_y - m_u) - lz_u)
        log1p_q = _log1p(q_y)
        w_y = _expm1(eps * log1p_q)  # (1 + q_y)^eps - 1: q_y may be ~1e-4, where the plain form keeps 3 digits
        nlp_y = (m_x - x_y) + lz_x  # -log p_y >= 0
        nontarget = zf * (a_sum + lz_x * e_sum)  # sum over c != y of q_c^eps (-log p_c): non-negative terms
        loss_row = nontarget + w_y * nlp_y
        nan = tl.where(y_ok, 0.0, float("nan"))
        acc += tl.where(row_ok, loss_row + nan, 0.0)
        qv_y = eps * q_y * tl.exp((eps - 1.0) * log1p_q) * nlp_y
        st = stats_ptr + rows
        tl.store(st, m_x, mask=row_ok)
        tl.store(st + B, lz_x, mask=row_ok)
        tl.store(st + 2 * B, m_u, mask=row_ok)
        tl.store(st + 3 * B, lz_u, mask=row_ok)
        tl.store(st + 4 * B, zf * e_sum + w_y + nan, mask=row_ok)  # W
        tl.store(st + 5 * B, eps * nontarget + qv_y + nan, mask=row_ok)  # S = sum_c q_c v_c
        tl.store(st + 6 * B, w_y, mask=row_ok)
        tl.store(st + 7 * B, qv_y, mask=row_ok)
    tl.store(loss_ptr, tl.sum(acc, axis=0) / B)


@triton.jit
def _ofa_bwd_kernel(
    s_ptr,  # [B, K] student logits (as in the forward)
    t_ptr,  # [B, K] teacher logits
    y_ptr,  # [B] int64 target classes
    stats_ptr,  # [8, B] fp32 per-row statistics written by the forward
    g_ptr,  # [] fp32 upstream gradient (device memory)
    ds_ptr,  # [B, K] out, contiguous, dtype of s (written only when GRAD_S)
    dt_ptr,  # [B, K] out, contiguous, dtype of t (written only when GRAD_T)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k,  # class strides (elements)
    y_stride,  # target stride (elements)
    eps,
    temperature,  # T > 0
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # row loss L = sum_c w_c (-log p_c); with x = s/T, u = t/T, p = softmax(x), q = softmax(u):
    #   dL/dx_c = p_c W - w_c                          (W = sum_c w_c)
    #   dL/du_c = q_c v_c - q_c S                      (v_c = dL/dq_c, S = sum_j q_j v_j)
    #   q_c v_c = eps w_c (-log p_c) off the target, eps q_y (1 + q_y)^(eps - 1) (-log p_y) on it (qv_y)
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
    m_x = tl.load(st, mask=row_ok, other=0.0)
    lz_x = tl.load(st + B, mask=row_ok, other=0.0)
    m_u = tl.load(st + 2 * B, mask=row_ok, other=0.0)
    lz_u = tl.load(st + 3 * B, mask=row_ok, other=0.0)
    w_y = tl.load(st + 6 * B, mask=row_ok, other=0.0)
    c = tl.load(g_ptr).to(tl.float32) / (B * temperature)
    log_q = tl.minimum((u - m_u[:, None]) - lz_u[:, None], 0.0)
    w = tl.where(is_y, w_y[:, None], tl.exp(eps * log_q))
    nlp = tl.maximum((m_x[:, None] - x) + lz_x[:, None], 0.0)  # -log p_c >= 0
    if GRAD_S:
        big_w = tl.load(st + 4 * B, mask=row_ok, other=0.0)
        ds = c * (tl.exp(-nlp) * big_w[:, None] - w)
        tl.store(ds_ptr + out_offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        big_s = tl.load(st + 5 * B, mask=row_ok, other=0.0)
        qv_y = tl.load(st + 7 * B, mask=row_ok, other=0.0)
        qv = tl.where(is_y, qv_y[:, None], eps * w * nlp)
        dt = c * (qv - tl.exp(log_q) * big_s[:, None])
        tl.store(dt_ptr + out_offs, dt.to(dt_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (tile sizes: kd.py's _partial_config / _merge_config / _bwd_config, the same tiles as KD's)
# ----------------------------------------------------------------------------------------------------------------


def _forward(s, t, y, eps: float, temperature: float):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    loss = torch.empty((), device=s.device, dtype=torch.float32)
    stats = torch.empty((_NSTAT, b), device=s.device, dtype=torch.float32)
    cfg, merge = _partial_config(b, k), _merge_config(b, k)
    partials = torch.empty((merge["N_CHUNKS"], 6, b), device=s.device, dtype=torch.float32)
    y_stride = y.stride(0) if b > 1 else 0
    _ofa_partial_kernel[(triton.cdiv(b, cfg["BLOCK_B"]), merge["N_CHUNKS"])](
        s, t, y, partials, b, k // align, *row_q, *col, y_stride, eps, temperature,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    _ofa_merge_kernel[(1,)](
        s, t, y, partials, loss, stats, b, k, *(q * align for q in row_q), *col, y_stride, eps, temperature,
        N_CHUNKS=merge["N_CHUNKS"], BLOCK_B=merge["BLOCK_B"], num_warps=merge["num_warps"],
    )
    return loss, stats


def _backward(s, t, y, stats, g, eps: float, temperature: float, grad_s: bool, grad_t: bool):
    b, k = s.shape
    align, row_q, col = _layout((s, t))
    ds = torch.empty((b, k), device=s.device, dtype=s.dtype) if grad_s else None
    dt = torch.empty((b, k), device=t.device, dtype=t.dtype) if grad_t else None
    cfg = _bwd_config(b, k)
    grid = (triton.cdiv(b, cfg["BLOCK_B"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _ofa_bwd_kernel[grid](
        s, t, y, stats, g.to(torch.float32), ds if grad_s else stats, dt if grad_t else stats,
        b, k // align, *row_q, *col, y.stride(0) if b > 1 else 0, eps, temperature,
        GRAD_S=grad_s, GRAD_T=grad_t,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    return ds, dt


class _OFALoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_t, target, eps, temperature):
        loss, stats = _forward(logits_s, logits_t, target, eps, temperature)
        ctx.save_for_backward(logits_s, logits_t, target, stats)
        ctx.eps, ctx.temperature = eps, temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s, t, y, stats = ctx.saved_tensors
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (grad_s or grad_t):
            return None, None, None, None, None
        ds, dt = _backward(s, t, y, stats, grad_loss, ctx.eps, ctx.temperature, grad_s, grad_t)
        return ds, dt, None, None, None


def ofa_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA's loss: mean_b sum_c -((q_c + [c = y])^eps - [c = y]) log softmax(s/T)_c -> fp32 scalar, fused.

    logits_s, logits_t: (B, K), same shape and device, each float32 / float16 / bfloat16 in its own dtype; any
    strides. target: (B,) int64 class indices (ops.ofa_loss also takes (B, K) soft labels and passes their argmax);
    outside [0, K): a ValueError for CPU tensors, NaN on a GPU (no host sync to look). eps >= 0. Differentiable in
    both logits (each gradient in its input's dtype). Two kernel launches forward, one backward.
    """
    temperature = _check("ofa_loss", ("logits_s", "logits_t"), (logits_s, logits_t), temperature)
    check_dkd_inputs("ofa_loss", logits_s, logits_t, target, soft_labels=False, min_classes=1)
    eps = check_finite_number("ofa_loss", "eps", eps)
    if eps < 0:
        raise ValueError(f"ofa_loss: eps must be >= 0, got {eps}")
    return _OFALoss.apply(logits_s, logits_t, target, eps, temperature)
