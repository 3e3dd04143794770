"""Mixup / CutMix on whole batches after the loader (any backend), with timm's `Mixup`.

`make_mixup(...)` gives a `BatchMixup` or None when both alphas are 0 (then train on hard labels, with label
smoothing in the loss). `mix(images, labels)` -> (images mixed in place, soft targets (B, num_classes) summing to 1).
"""

from __future__ import annotations

import numpy as np
import torch

from patfast.errors import UserError


class BatchMixup:
    """timm Mixup (batch mode, switch prob 0.5 between mixup and cutmix) on (B, C, H, W) images and (B,) labels.

    timm draws lambda from NumPy's global RNG; here it draws from a private RandomState seeded with `seed`, so the
    mixing sequence is reproducible and independent of other NumPy users.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int, *,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0):
        from timm.data import Mixup

        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)
        self.num_classes = num_classes
        self._rng = np.random.RandomState(seed)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float images, (B,) int64 labels -> (mixed images, (B, num_classes) float soft targets)."""
        if images.shape[0] % 2:
            raise UserError(f"mixup/cutmix needs an even batch size, got a batch of {images.shape[0]}")
        outer = np.random.get_state()
        np.random.set_state(self._rng.get_state())
        try:
            images, targets = self.mixup(images, labels)
        finally:
            self._rng.set_state(np.random.get_state())
            np.random.set_state(outer)
        return images, targets

    def state_dict(self) -> dict:
        return {"rng": self._rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._rng.set_state(state["rng"])


def make_mixup(mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, label_smoothing: float = 0.0,
               num_classes: int = 1000, *, prob: float = 1.0, switch_prob: float = 0.5,
               seed: int = 0) -> BatchMixup | None:
    """A BatchMixup, or None when mixup and cutmix are both off (alpha 0) or prob is 0."""
    for name, v in (("mixup alpha", mixup_alpha), ("cutmix alpha", cutmix_alpha)):
        if v < 0:
            raise UserError(f"{name} must be >= 0, got {v}")
    for name, v in (("label smoothing", label_smoothing), ("mixup prob", prob), ("mixup switch prob", switch_prob)):
        if not 0 <= v <= 1:
            raise UserError(f"{name} must be in [0, 1], got {v}")
    if num_classes < 2:
        raise UserError(f"mixup needs at least 2 classes, got {num_classes}")
    if (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
        return None
    return BatchMixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes, prob=prob, switch_prob=switch_prob,
                      seed=seed)
