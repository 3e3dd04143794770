"""The ground-truth CE keeps float64 (a float64 comparison with another implementation is not capped at ~1e-7)
and promotes 16-bit logits to float32."""

import torch

from patfast.distill.base import classification_loss


def _smoothed_ce(logits, y, eps):
    logp = torch.log_softmax(logits.double(), -1)
    k = logits.shape[-1]
    target = torch.full_like(logp, eps / k).scatter_(1, y[:, None], 1 - eps + eps / k)
    return -(target * logp).sum(-1).mean()


def test_float64_stays_float64_and_16_bit_is_promoted():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 11, (7,), generator=g)
    loss = classification_loss(logits, y, 0.1)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - _smoothed_ce(logits, y, 0.1).item()) < 1e-12
    soft = torch.softmax(torch.randn(7, 11, generator=g, dtype=torch.float64), -1)
    assert classification_loss(logits, soft, 0.1).dtype == torch.float64
    assert classification_loss(logits.half(), y, 0.1).dtype == torch.float32
    assert classification_loss(logits.bfloat16(), soft.bfloat16(), 0.1).dtype == torch.float32
