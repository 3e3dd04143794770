"""Region-Aware Attention (SPEC section 3) with a fused Triton attention core, forward and backward.

``raa_attention(tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos, num_heads)`` -> (B, N, D):
LayerNorm -> q = Linear + pos, [k | v] = Linear, k += pos (PyTorch ops, autograd) -> ``raa_core(q, k, v, scale)``,
softmax(q k^T * scale) v per (batch, head) in Triton.
Grid: one program per (batch, head), B * H, one launch forward (O and the row log-sum-exp) and one backward (dQ, dK,
dV in registers; no atomics, O never re-read). q, k, v each fp32/fp16/bf16; fp32 softmax and accumulators.
Traffic at B = 128, N = 64, D = 512, bf16: forward ~34 MB, backward ~59 MB (each input read once, each output
written once). Limits N <= 256, head_dim <= 128.
Per-program memory, registers and the derivation: docs/kernels.md#raa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .checks import KERNEL_DTYPES
from .reference import LAYER_NORM_EPS, to_common_dtype

__all__ = ["raa_attention", "raa_core", "MAX_N", "MAX_HEAD_DIM"]

MAX_N = 256  # tokens per (batch, head): all keys of a head live in one program
MAX_HEAD_DIM = 128
# Registers per thread for a 16-bit compute dtype up to N = 64 (PAT's 64 tokens): 2 backward / 4 forward programs
# per SM. Not for fp32 compute: its wider tiles spill under the cap (2 KB a thread forward on sm_90).
MAX_REGISTERS = 128
_INPUT_NAMES = ("tokens", "norm_weight", "norm_bias", "q_weight", "q_bias", "kv_weight", "kv_bias", "pos")
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _raa_fwd_kernel(
    q_ptr,  # [B, H, N, HEAD_DIM] queries: strides (q_sb, q_sh, q_sn, 1); q, k, v each fp32 / fp16 / bf16
    k_ptr,  # [B, H, N, HEAD_DIM] keys: strides (k_sb, k_sh, k_sn, 1)
    v_ptr,  # [B, H, N, HEAD_DIM] values: strides (v_sb, v_sh, v_sn, 1)
    o_ptr,  # [B, N, H, HEAD_DIM] out, contiguous, compute dtype: softmax(q k^T * scale) v, heads merged
    lse_ptr,  # [B, H, N] fp32 out: log-sum-exp of each row of q k^T * scale
    H,  # heads
    N,  # tokens (queries = keys)
    q_sb, q_sh, q_sn,
    k_sb, k_sh, k_sn,
    v_sb, v_sh, v_sn,
    scale,  # softmax scale, head_dim ** -0.5
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # all keys: next power of two >= max(N, 16)
    BLOCK_D: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16)
):
    dot_dtype = o_ptr.dtype.element_ty  # the compute dtype: q, k, v are converted to it in registers
    pid = tl.program_id(0)  # = b * H + h
    b = (pid // H).to(tl.int64)
    h = pid % H
    keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < N
    d_ok = dims < HEAD_DIM
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * k_sb + h * k_sh + keys[:, None] * k_sn + dims[None, :], mask=kv_mask,
                other=0.0).to(dot_dtype)
    v = tl.load(v_ptr + b * v_sb + h * v_sh + keys[:, None] * v_sn + dims[None, :], mask=kv_mask,
                other=0.0).to(dot_dtype)
    qk_scale = scale * _LOG2E  # S in log2 units: exp(x) = exp2(x * log2 e)
    o_base = o_ptr + b * N * (H * HEAD_DIM) + h * HEAD_DIM
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_sn + dims[None, :], mask=q_mask,
                    other=0.0).to(dot_dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp2(s - m[:, None])
        l_sum = tl.sum(p, axis=1)
        p = p * (1.0 / l_sum)[:, None]
        o = tl.dot(p.to(dot_dtype), v, input_precision="ieee")  # [BLOCK_M, BLOCK_D] fp32
        tl.store(o_base + rows[:, None] * (H * HEAD_DIM) + dims[None, :], o.to(o_ptr.dtype.element_ty), mask=q_mask)
        tl.store(lse_ptr + pid.to(tl.int64) * N + rows, (m + tl.log2(l_sum)) * _LN2, mask=row_ok)


@triton.jit
def _raa_bwd_kernel(
    q_ptr,  # [B, H, N, HEAD_DIM] queries: strides (q_sb, q_sh, q_sn, 1)
    k_ptr,  # [B, H, N, HEAD_DIM] keys: strides (k_sb, k_sh, k_sn, 1)
    v_ptr,  # [B, H, N, HEAD_DIM] values: strides (v_sb, v_sh, v_sn, 1)
    do_ptr,  # [B, H, N, HEAD_DIM] upstream gradient of O, compute dtype: strides (do_sb, do_sh, do_sn, 1)
    lse_ptr,  # [B, H, N] fp32: the forward's row log-sum-exp
    dq_ptr,  # [B, N, H, HEAD_DIM] out, contiguous, dtype of q
    dk_ptr,  # [B, N, H, HEAD_DIM] out, contiguous, dtype of k
    dv_ptr,  # [B, N, H, HEAD_DIM] out, contiguous, dtype of v
    H,  # heads
    N,  # tokens
    q_sb, q_sh, q_sn,
    k_sb, k_sh, k_sn,
    v_sb, v_sh, v_sn,
    do_sb, do_sh, do_sn,
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dot_dtype = do_ptr.dtype.element_ty  # the compute dtype (that of O and dO): q, k, v are converted to it
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < N
    d_ok = dims < HEAD_DIM
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * k_sb + h * k_sh + keys[:, None] * k_sn + dims[None, :], mask=kv_mask,
                other=0.0).to(dot_dtype)
    v = tl.load(v_ptr + b * v_sb + h * v_sh + keys[:, None] * v_sn + dims[None, :], mask=kv_mask,
                other=0.0).to(dot_dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * _LOG2E
    out_off = b * N * (H * HEAD_DIM) + h * HEAD_DIM  # the three gradients share the contiguous (B, N, H, hd) layout
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_sn + dims[None, :], mask=q_mask,
                    other=0.0).to(dot_dtype)
        do = tl.load(do_ptr + b * do_sb + h * do_sh + rows[:, None] * do_sn + dims[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + pid.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
        p = tl.exp2(s * qk_scale - (lse * _LOG2E)[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
        delta = tl.sum(p * dp, axis=1)  # = rowsum(dO * O): the whole key row is here
        ds = p * (dp - delta[:, None])
        dv = tl.dot(tl.trans(p.to(dot_dtype)), do, acc=dv, input_precision="ieee")
        ds_in = ds.to(dot_dtype)
        dk = tl.dot(tl.trans(ds_in), q, acc=dk, input_precision="ieee")
        dq = tl.dot(ds_in, k, input_precision="ieee") * scale
        tl.store(dq_ptr + out_off + rows[:, None] * (H * HEAD_DIM) + dims[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=q_mask)
    out = out_off + keys[:, None] * (H * HEAD_DIM) + dims[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration (no autotuning: a plain function of the shape, also used by the compile-only tests)
# ----------------------------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _fwd_config(n: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and warps of the forward kernel for N tokens of head_dim features.

    Chosen from compile-only builds (ptxas register counts, no GPU timing): N <= 64 in one query block with 4 warps
    and maxnreg 128 (PAT, N = 64, head_dim = 64: wgmma on sm_90 at 94-103 registers; mma.sync on sm_80 at 128,
    140-149 without the cap; no spill under triton 3.6 or 3.8); larger N in
    16-row blocks with 8 warps (64-99 registers up to N = 256, head_dim = 128; 32- or 64-row blocks spill at
    head_dim = 32 on sm_80 / sm_90).
    """
    block_n = max(16, _next_pow2(n))
    block_d = max(16, _next_pow2(head_dim))
    block_m = block_n if block_n <= 64 else 16
    num_warps = 4 if block_n <= 64 else 8
    maxnreg = MAX_REGISTERS if block_n <= 64 and dtype.itemsize == 2 else None
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps, "maxnreg": maxnreg}


def _bwd_config(n: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and warps of the backward kernel: smaller query blocks, as dK and dV hold registers throughout.

    Chosen from compile-only builds (ptxas register counts, no GPU timing): at N = 64, head_dim = 64 query blocks
    of 16 rows, 8 warps and maxnreg 128 take 96-128 registers and no spill on sm_80 and sm_90 under triton 3.6 and
    3.8 (2 programs per SM); 32-row blocks took 124-182 (129 on sm_90 under 3.6: 1 program per SM) and spilled
    8 bytes when capped at 128; N = 128 and 256 use 16-row blocks.
    """
    block_n = max(16, _next_pow2(n))
    block_d = max(16, _next_pow2(head_dim))
    block_m = max(16, min(block_n, 1024 // block_n))
    num_warps = 4 if block_n < 64 else 8
    maxnreg = MAX_REGISTERS if block_n <= 64 and dtype.itemsize == 2 else None
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps, "maxnreg": maxnreg}


_COMPILED = isinstance(_raa_fwd_kernel, JITFunction)  # False under TRITON_INTERPRET=1 (a plain bool for dynamo)


def _check_device(name: str, device: torch.device) -> None:
    if device.type != "cuda" and _COMPILED:
        raise ValueError(
            f"{name}: the Triton kernel needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before triton is "
            "imported to run it on the CPU, or use backend='reference'"
        )


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its feature axis is contiguous (stride 1), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _core_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype: torch.dtype | None = None):
    """(O, LSE) for (B, H, N, hd) q, k, v with unit feature stride, each in its own dtype, computed in ``dtype``
    (default: that of q).

    O: contiguous (B, N, H, hd) (heads merged) in ``dtype``, LSE: (B, H, N) fp32, natural log.
    """
    b, h, n, hd = q.shape
    o = torch.empty((b, n, h, hd), device=q.device, dtype=q.dtype if dtype is None else dtype)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    cfg = _fwd_config(n, hd, o.dtype)
    _raa_fwd_kernel[(b * h,)](
        q, k, v, o, lse, h, n,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        scale,
        HEAD_DIM=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
    )
    return o, lse


def _core_backward(q, k, v, grad_o, lse, scale: float, dtype: torch.dtype):
    """(dQ, dK, dV), each a (B, H, N, hd) view of a contiguous (B, N, H, hd) buffer in the dtype of q, k, v
    respectively; grad_o is (B, N, H, hd), taken to the compute ``dtype`` (a no-op: it is O's gradient)."""
    b, h, n, hd = q.shape
    do = _unit_last(grad_o.to(dtype))
    grads = [torch.empty((b, n, h, hd), device=q.device, dtype=x.dtype) for x in (q, k, v)]
    cfg = _bwd_config(n, hd, dtype)
    _raa_bwd_kernel[(b * h,)](
        q, k, v, do, lse, *grads, h, n,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(2), do.stride(1),  # (B, N, H, hd): batch, head, token strides
        scale,
        HEAD_DIM=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
    )
    return tuple(g.transpose(1, 2) for g in grads)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


class _RAACore(torch.autograd.Function):
    """(B, H, N, hd) q, k, v, each in its own dtype, unit feature stride -> O as a contiguous (B, N, H, hd) tensor in
    the compute ``dtype``. The output is a fresh tensor, not a view (the (B, H, N, hd) view is taken outside)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, dtype):
        o, lse = _core_forward(q, k, v, scale, dtype)
        ctx.save_for_backward(q, k, v, lse)
        ctx.scale = scale
        ctx.dtype = dtype
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, lse = ctx.saved_tensors
        dq, dk, dv = _core_backward(q, k, v, grad_o, lse, ctx.scale, ctx.dtype)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), None, None


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _check_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"raa_core: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"raa_core: expected (B, H, N, head_dim) tensors, got {name} of shape {tuple(x.shape)}")
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"raa_core: {name} has dtype {x.dtype}; the Triton kernel takes float32, float16 or "
                             "bfloat16 (use backend='reference' for others)")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"raa_core: q, k and v must have the same shape, got q {tuple(q.shape)} and {name} "
                             f"{tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"raa_core: q, k and v must be on the same device, got q on {q.device} and {name} on "
                             f"{x.device}")
    b, h, n, hd = q.shape
    if q.numel() == 0:
        raise ValueError(f"raa_core: inputs are empty (shape {tuple(q.shape)})")
    if n > MAX_N:
        raise ValueError(f"raa_core: at most {MAX_N} tokens per head (all keys sit in one program), got N = {n}; "
                         "use backend='reference'")
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"raa_core: head_dim must be at most {MAX_HEAD_DIM}, got {hd}; use backend='reference'")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"raa_core: scale must be a Python number, got {type(scale).__name__}")
    _check_device("raa_core", q.device)


def raa_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per (batch, head) -> (B, H, N, head_dim), fused (one launch forward, one backward).

    q, k, v: (B, H, N, head_dim), each float32 / float16 / bfloat16 in its own dtype, read in place (any
    batch/head/token strides; a strided feature axis is copied once) and converted in registers to the compute
    dtype: the autocast dtype under torch.autocast (as autocast does for a matmul), else the promoted dtype of q, k,
    v. N <= 256, head_dim <= 128. The dots take compute-dtype operands; softmax and accumulation in fp32.
    Returns O in the compute dtype as a (B, H, N, head_dim) view of a contiguous (B, N, H, head_dim) buffer.
    Differentiable in q, k and v; each gradient in its input's dtype.
    """
    _check_core(q, k, v, scale)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = (_unit_last(x) for x in (q, k, v))
    return _RAACore.apply(q, k, v, float(scale), dtype).transpose(1, 2)


def raa_attention(
    tokens: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor,
    pos: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Region-aware attention -> (B, N, D) in the dtype of tokens: PyTorch front + the Triton core. See module doc.

    tokens (B, N, D); norm_weight, norm_bias (D,); q_weight (D, D), q_bias (D,); kv_weight (2D, D), kv_bias (2D,);
    pos broadcastable to (B, N, D); each float32 / float16 / bfloat16 in its own dtype. Outside autocast the front
    runs in their promoted dtype, under torch.autocast by autocast's rules. Differentiable in all of them, each
    gradient in its input's dtype.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"raa_attention: expected tokens of shape (B, N, D), got {shape}")
    b, n, d = tokens.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or d % num_heads:
        raise ValueError(f"raa_attention: the width D = {d} must be divisible by num_heads, got {num_heads!r}")
    inputs = (tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos)
    for name, x in zip(_INPUT_NAMES, inputs):
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"raa_attention: {name} has dtype {x.dtype}; the Triton kernel takes float32, float16 "
                             "or bfloat16 (use backend='reference' for others)")
    if not torch.is_autocast_enabled(tokens.device.type):  # under autocast, autocast casts each op's inputs
        inputs = to_common_dtype(inputs)  # F.linear refuses mixed dtypes; no copy of a tensor already in it
    x, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos = inputs
    head_dim = d // num_heads
    xn = F.layer_norm(x, (d,), norm_weight, norm_bias, LAYER_NORM_EPS)
    q = F.linear(xn, q_weight, q_bias) + pos
    k, v = F.linear(xn, kv_weight, kv_bias).split(d, dim=-1)
    k = k + pos
    o = raa_core(*(t.unflatten(-1, (num_heads, head_dim)).transpose(1, 2) for t in (q, k, v)), head_dim**-0.5)
    return o.transpose(1, 2).reshape(b, n, d).to(tokens.dtype)
