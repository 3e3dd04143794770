"""Input checks of the public ops (patfast/ops.py; hcl.py's entry points share check_feature_pair): shapes, ranks,
emptiness and arguments, each failure a ValueError that names the op; and KERNEL_DTYPES, the dtypes the Triton
kernels take (ops.py's "auto" dispatches on it). reference.py, the oracle, is only the math."""

import math

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels read


def check_feature_pair(name: str, feat_s: torch.Tensor, feat_t: torch.Tensor) -> None:
    """ValueError unless feat_s, feat_t are same-shape, non-empty (B, C, H, W) maps or (B, L, C) tokens on a grid."""
    if not isinstance(feat_s, torch.Tensor) or not isinstance(feat_t, torch.Tensor):
        raise ValueError(f"{name}: feat_s and feat_t must be tensors, got {type(feat_s)} and {type(feat_t)}")
    if feat_s.dim() not in (3, 4):
        raise ValueError(
            f"{name}: expected (B, C, H, W) maps or (B, L, C) tokens, got a rank-{feat_s.dim()} tensor of shape "
            f"{tuple(feat_s.shape)}"
        )
    if feat_s.shape != feat_t.shape:
        raise ValueError(
            f"{name}: student and teacher features must have the same shape, got {tuple(feat_s.shape)} and "
            f"{tuple(feat_t.shape)} (align the student to the teacher first)"
        )
    if feat_s.numel() == 0:
        raise ValueError(f"{name}: inputs are empty (shape {tuple(feat_s.shape)})")
    if feat_s.dim() == 3:
        length = feat_s.shape[1]
        h = math.isqrt(length)
        if length % h:
            raise ValueError(
                f"{name}: {length} tokens cannot be viewed as a map of height floor(sqrt(L)) = {h} "
                f"(L must be a multiple of it); remove the class token or other prefix tokens first"
            )


def check_kd_inputs(op: str, logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> None:
    """ValueError unless logits_s, logits_t are same-shape, non-empty (B, K) logits and temperature > 0."""
    if logits_s.shape != logits_t.shape:
        raise ValueError(
            f"{op}: student and teacher logits must have the same shape, got {tuple(logits_s.shape)} and "
            f"{tuple(logits_t.shape)}"
        )
    if logits_s.dim() != 2:
        raise ValueError(f"{op}: expected (B, num_classes) logits, got shape {tuple(logits_s.shape)}")
    if logits_s.numel() == 0:
        raise ValueError(f"{op}: logits are empty (shape {tuple(logits_s.shape)})")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be positive, got {temperature}")


def check_raa_inputs(tokens: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, q_weight: torch.Tensor,
                     q_bias: torch.Tensor, kv_weight: torch.Tensor, kv_bias: torch.Tensor, pos: torch.Tensor,
                     num_heads: int) -> None:
    """ValueError unless tokens is (B, N, D), D divides by num_heads, the weights have their shapes for D and pos
    broadcasts to (B, N, D) with a full last dimension."""
    if tokens.dim() != 3:
        raise ValueError(f"raa_attention: expected tokens of shape (B, N, D), got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    if not isinstance(num_heads, int) or num_heads <= 0 or d % num_heads:
        raise ValueError(
            f"raa_attention: the width D = {d} must be divisible by num_heads, got num_heads = {num_heads!r}"
        )
    expected = {
        "norm_weight": (norm_weight, (d,)),
        "norm_bias": (norm_bias, (d,)),
        "q_weight": (q_weight, (d, d)),
        "q_bias": (q_bias, (d,)),
        "kv_weight": (kv_weight, (2 * d, d)),
        "kv_bias": (kv_bias, (2 * d,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"raa_attention: {name} must have shape {shape} for D = {d}, got {tuple(tensor.shape)}")
    if pos.dim() != 3 or any(p not in (1, full) for p, full in zip(pos.shape, (b, n, d))) or pos.shape[2] != d:
        raise ValueError(
            f"raa_attention: pos must be broadcastable to (B, N, D) = {(b, n, d)} with a full last dimension, "
            f"e.g. (1, {n}, {d}) (paper) or ({b}, 1, {d}) (official); got {tuple(pos.shape)}"
        )


def check_dkd_inputs(op: str, logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, *,
                     soft_labels: bool = True, min_classes: int = 2) -> None:
    """ValueError unless target is (B,) int64 class indices in [0, K) (or, with soft_labels, (B, K) floating soft
    labels) on the logits' device and K >= min_classes (DKD needs a non-target class: 2; OFA's loss 1). Call after
    the logits' own checks.

    The range is checked for CPU tensors only, and not while torch.compile traces: on a GPU it would cost a host
    sync (the kernel makes the loss NaN for a target outside [0, K) instead of reading out of bounds)."""
    b, k = logits_s.shape
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != logits_s.device:
        raise ValueError(f"{op}: target must be on the logits' device, got target on {target.device} and logits on "
                         f"{logits_s.device}")
    labels = "(B,) class indices or (B, K) soft labels" if soft_labels else "(B,) class indices"
    if target.dim() == 2 and soft_labels:
        if tuple(target.shape) != (b, k):
            raise ValueError(f"{op}: soft labels must have the logits' shape {(b, k)}, got {tuple(target.shape)}")
        if not target.is_floating_point():
            raise ValueError(f"{op}: (B, K) soft labels must be floating point, got {target.dtype}")
    elif target.dim() == 1:
        if target.shape[0] != b:
            raise ValueError(f"{op}: target must have one class index per row ({b}), got shape "
                             f"{tuple(target.shape)}")
        if target.dtype != torch.int64:
            raise ValueError(f"{op}: class indices must be int64 (torch.long), got {target.dtype}")
    else:
        raise ValueError(f"{op}: target must be {labels}, got shape {tuple(target.shape)}"
                         + ("" if soft_labels or target.dim() != 2 else
                            " (soft labels: use patfast.ops.dkd_loss, which takes their argmax)"))
    if k < min_classes:
        raise ValueError(f"{op}: needs at least 2 classes, got logits of shape {(b, k)} (with one class there is no "
                         "non-target class: TCKD's log(1 - p_y) is log 0)")
    if target.dim() == 1 and target.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{op}: class indices must be in [0, {k}), got values in [{lo}, {hi}]")


def check_finite_number(op: str, name: str, value) -> float:
    """float(value), or a ValueError unless value is a finite Python number (a loss weight: alpha, beta, gamma)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: {name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)
