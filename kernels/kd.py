"""Fused Triton kernels for the KL terms of PAT (SPEC section 1): loss_kd and loss_reg.

``kd_loss(logits_s, logits_t, T)`` -> T^2 * batchmean KL(softmax(t/T) || softmax(s/T)), fp32 scalar;
``pat_kl_pair(logits_s, logits_pt, logits_t, T)`` -> (loss_kd, loss_reg), reading the clean teacher once.
Grid: forward in two launches, a 2-D grid over (row tiles, class chunks) writing each chunk's softmax statistics,
then ONE program merging them in a fixed order (deterministic, no atomics); backward a 2-D grid over (row tiles,
class chunks) from the saved per-row statistics. Each input fp32/fp16/bf16 in its
own dtype, any row/class strides; fp32 arithmetic.
Traffic: forward reads each logit tensor once, backward reads them again and writes the gradients (B x K each).
Derivation, the two-stage forward and alignment: docs/kernels.md#kd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import KERNEL_DTYPES

__all__ = ["kd_loss", "pat_kl_pair"]

MAX_BLOCK_K = 1024  # classes per chunk; larger K loops over chunks (online softmax in the forward)
MAX_PARTIAL_TILE = 2048  # elements per input of one first-stage forward program ...
MIN_PARTIAL_TILE = 32  # ... shrunk down to this while there are fewer than PARTIAL_PROGRAMS programs
PARTIAL_PROGRAMS = 4 * 132  # 4 programs per SM of an H200
MAX_CHUNKS = 8  # class chunks per row (while K <= MAX_CHUNKS * MAX_BLOCK_K)
MERGE_ROWS = 1024  # rows per iteration of the one second-stage program
BWD_TILE = 2048  # elements per input per backward program
_NSTAT = 5  # per row and KL term: m_x, log z_x, m_y, log z_y, KL (x: the log_softmax slot, y: the target)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _online_lse(x, m, z):
    # One chunk of an online log-sum-exp over axis 1. x: [BLOCK_B, BLOCK_K] with -inf in masked columns;
    # m: running row max, z: running sum exp(x - m). Returns (m', z', exp(x - m'), the rescale factor of old sums).
    m_new = tl.maximum(m, tl.max(x, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(x - m_new[:, None])
    return m_new, z * alpha + tl.sum(e, axis=1), e, alpha


@triton.jit
def _store_row_stats(stats_ptr, term, B, rows, row_ok, m_x, z_x, m_y, z_y, w):
    # Finishes one KL term for a row tile: stores (m_x, log z_x, m_y, log z_y, KL) and returns KL (0 on padding).
    lz_x = tl.log(z_x)
    lz_y = tl.log(z_y)
    kl = w / z_y - (m_y - m_x) - (lz_y - lz_x)
    base = stats_ptr + term * 5 * B + rows
    tl.store(base, m_x, mask=row_ok)
    tl.store(base + B, lz_x, mask=row_ok)
    tl.store(base + 2 * B, m_y, mask=row_ok)
    tl.store(base + 3 * B, lz_y, mask=row_ok)
    tl.store(base + 4 * B, kl, mask=row_ok)
    return tl.where(row_ok, kl, 0.0)


@triton.jit
def _kl_partial_kernel(
    s_ptr,  # [B, K] student logits: the log_softmax slot of loss_kd (each of s, t, p: fp32 / fp16 / bf16)
    t_ptr,  # [B, K] clean teacher logits: the target of loss_kd (at T) and of loss_reg (at 1)
    p_ptr,  # [B, K] prompted-teacher logits: the log_softmax slot of loss_reg (read only when PAIR)
    part_ptr,  # [n_chunks, 10 if PAIR else 5, B] fp32 out: per class chunk and row m_x, z_x, m_y, z_y, w per term
    y_ptr,  # [B] int64 target classes (read only when EXCLUDE_TARGET)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q, p_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k, p_stride_k,  # class strides (elements); 1 for contiguous rows
    y_stride,  # target stride (elements)
    temperature,  # T > 0 (loss_kd only; loss_reg is at 1)
    PAIR: tl.constexpr,
    T_IS_ONE: tl.constexpr,  # temperature == 1: loss_reg reuses loss_kd's softmax of t
    EXCLUDE_TARGET: tl.constexpr,  # DKD's NCKD: the sums over the non-target classes only (not with PAIR)
    ALIGN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One BLOCK_B x BLOCK_K tile: the chunk's softmax statistics, relative to the chunk's own row maxima.
    K = K_q * ALIGN
    inv_t = 1.0 / temperature
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    r = tl.minimum(rows, B - 1).to(tl.int64)  # padding rows re-read the last row; never stored
    col_ok = (cols < K)[None, :]
    if EXCLUDE_TARGET:  # a target outside [0, K) excludes nothing here; the merge makes its row NaN
        target = tl.load(y_ptr + r * y_stride)
        col_ok = col_ok & (cols[None, :] != target[:, None])
    in_k = (cols < K)[None, :]  # the loads: every column of the chunk (the target too: one load, masked below)
    s_raw = tl.load(s_ptr + r[:, None] * (s_stride_q * ALIGN) + cols[None, :] * s_stride_k,
                    mask=in_k, other=0.0).to(tl.float32)
    t_raw = tl.load(t_ptr + r[:, None] * (t_stride_q * ALIGN) + cols[None, :] * t_stride_k,
                    mask=in_k, other=0.0).to(tl.float32)
    nterm = 10 if PAIR else 5
    base = part_ptr + chunk.to(tl.int64) * (nterm * B) + rows
    x = s_raw * inv_t
    y = t_raw * inv_t
    # loss_kd: x = s/T in the log_softmax slot, y = t/T the target; w = sum exp(y - m_y) * (y - x)
    m_x = tl.max(tl.where(col_ok, x, float("-inf")), axis=1)
    z_x = tl.sum(tl.where(col_ok, tl.exp(x - m_x[:, None]), 0.0), axis=1)
    m_y = tl.max(tl.where(col_ok, y, float("-inf")), axis=1)
    e_y = tl.where(col_ok, tl.exp(y - m_y[:, None]), 0.0)
    tl.store(base, m_x, mask=row_ok)
    tl.store(base + B, z_x, mask=row_ok)
    tl.store(base + 2 * B, m_y, mask=row_ok)
    tl.store(base + 3 * B, tl.sum(e_y, axis=1), mask=row_ok)
    tl.store(base + 4 * B, tl.sum(e_y * (y - x), axis=1), mask=row_ok)
    if PAIR:  # loss_reg: pt in the log_softmax slot, t the target, both at temperature 1
        p_raw = tl.load(p_ptr + r[:, None] * (p_stride_q * ALIGN) + cols[None, :] * p_stride_k,
                        mask=col_ok, other=0.0).to(tl.float32)
        m_p = tl.max(tl.where(col_ok, p_raw, float("-inf")), axis=1)
        tl.store(base + 5 * B, m_p, mask=row_ok)
        tl.store(base + 6 * B, tl.sum(tl.where(col_ok, tl.exp(p_raw - m_p[:, None]), 0.0), axis=1), mask=row_ok)
        if T_IS_ONE:  # softmax(t / 1) is the softmax already computed for loss_kd
            m_t1 = m_y
            e_t1 = e_y
        else:
            m_t1 = tl.max(tl.where(col_ok, t_raw, float("-inf")), axis=1)
            e_t1 = tl.where(col_ok, tl.exp(t_raw - m_t1[:, None]), 0.0)
        tl.store(base + 7 * B, m_t1, mask=row_ok)
        tl.store(base + 8 * B, tl.sum(e_t1, axis=1), mask=row_ok)
        tl.store(base + 9 * B, tl.sum(e_t1 * (t_raw - p_raw), axis=1), mask=row_ok)


@triton.jit
def _merge_lse(m, z, m_c, z_c):
    # Adds one chunk's (max, sum exp(x - max)) to a running pair; returns (m', z', the rescale of the chunk's sums).
    m_new = tl.maximum(m, m_c)
    # an empty side (-inf: nothing merged yet, or a chunk holding only DKD's target) adds nothing
    scale_c = tl.where(m_c == float("-inf"), 0.0, tl.exp(m_c - m_new))
    return m_new, tl.where(m == float("-inf"), 0.0, z * tl.exp(m - m_new)) + z_c * scale_c, scale_c


@triton.jit
def _merge_term(part_ptr, slot, B, rows, row_ok, N_CHUNKS: tl.constexpr, NTERM: tl.constexpr):
    # One KL term's row statistics over every class chunk, merged in chunk order (the same bits every run).
    m_x = tl.full(rows.shape, float("-inf"), tl.float32)
    z_x = tl.zeros(rows.shape, dtype=tl.float32)
    m_y = tl.full(rows.shape, float("-inf"), tl.float32)
    z_y = tl.zeros(rows.shape, dtype=tl.float32)
    w = tl.zeros(rows.shape, dtype=tl.float32)
    for c in tl.static_range(N_CHUNKS):
        base = part_ptr + (c * NTERM + slot) * B + rows
        m_x, z_x, _ = _merge_lse(m_x, z_x, tl.load(base, mask=row_ok, other=0.0),
                                 tl.load(base + B, mask=row_ok, other=0.0))
        m_old = m_y
        m_y, z_y, scale_c = _merge_lse(m_y, z_y, tl.load(base + 2 * B, mask=row_ok, other=0.0),
                                       tl.load(base + 3 * B, mask=row_ok, other=0.0))
        w = tl.where(m_old == float("-inf"), 0.0, w * tl.exp(m_old - m_y)) + \
            tl.load(base + 4 * B, mask=row_ok, other=0.0) * scale_c
    return m_x, z_x, m_y, z_y, w


@triton.jit
def _kl_merge_kernel(
    part_ptr,  # [N_CHUNKS, 10 if PAIR else 5, B] fp32: the partial kernel's per-chunk statistics
    loss_kd_ptr,  # [] fp32 out: T^2 / B * sum_rows KL(p_t^T || p_s^T)
    loss_reg_ptr,  # [] fp32 out: 1 / B * sum_rows KL(p_t || p_pt) (written only when PAIR)
    stats_ptr,  # [2 if PAIR else 1, 5, B] fp32 out: per term and row m_x, log z_x, m_y, log z_y, KL
    B,  # rows
    temperature,  # T > 0
    PAIR: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # ONE program: the second stage of the forward, a fixed-order sum over chunks and rows (no atomics).
    nterm: tl.constexpr = 10 if PAIR else 5
    acc_kd = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_reg = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        m_x, z_x, m_y, z_y, w = _merge_term(part_ptr, 0, B, rows, row_ok, N_CHUNKS, nterm)
        acc_kd += _store_row_stats(stats_ptr, 0, B, rows, row_ok, m_x, z_x, m_y, z_y, w)
        if PAIR:
            m_p, z_p, m_t1, z_t1, w_reg = _merge_term(part_ptr, 5, B, rows, row_ok, N_CHUNKS, nterm)
            acc_reg += _store_row_stats(stats_ptr, 1, B, rows, row_ok, m_p, z_p, m_t1, z_t1, w_reg)
    tl.store(loss_kd_ptr, tl.sum(acc_kd, axis=0) * (temperature * temperature / B))
    if PAIR:
        tl.store(loss_reg_ptr, tl.sum(acc_reg, axis=0) / B)


@triton.jit
def _kl_bwd_kernel(
    s_ptr,  # [B, K] student logits (as in the forward)
    t_ptr,  # [B, K] clean teacher logits
    p_ptr,  # [B, K] prompted-teacher logits (read only when PAIR)
    stats_ptr,  # [2 if PAIR else 1, 5, B] fp32 per-row statistics written by the forward
    g_kd_ptr,  # [] fp32 upstream gradient of loss_kd (device memory)
    g_reg_ptr,  # [] fp32 upstream gradient of loss_reg (read only when PAIR)
    ds_ptr,  # [B, K] out, contiguous, dtype of s: d/ds (written only when GRAD_S)
    dt_ptr,  # [B, K] out, contiguous, dtype of t: d/dt (written only when GRAD_T)
    dp_ptr,  # [B, K] out, contiguous, dtype of pt: d/dpt (written only when PAIR and GRAD_P)
    B,  # rows
    K_q,  # classes // ALIGN
    s_stride_q, t_stride_q, p_stride_q,  # row strides (elements) // ALIGN
    s_stride_k, t_stride_k, p_stride_k,  # class strides (elements)
    temperature,  # T > 0
    PAIR: tl.constexpr,
    T_IS_ONE: tl.constexpr,  # temperature == 1: loss_reg's softmax of t is loss_kd's
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    GRAD_P: tl.constexpr,
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

    t_raw = tl.load(t_ptr + r[:, None] * (t_stride_q * ALIGN) + cols[None, :] * t_stride_k,
                    mask=mask, other=0.0).to(tl.float32)
    s_raw = tl.load(s_ptr + r[:, None] * (s_stride_q * ALIGN) + cols[None, :] * s_stride_k,
                    mask=mask, other=0.0).to(tl.float32)
    st = stats_ptr + rows
    m_s = tl.load(st, mask=row_ok, other=0.0)
    lz_s = tl.load(st + B, mask=row_ok, other=0.0)
    m_t = tl.load(st + 2 * B, mask=row_ok, other=0.0)
    lz_t = tl.load(st + 3 * B, mask=row_ok, other=0.0)
    kl = tl.load(st + 4 * B, mask=row_ok, other=0.0)
    c_kd = tl.load(g_kd_ptr).to(tl.float32) * temperature / B
    # log p <= 0: the clamp only removes rounding above 0, and keeps masked lanes finite (never stored)
    log_p_s = tl.minimum((s_raw * inv_t - m_s[:, None]) - lz_s[:, None], 0.0)
    log_p_t = tl.minimum((t_raw * inv_t - m_t[:, None]) - lz_t[:, None], 0.0)
    p_t = tl.exp(log_p_t)
    if GRAD_S:
        ds = c_kd * (tl.exp(log_p_s) - p_t)
        tl.store(ds_ptr + out_offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    dt = c_kd * p_t * ((log_p_t - log_p_s) - kl[:, None])
    if PAIR:
        p_raw = tl.load(p_ptr + r[:, None] * (p_stride_q * ALIGN) + cols[None, :] * p_stride_k,
                        mask=mask, other=0.0).to(tl.float32)
        st1 = st + 5 * B
        m_p = tl.load(st1, mask=row_ok, other=0.0)
        lz_p = tl.load(st1 + B, mask=row_ok, other=0.0)
        kl1 = tl.load(st1 + 4 * B, mask=row_ok, other=0.0)
        c_reg = tl.load(g_reg_ptr).to(tl.float32) / B
        log_p_p = tl.minimum((p_raw - m_p[:, None]) - lz_p[:, None], 0.0)
        if T_IS_ONE:
            log_p_t1 = log_p_t
            p_t1 = p_t
        else:
            m_t1 = tl.load(st1 + 2 * B, mask=row_ok, other=0.0)
            lz_t1 = tl.load(st1 + 3 * B, mask=row_ok, other=0.0)
            log_p_t1 = tl.minimum((t_raw - m_t1[:, None]) - lz_t1[:, None], 0.0)
            p_t1 = tl.exp(log_p_t1)
        if GRAD_P:
            dp = c_reg * (tl.exp(log_p_p) - p_t1)
            tl.store(dp_ptr + out_offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        dt += c_reg * p_t1 * ((log_p_t1 - log_p_p) - kl1[:, None])
    if GRAD_T:
        tl.store(dt_ptr + out_offs, dt.to(dt_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration (no autotuning: plain functions of the shape, also used by the compile-only tests)
# ----------------------------------------------------------------------------------------------------------------


def _partial_config(b: int, k: int) -> dict:
    """Tile of one program of KD's first forward stage; the grid is (cdiv(B, BLOCK_B), cdiv(K, BLOCK_K)).

    The tile shrinks (to MIN_PARTIAL_TILE elements) until there are PARTIAL_PROGRAMS programs, enough for 4 per SM of
    a 132-SM H200, so the loads of every SM are in flight at once; at most MAX_PARTIAL_TILE elements per input, and
    a row is cut into at most MAX_CHUNKS chunks (fewer programs at small B instead)."""
    k2 = triton.next_power_of_2(k)
    tile = MAX_PARTIAL_TILE
    while tile > MIN_PARTIAL_TILE and triton.cdiv(b * k, tile) < PARTIAL_PROGRAMS:
        tile //= 2
    # at most MAX_CHUNKS class chunks (the merge unrolls over them), unless K > MAX_CHUNKS * MAX_BLOCK_K
    block_k = min(max(tile, triton.cdiv(k2, MAX_CHUNKS)), k2, MAX_BLOCK_K)
    block_b = max(1, min(tile // block_k, triton.next_power_of_2(b)))
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "num_warps": max(1, min(4, block_b * block_k // 256))}


def _merge_config(b: int, k: int) -> dict:
    """The second forward stage: ONE program, BLOCK_B rows per iteration, N_CHUNKS class chunks per row."""
    block_b = max(1, min(MERGE_ROWS, triton.next_power_of_2(b)))
    n_chunks = triton.cdiv(k, _partial_config(b, k)["BLOCK_K"])
    # warps by loads in flight (rows x chunks): 1 warp for 128 rows x 8 chunks spilled under triton 3.6
    return {"BLOCK_B": block_b, "N_CHUNKS": n_chunks, "num_warps": max(1, min(8, block_b * n_chunks // 256))}


def _bwd_config(b: int, k: int) -> dict:
    """Tile of one backward program; the grid is (cdiv(B, BLOCK_B), cdiv(K, BLOCK_K))."""
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_b = max(1, min(BWD_TILE // block_k, triton.next_power_of_2(b)))
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "num_warps": max(1, min(4, block_b * block_k // 512))}


def _layout(tensors: tuple[torch.Tensor, ...]) -> tuple[int, list[int], list[int]]:
    """(ALIGN, row strides // ALIGN, class strides) for [B, K] tensors; see the module docstring."""
    b, k = tensors[0].shape
    row_strides = [x.stride(0) if b > 1 else 0 for x in tensors]  # a size-1 dim's stride is meaningless
    col_strides = [x.stride(1) if k > 1 else 1 for x in tensors]
    align = 1
    if all(c == 1 for c in col_strides):
        align = 16 // max(x.dtype.itemsize for x in tensors)
        while align > 1 and (k % align or any(rs % align for rs in row_strides)):
            align //= 2
    return align, [rs // align for rs in row_strides], col_strides


def _forward(s: torch.Tensor, t: torch.Tensor, p: torch.Tensor | None, temperature: float):
    pair = p is not None
    tensors = (s, t, p) if pair else (s, t, s)
    b, k = s.shape
    align, row_q, col = _layout(tensors)
    loss_kd = torch.empty((), device=s.device, dtype=torch.float32)
    loss_reg = torch.empty((), device=s.device, dtype=torch.float32) if pair else loss_kd
    stats = torch.empty((2 if pair else 1, _NSTAT, b), device=s.device, dtype=torch.float32)
    cfg, merge = _partial_config(b, k), _merge_config(b, k)
    t_is_one = pair and temperature == 1.0
    partials = torch.empty((merge["N_CHUNKS"], 2 * _NSTAT if pair else _NSTAT, b), device=s.device,
                           dtype=torch.float32)
    _kl_partial_kernel[(triton.cdiv(b, cfg["BLOCK_B"]), merge["N_CHUNKS"])](
        tensors[0], tensors[1], tensors[2], partials, partials,
        b, k // align, *row_q, *col, 0, temperature,
        PAIR=pair, T_IS_ONE=t_is_one, EXCLUDE_TARGET=False,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    _kl_merge_kernel[(1,)](
        partials, loss_kd, loss_reg, stats, b, temperature,
        PAIR=pair, N_CHUNKS=merge["N_CHUNKS"], BLOCK_B=merge["BLOCK_B"],
        num_warps=merge["num_warps"],
    )
    return loss_kd, (loss_reg if pair else None), stats


def _backward(s, t, p, stats, g_kd, g_reg, temperature: float, grad_s: bool, grad_t: bool, grad_p: bool):
    pair = p is not None
    tensors = (s, t, p) if pair else (s, t, s)
    b, k = s.shape
    align, row_q, col = _layout(tensors)
    ds = torch.empty((b, k), device=s.device, dtype=s.dtype) if grad_s else None
    dt = torch.empty((b, k), device=t.device, dtype=t.dtype) if grad_t else None
    dp = torch.empty((b, k), device=p.device, dtype=p.dtype) if grad_p else None
    g_kd = g_kd.to(torch.float32)
    g_reg = g_reg.to(torch.float32) if pair else g_kd
    cfg = _bwd_config(b, k)
    grid = (triton.cdiv(b, cfg["BLOCK_B"]), triton.cdiv(k, cfg["BLOCK_K"]))
    dummy = stats  # pointer for outputs that are not written (their constexpr flag is off)
    _kl_bwd_kernel[grid](
        tensors[0], tensors[1], tensors[2], stats, g_kd, g_reg,
        ds if grad_s else dummy, dt if grad_t else dummy, dp if grad_p else dummy,
        b, k // align, *row_q, *col, temperature,
        PAIR=pair, T_IS_ONE=pair and temperature == 1.0, GRAD_S=grad_s, GRAD_T=grad_t, GRAD_P=grad_p,
        ALIGN=align, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    return ds, dt, dp


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


class _KDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_t, temperature):
        loss, _, stats = _forward(logits_s, logits_t, None, temperature)
        ctx.save_for_backward(logits_s, logits_t, stats)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s, t, stats = ctx.saved_tensors
        grad_s, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (grad_s or grad_t):
            return None, None, None
        ds, dt, _ = _backward(s, t, None, stats, grad_loss, None, ctx.temperature, grad_s, grad_t, False)
        return ds, dt, None


class _PatKLPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_s, logits_pt, logits_t, temperature):
        loss_kd, loss_reg, stats = _forward(logits_s, logits_t, logits_pt, temperature)
        ctx.save_for_backward(logits_s, logits_pt, logits_t, stats)
        ctx.temperature = temperature
        return loss_kd, loss_reg

    @staticmethod
    def backward(ctx, grad_kd, grad_reg):
        s, p, t, stats = ctx.saved_tensors
        grad_s, grad_p, grad_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (grad_s or grad_p or grad_t):
            return None, None, None, None
        ds, dt, dp = _backward(s, t, p, stats, grad_kd, grad_reg, ctx.temperature, grad_s, grad_t, grad_p)
        return ds, dp, dt, None


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _check(fn: str, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], temperature) -> float:
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    first, x0 = names[0], tensors[0]
    for name, x in zip(names[1:], tensors[1:]):
        if x.device != x0.device:
            raise ValueError(f"{fn}: all logits must be on the same device, got {first} on {x0.device} and "
                             f"{name} on {x.device}")
    for name, x in zip(names, tensors):
        if x.dim() != 2:
            raise ValueError(f"{fn}: expected 2-D (B, num_classes) logits, got {name} of shape {tuple(x.shape)}")
    for name, x in zip(names[1:], tensors[1:]):
        if x.shape != x0.shape:
            raise ValueError(f"{fn}: all logits must have the same shape, got {first} {tuple(x0.shape)} and "
                             f"{name} {tuple(x.shape)}")
    for name, x in zip(names, tensors):
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{fn}: {name} has dtype {x.dtype}; the Triton kernel takes float32, float16 or "
                             "bfloat16 (use backend='reference' for others)")
    if x0.numel() == 0:
        raise ValueError(f"{fn}: logits are empty (shape {tuple(x0.shape)})")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{fn}: temperature must be a Python number, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be positive and finite, got {temperature}")
    return float(temperature)


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * batch-mean KL(softmax(logits_t / T) || softmax(logits_s / T)) -> fp32 scalar, fused.

    logits_s, logits_t: (B, K), same shape and device, each float32 / float16 / bfloat16 in its own dtype; any
    strides. Differentiable in both inputs (each gradient in its input's dtype). Two kernel launches forward (per
    class chunk, then one merge), one backward.
    """
    temperature = _check("kd_loss", ("logits_s", "logits_t"), (logits_s, logits_t), temperature)
    return _KDLoss.apply(logits_s, logits_t, temperature)


def pat_kl_pair(
    logits_s: torch.Tensor, logits_pt: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAT's two KL terms in one pass over the clean teacher -> (loss_kd, loss_reg), fp32 scalars.

    loss_kd  = kd_loss(logits_s, logits_t, temperature)   (student vs clean teacher at T)
    loss_reg = kd_loss(logits_pt, logits_t, 1.0)           (prompted teacher vs clean teacher at 1)
    All three (B, K), same shape and device, each float32 / float16 / bfloat16 in its own dtype. Gradients (each in
    its input's dtype) flow to logits_s and logits_pt, and also to logits_t if it requires grad (in PAT it is the
    no-grad clean teacher). Two launches forward, one backward.
    """
    temperature = _check("pat_kl_pair", ("logits_s", "logits_pt", "logits_t"), (logits_s, logits_pt, logits_t),
                         temperature)
    return _PatKLPair.apply(logits_s, logits_pt, logits_t, temperature)
