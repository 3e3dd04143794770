"""Eager PyTorch reference of every patfast op: the truth for tests, the CPU path, the benchmark baseline.

Readable on purpose: each function is the formula of SPEC sections 1-3 written with stock torch ops, the way the
official PAT code computes it. The Triton kernels (hcl.py, kd.py, raa.py beside this file) must match these. The inputs
are checked where they enter (patfast/ops.py, with checks.py): here is only the math.

Inputs may each have their own dtype (a bf16 student map against an fp32 teacher feature): every function computes
in their promoted dtype (``torch.promote_types``), so autograd returns each gradient in its own input's dtype.
``upcast=True`` first takes every 16-bit input (float16 / bfloat16) to float32, like flash-attention's
``layer_norm_ref``: use it as the higher-precision truth when judging a 16-bit kernel, and ``upcast=False`` (the
default, plain eager PyTorch in the promoted input dtype) to measure PyTorch's own error at that dtype. The losses
come back in the compute dtype (float32 with upcast, as autocast does for mse_loss / kl_div); ``raa_attention_ref``
casts its output to the dtype of ``tokens``. Under torch.autocast, ``raa_attention_ref`` leaves the casts of its
front (LayerNorm, Linear) to autocast.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["hcl_loss_ref", "kd_loss_ref", "raa_attention_ref", "tokens_to_map", "to_common_dtype", "HCL_LEVELS",
           "LAYER_NORM_EPS", "dkd_loss_ref", "dist_loss_ref", "ofa_loss_ref", "fitnet_loss_ref", "hard_targets",
           "DKD_MASK"]

HCL_LEVELS = (4, 2, 1)  # pooled pyramid levels of HCL, each used only when level < map height
LAYER_NORM_EPS = 1e-5

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor, upcast: bool) -> torch.Tensor:
    return x.float() if upcast and x.dtype in _HALF_DTYPES else x


def to_common_dtype(tensors, upcast: bool = False) -> list[torch.Tensor]:
    """``tensors`` in their promoted dtype (16-bit ones first to float32 with ``upcast``); no copy of one in it."""
    xs = [_upcast(x, upcast) for x in tensors]
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """(B, L, C) tokens -> (B, C, h, w) map, h = floor(sqrt(L)), w = L // h ("b (h w) c -> b c h w").

    Token ``r * w + c`` becomes pixel (r, c). L must equal h * w: drop any class token first.
    """
    b, length, c = x.shape
    h = math.isqrt(length)
    w = length // h if h > 0 else 0
    if h * w != length:
        raise ValueError(
            f"cannot view {length} tokens as an h x w map with h = floor(sqrt(L)) = {h}: L must equal h * (L // h); "
            "remove the class token (or other prefix tokens) first"
        )
    return x.transpose(1, 2).reshape(b, c, h, w)


def hcl_loss_ref(feat_s: torch.Tensor, feat_t: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Hierarchical context loss of one stage (SPEC section 2) -> scalar.

    feat_s, feat_t: (B, C, H, W) maps or (B, L, C) tokens (viewed as maps by ``tokens_to_map``), same shape.
    loss = ( mse(fs, ft) + sum_l w_l * mse(pool_l(fs), pool_l(ft)) ) / (1 + sum_l w_l)
    over levels l in (4, 2, 1) with l < H (H = map height, whatever W is), w = 1/2, 1/4, 1/8 in the order the
    levels are used; pool_l = adaptive_avg_pool2d(., l) (overlapping bins when l does not divide the size); mse
    averages over every element. Differentiable in both inputs (the teacher side is not detached).
    """
    fs, ft = to_common_dtype((feat_s, feat_t), upcast)
    if fs.dim() == 3:
        fs, ft = tokens_to_map(fs), tokens_to_map(ft)
    height = fs.shape[2]
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= height:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


def kd_loss_ref(
    logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0, *, upcast: bool = False
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, mean over the batch, times T^2 -> scalar.

    logits_s, logits_t: (B, K). Exactly the official code's
    ``kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2``, computed with log-space targets
    (``log_target=True``): the same values, and gradients to logits_t stay finite where a target probability
    underflows to 0 (the probability-space form gives NaN there).
    """
    s, t = to_common_dtype((logits_s, logits_t), upcast)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def raa_attention_ref(
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
    upcast: bool = False,
) -> torch.Tensor:
    """Region-aware attention core (SPEC section 3) -> (B, N, D).

    tokens (B, N, D); norm_weight, norm_bias (D,); q_weight (D, D), q_bias (D,); kv_weight (2D, D), kv_bias (2D,);
    pos broadcastable to (B, N, D): (1, N, D) in the paper variant, (B, 1, D) in the official one.
    xn = LayerNorm(tokens) (eps 1e-5); q = xn Wq^T + bq + pos; [k | v] = xn Wkv^T + bkv (k = first D features);
    k = k + pos; per head (head_dim = D // num_heads, head h = features h*hd:(h+1)*hd):
    softmax(q k^T * head_dim^-0.5) v; heads merged back to (B, N, D). No output projection, no residual.
    """
    dtype = tokens.dtype
    inputs = (tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos)
    if torch.is_autocast_enabled(tokens.device.type):  # autocast casts each op's inputs its own way
        x, nw, nb, qw, qb, kvw, kvb, p = (_upcast(t, upcast) for t in inputs)
    else:  # F.linear refuses mixed dtypes: one compute dtype for the whole block
        x, nw, nb, qw, qb, kvw, kvb, p = to_common_dtype(inputs, upcast)
    b, n, d = x.shape
    head_dim = d // num_heads

    xn = F.layer_norm(x, (d,), nw, nb, LAYER_NORM_EPS)
    q = F.linear(xn, qw, qb) + p
    k, v = F.linear(xn, kvw, kvb).split(d, dim=-1)
    k = k + p

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, heads, N, head_dim)
        return t.reshape(b, n, num_heads, head_dim).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * head_dim**-0.5, dim=-1)  # (B, heads, N, N)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return out.to(dtype)


def hcl_loss_stages_ref(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor], *,
                        upcast: bool = False) -> torch.Tensor:
    """Sum over stages of hcl_loss_ref(feats_s[i], feats_t[i]) -> scalar (PAT's loss_fd before its weight)."""
    return sum(hcl_loss_ref(a, b, upcast=upcast) for a, b in zip(feats_s, feats_t))


def kd_loss_pair_ref(logits_s: torch.Tensor, logits_pt: torch.Tensor, logits_t: torch.Tensor,
                     temperature: float = 1.0, *, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PAT's (loss_kd, loss_reg) = (kd_loss_ref(s, t, T), kd_loss_ref(pt, t, 1)); (B, K) logits each."""
    return (kd_loss_ref(logits_s, logits_t, temperature, upcast=upcast),
            kd_loss_ref(logits_pt, logits_t, 1.0, upcast=upcast))


# ---------------------------------------------------------------------------------------------------------------
# The baselines' losses (issue 14): each the formula of its authors' code, with log-space where they take log(softmax)
# ---------------------------------------------------------------------------------------------------------------

DKD_MASK = 1000.0  # mdistiller subtracts this from the target logit (at T) before NCKD's softmaxes


def hard_targets(target: torch.Tensor) -> torch.Tensor:
    """(B,) class indices from (B,) indices or (B, K) soft labels (their argmax, as DKD's and OFA's code take)."""
    return target.argmax(dim=-1) if target.dim() == 2 else target


def dkd_loss_ref(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, *, upcast: bool = False) -> torch.Tensor:
    """Decoupled KD (mdistiller ``dkd_loss``) -> scalar: alpha * TCKD + beta * NCKD.

    logits (B, K), target (B,) indices or (B, K) soft labels (argmax). p = softmax(z / T).
    TCKD = T^2 * batchmean KL([q_y, 1 - q_y] || [p_y, 1 - p_y]) (y the target; student log of the binary sums);
    NCKD = T^2 * batchmean KL(softmax(z_t / T - 1000 [c = y]) || softmax(z_s / T - 1000 [c = y])).
    """
    s, t = to_common_dtype((logits_s, logits_t), upcast)
    y = hard_targets(target)
    gt = F.one_hot(y, s.shape[-1]).to(torch.bool)
    p_s, p_t = F.softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1)
    pairs_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], dim=-1)
    pairs_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], dim=-1)
    tckd = F.kl_div(torch.log(pairs_s), pairs_t, reduction="batchmean") * temperature**2
    mask = DKD_MASK * gt.to(s.dtype)
    # log-space target (as kd_loss_ref): the same value; the teacher's gradient stays finite where its masked
    # probability underflows to 0 (mdistiller's probability-space form gives NaN there)
    nckd = F.kl_div(F.log_softmax(s / temperature - mask, dim=-1), F.log_softmax(t / temperature - mask, dim=-1),
                    reduction="batchmean", log_target=True) * temperature**2
    return alpha * tckd + beta * nckd


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B,) Pearson correlation of each row of a with the same row of b (OFA-KD's, with its eps in the divisor)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss_ref(logits_s: torch.Tensor, logits_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
                  temperature: float = 1.0, *, upcast: bool = False) -> torch.Tensor:
    """DIST (OFA-KD ``dist_loss``) -> scalar: beta T^2 (1 - mean_b pearson over classes of the softmaxes at T)
    + gamma T^2 (1 - mean_c pearson over the batch). logits (B, K)."""
    s, t = to_common_dtype((logits_s, logits_t), upcast)
    y_s, y_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
    return beta * temperature**2 * inter + gamma * temperature**2 * intra


def ofa_loss_ref(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                 temperature: float = 1.0, *, upcast: bool = False) -> torch.Tensor:
    """OFA's branch loss (OFA-KD ``ofa_loss``) -> scalar: mean_b sum_c -((q_c + [c = y])^eps - [c = y]) log p_c.

    p = softmax(z_s / T), q = softmax(z_t / T); target (B,) indices or (B, K) soft labels (argmax); no T^2. log p by
    log_softmax (OFA-KD takes log(softmax), which gives -inf and then NaN where p underflows: the same value, finite).
    """
    s, t = to_common_dtype((logits_s, logits_t), upcast)
    mask = F.one_hot(hard_targets(target), s.shape[-1]).to(s.dtype)
    weight = (F.softmax(t / temperature, dim=1) + mask) ** eps - mask
    return torch.sum(-weight * F.log_softmax(s / temperature, dim=1), dim=-1).mean()


def fitnet_loss_ref(feat_s: torch.Tensor, feat_t: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """FitNet's hint loss of one stage: MSE over every element of same-shape features -> scalar."""
    fs, ft = to_common_dtype((feat_s, feat_t), upcast)
    return F.mse_loss(fs, ft)
