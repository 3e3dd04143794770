"""The public functional ops of patfast, with backend dispatch.

``hcl_loss(feat_s, feat_t)`` -> scalar
    Hierarchical context loss of one stage (SPEC section 2). feat_s, feat_t: (B, C, H, W) maps or (B, L, C) tokens
    (viewed as (B, C, h, L // h) maps, h = floor(sqrt(L)); L must be h * (L // h), so drop class tokens first).
    MSE at full resolution plus MSE of adaptive-average-pooled maps at levels 4, 2, 1 (each only when
    level < H), weighted 1, 1/2, 1/4, 1/8 and divided by the total weight.
``kd_loss(logits_s, logits_t, temperature=1.0)`` -> scalar
    T^2 * KL(softmax(logits_t / T) || softmax(logits_s / T)), summed over classes and averaged over the batch
    (``kl_div(..., reduction="batchmean")``). logits: (B, K).
``dkd_loss(logits_s, logits_t, target, alpha=1.0, beta=8.0, temperature=4.0)`` -> scalar
    Decoupled KD (mdistiller's ``dkd_loss``): alpha * TCKD + beta * NCKD, each T^2 * batchmean. TCKD is the KL of
    the binary [p_y, 1 - p_y] (y the target class), NCKD the KL of the softmaxes at T with the target's logit
    lowered by 1000. target: (B,) int64 class indices in [0, K), or (B, K) soft labels (their argmax is taken
    before dispatch); K >= 2. Out-of-range indices are a ValueError for CPU tensors; on a GPU (no host sync) the
    Triton kernel returns NaN instead.
``dist_loss(logits_s, logits_t, beta=1.0, gamma=1.0, temperature=1.0)`` -> scalar
    DIST (OFA-KD's ``dist_loss``): beta T^2 (1 - mean over rows of the Pearson correlation across classes of
    softmax(logits_s / T) and softmax(logits_t / T)) + gamma T^2 (1 - mean over classes of their correlation across
    the batch); eps 1e-8 in each correlation's divisor. logits: (B, K).
``ofa_loss(logits_s, logits_t, target, eps=1.0, temperature=1.0)`` -> scalar
    OFA's loss (OFA-KD's ``ofa_loss``): mean over rows of sum_c -w_c log softmax(logits_s / T)_c with
    w_c = q_c^eps off the target and (q_y + 1)^eps - 1 on it, q = softmax(logits_t / T); no T^2. target as for
    dkd_loss (indices, or soft labels: their argmax); K >= 1; eps >= 0.
``raa_attention(tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos, num_heads)`` -> (B, N, D)
    The region-aware attention core (SPEC section 3): LayerNorm (eps 1e-5) -> q = Linear(q_weight (D, D), q_bias),
    [k | v] = Linear(kv_weight (2D, D), kv_bias (2D,)); q += pos, k += pos with pos broadcastable to (B, N, D)
    ((1, N, D) paper variant, (B, 1, D) official); softmax(q k^T / sqrt(D / num_heads)) v per head, heads merged.

Every op takes ``backend="auto" | "reference" | "triton"``. "reference" runs the eager PyTorch code of
``patfast.kernels.reference``; "triton" runs the fused Triton kernel (also on CPU tensors under TRITON_INTERPRET=1);
"auto" picks Triton for CUDA tensors when that op has a Triton kernel and every input is float32, float16 or bfloat16,
and the reference otherwise (so CPU tensors never reach Triton, which also keeps torch.compile on CPU working).
Whether triton is importable is decided once, when this module is imported (which then imports the kernels, and
triton with them): a call only looks up dicts, so torch.compile traces it without a graph break.

Dtypes: each input may have its own dtype (under bf16 autocast a bf16 student map meets an fp32 teacher feature).
The Triton kernels read each input in place in its own dtype and compute in float32; the reference computes in the
promoted dtype. Gradients come back in each input's dtype; the losses are float32 scalars from Triton (the promoted
dtype from the reference); raa_attention returns the dtype of ``tokens``.
All ops are differentiable in every input that requires grad, in every backend.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence

import torch

from patfast.kernels import reference
from patfast.kernels.checks import (
    KERNEL_DTYPES,
    check_dkd_inputs,
    check_feature_pair,
    check_kd_inputs,
    check_raa_inputs,
)

__all__ = ["hcl_loss", "hcl_loss_stages", "kd_loss", "kd_loss_pair", "dkd_loss", "dist_loss", "ofa_loss",
           "raa_attention", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")

_REFERENCE_IMPLS: dict[str, Callable] = {
    "hcl_loss": reference.hcl_loss_ref,
    "kd_loss": reference.kd_loss_ref,
    "raa_attention": reference.raa_attention_ref,
    "hcl_loss_stages": reference.hcl_loss_stages_ref,
    "kd_loss_pair": reference.kd_loss_pair_ref,
    "dkd_loss": reference.dkd_loss_ref,
    "dist_loss": reference.dist_loss_ref,
    "ofa_loss": reference.ofa_loss_ref,
}

# The ops that have a Triton kernel, as "module:function". Adding a kernel is one line here.
_TRITON_TARGETS: dict[str, str] = {
    "hcl_loss": "patfast.kernels.hcl:hcl_loss",
    "kd_loss": "patfast.kernels.kd:kd_loss",
    "hcl_loss_stages": "patfast.kernels.hcl:hcl_loss_stages",
    "kd_loss_pair": "patfast.kernels.kd:pat_kl_pair",
    "raa_attention": "patfast.kernels.raa:raa_attention",
    "dkd_loss": "patfast.kernels.dkd:dkd_loss",
    "dist_loss": "patfast.kernels.dist:dist_loss",
    "ofa_loss": "patfast.kernels.ofa:ofa_loss",
}


def _import_triton_impls() -> tuple[dict[str, Callable], str | None]:
    """({op: Triton implementation}, None), or ({}, why not) when triton cannot be imported. Runs once, at import.

    Decided here and not per call: torch.compile traces the ops, and Dynamo (torch 2.11) refuses to trace
    importlib.util.find_spec / importlib.import_module, so a lookup at call time broke a compiled step into pieces.
    A call now does a dict lookup. (TRITON_INTERPRET, when wanted, must be set before this import, as before any
    import of triton.)
    """
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as exc:  # a broken "triton" entry in sys.modules
        return {}, f"looking for triton failed: {exc}"
    if not found:
        return {}, "triton is not installed"
    impls = {}
    try:
        for op, target in _TRITON_TARGETS.items():
            module_name, _, fn_name = target.partition(":")
            impls[op] = getattr(importlib.import_module(module_name), fn_name)
    except Exception as exc:  # noqa: BLE001 - whatever a broken triton install raises, "auto" keeps the reference
        return {}, f"importing the Triton kernels failed ({type(exc).__name__}: {exc})"
    return impls, None


_TRITON_IMPLS, _TRITON_MISSING = _import_triton_impls()


def triton_ops() -> list[str]:
    """Names of the ops that have a Triton kernel."""
    return sorted(_TRITON_TARGETS)


def _select(op: str, backend: str, device: torch.device, *dtypes: torch.dtype) -> Callable:
    """The implementation of ``op`` that ``backend`` asks for, for tensors on ``device`` of ``dtypes`` (one per input).

    "auto" takes the Triton kernel for CUDA tensors when every dtype is a kernel dtype (fp32/fp16/bf16), else the
    reference. Only dict lookups and comparisons: this runs inside compiled regions.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "triton":
        if op not in _TRITON_TARGETS:
            raise NotImplementedError(
                f"{op} has no Triton kernel; use backend='reference' (or 'auto', which falls back to it)"
            )
        impl = _TRITON_IMPLS.get(op)
        if impl is None:
            raise ImportError(f"{op}: backend='triton' is not available: {_TRITON_MISSING}; use backend='reference' "
                              "or 'auto'")
        return impl
    impl = _TRITON_IMPLS.get(op)
    if (backend == "auto" and impl is not None and device.type == "cuda"
            and all(dtype in KERNEL_DTYPES for dtype in dtypes)):
        return impl
    return _REFERENCE_IMPLS[op]


def _check_backend_arg(op: str, backend: object) -> None:
    if not isinstance(backend, str):
        raise ValueError(f"{op}: backend must be a string, one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def hcl_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Hierarchical context loss of one stage -> scalar. feat_s, feat_t: (B, C, H, W) or (B, L, C), same shape."""
    _check_backend_arg("hcl_loss", backend)
    check_feature_pair("hcl_loss", feat_s, feat_t)
    return _select("hcl_loss", backend, feat_s.device, feat_s.dtype, feat_t.dtype)(feat_s, feat_t)


def hcl_loss_stages(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor], *,
                    backend: str = "auto") -> torch.Tensor:
    """Sum over stages of hcl_loss(feats_s[i], feats_t[i]) -> scalar (Triton: one launch per stage + one sum)."""
    _check_backend_arg("hcl_loss_stages", backend)
    if len(feats_s) != len(feats_t) or not feats_s:
        raise ValueError(f"hcl_loss_stages: need the same non-zero number of student and teacher stages, got "
                         f"{len(feats_s)} and {len(feats_t)}")
    for a, b in zip(feats_s, feats_t):
        check_feature_pair("hcl_loss_stages", a, b)
    dtypes = [x.dtype for x in (*feats_s, *feats_t)]  # each stage may bring its own pair of dtypes
    return _select("hcl_loss_stages", backend, feats_s[0].device, *dtypes)(list(feats_s), list(feats_t))


def kd_loss(
    logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """T^2 * batch-mean KL(softmax(logits_t/T) || softmax(logits_s/T)) -> scalar. logits: (B, K), same shape."""
    _check_backend_arg("kd_loss", backend)
    check_kd_inputs("kd_loss", logits_s, logits_t, temperature)
    fn = _select("kd_loss", backend, logits_s.device, logits_s.dtype, logits_t.dtype)
    return fn(logits_s, logits_t, temperature)


def kd_loss_pair(
    logits_s: torch.Tensor, logits_pt: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0, *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAT's two KL terms: (kd_loss(s, t, T), kd_loss(pt, t, 1)) -> (loss_kd, loss_reg); (B, K) logits each.

    The Triton form reads the clean teacher's row once: one launch forward, one backward.
    """
    _check_backend_arg("kd_loss_pair", backend)
    check_kd_inputs("kd_loss_pair", logits_s, logits_t, temperature)
    check_kd_inputs("kd_loss_pair", logits_pt, logits_t, 1.0)
    fn = _select("kd_loss_pair", backend, logits_s.device, logits_s.dtype, logits_pt.dtype, logits_t.dtype)
    return fn(logits_s, logits_pt, logits_t, temperature)


def dkd_loss(
    logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, beta: float = 8.0,
    temperature: float = 4.0, *, backend: str = "auto",
) -> torch.Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD -> scalar. logits (B, K), K >= 2; target (B,) int64 indices or
    (B, K) soft labels (argmax). See the module docstring."""
    _check_backend_arg("dkd_loss", backend)
    check_kd_inputs("dkd_loss", logits_s, logits_t, temperature)
    check_dkd_inputs("dkd_loss", logits_s, logits_t, target)
    target = reference.hard_targets(target)
    fn = _select("dkd_loss", backend, logits_s.device, logits_s.dtype, logits_t.dtype)
    return fn(logits_s, logits_t, target, alpha, beta, temperature)


def dist_loss(
    logits_s: torch.Tensor, logits_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
    *, backend: str = "auto",
) -> torch.Tensor:
    """DIST: beta T^2 (1 - mean row correlation) + gamma T^2 (1 - mean class correlation) of the softmaxes at T
    -> scalar. logits (B, K), same shape. See the module docstring."""
    _check_backend_arg("dist_loss", backend)
    check_kd_inputs("dist_loss", logits_s, logits_t, temperature)
    fn = _select("dist_loss", backend, logits_s.device, logits_s.dtype, logits_t.dtype)
    return fn(logits_s, logits_t, beta, gamma, temperature)


def ofa_loss(
    logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, eps: float = 1.0, temperature: float = 1.0,
    *, backend: str = "auto",
) -> torch.Tensor:
    """OFA's loss: mean_b sum_c -((q_c + [c = y])^eps - [c = y]) log softmax(logits_s / T)_c -> scalar. logits
    (B, K); target (B,) int64 indices or (B, K) soft labels (argmax). See the module docstring."""
    _check_backend_arg("ofa_loss", backend)
    check_kd_inputs("ofa_loss", logits_s, logits_t, temperature)
    check_dkd_inputs("ofa_loss", logits_s, logits_t, target, min_classes=1)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < float("inf")):
        raise ValueError(f"ofa_loss: eps must be a finite number >= 0, got {eps!r}")
    target = reference.hard_targets(target)
    fn = _select("ofa_loss", backend, logits_s.device, logits_s.dtype, logits_t.dtype)
    return fn(logits_s, logits_t, target, eps, temperature)


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
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm -> q, [k|v] Linear -> +pos on q and k -> per-head softmax attention -> (B, N, D). See module doc."""
    _check_backend_arg("raa_attention", backend)
    check_raa_inputs(tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos, num_heads)
    inputs = (tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos)
    fn = _select("raa_attention", backend, tokens.device, *(x.dtype for x in inputs))
    return fn(*inputs, num_heads)
