"""Moving between a timm model's token/NHWC tensors and (B, C, h, w) maps, and where its class token sits.

Two rules for the class token (SPEC section 6, difference 4):
  "first": the model's `num_prefix_tokens` leading tokens are prefix tokens (timm ViT/DeiT; 0 for Mixer/ResMLP).
  "last":  the official code's rule: when the token count is not a perfect square, the LAST token is taken as
           the class token.
Two rules for going back from a map to tokens (difference 1):
  "transpose": flatten(2).transpose(1, 2), the right way;
  "reshape":   a plain reshape (B, C, h, w) -> (B, h*w, C) that scrambles the tokens (the official code).
"""

from __future__ import annotations

import math

import torch


def split_prefix(tokens: torch.Tensor, num_prefix: int, rule: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, C) -> (spatial tokens (B, L', C), prefix tokens (B, P, C) or None)."""
    if rule == "first":
        if num_prefix == 0:
            return tokens, None
        return tokens[:, num_prefix:], tokens[:, :num_prefix]
    if rule == "last":
        n = tokens.shape[1]
        if math.isqrt(n) ** 2 == n:
            return tokens, None
        return tokens[:, :-1], tokens[:, -1:]
    raise ValueError(f"unknown class-token rule {rule!r}")


def join_prefix(spatial: torch.Tensor, prefix: torch.Tensor | None, rule: str) -> torch.Tensor:
    """Inverse of split_prefix: put the prefix tokens back where the rule took them from."""
    if prefix is None:
        return spatial
    return torch.cat([prefix, spatial] if rule == "first" else [spatial, prefix], dim=1)


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, C, h, w), h = floor(sqrt(L)), w = L // h: the "b (h w) c -> b c h w" rearrange."""
    b, n, c = tokens.shape
    h = math.isqrt(n)
    if n % h:
        raise ValueError(f"{n} tokens do not form a grid with height {h}")
    return tokens.transpose(1, 2).reshape(b, c, h, n // h)


def map_to_tokens(x: torch.Tensor, rule: str = "transpose") -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C) by the given rule ("transpose" right, "reshape" the official scramble)."""
    b, c, h, w = x.shape
    if rule == "transpose":
        return x.flatten(2).transpose(1, 2)
    if rule == "reshape":
        return x.reshape(b, h * w, c)
    raise ValueError(f"unknown map-to-tokens rule {rule!r}")


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height * width, C) -> (B, C, height, width): token r * width + c at pixel (r, c), on any grid."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not fill a {height} x {width} grid")
    return tokens.transpose(1, 2).reshape(b, c, height, width)
