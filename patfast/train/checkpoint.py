"""Writing the training state (last.pth) atomically: temporary file, flush + fsync, rename."""

from __future__ import annotations

import os

import torch


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def training_state(distiller, optimizer, scaler, ema, *, epoch: int, step: int, best: dict, config: dict) -> dict:
    """Everything needed to continue a run (the frozen teacher excluded: it comes from its own checkpoint)."""
    return {
        "distiller": distiller.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.module.state_dict() if ema is not None else None,
        "epoch": epoch,
        "step": step,
        "best": best,
        "config": config,
    }
