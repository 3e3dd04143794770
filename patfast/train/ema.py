"""The student's EMA update, skipped on the device when the step was skipped (no host read)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema, model: nn.Module, step: int, keep: torch.Tensor) -> None:
    """timm ModelEmaV3's update (lerp of parameters and float buffers towards the model, copy of the others, its
    decay warm-up) where ``keep`` (a 0-d bool tensor on the model's device) is False; where it is True (a skipped
    step) the EMA stays bit for bit as it was.

    torch.where rather than a zero lerp weight: a skipped step's forward may have left NaN in the model's BatchNorm
    statistics, and NaN * 0 is NaN.
    """
    decay = ema.get_decay(step)
    ema_float, model_float = [], []
    for e, m in zip(ema.module.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            ema_float.append(e)
            model_float.append(m.to(e.dtype))
        else:
            e.copy_(torch.where(keep, e, m))
    if not ema_float:
        return
    moved = torch._foreach_lerp(ema_float, model_float, 1.0 - decay)
    for e, new in zip(ema_float, moved):
        e.copy_(torch.where(keep, e, new))
