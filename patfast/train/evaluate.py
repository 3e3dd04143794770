"""Top-1 / top-5 accuracy of a model over a loader, summed over the processes under torchrun."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm import tqdm

from patfast.train import distributed as dist_
from patfast.train.distributed import World


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
             progress: bool = False, desc: str = "eval", world: World | None = None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `model` over the loader (summed over the ranks' shards under torchrun)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    k = min(5, loader.num_classes)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(x)
        top = logits.float().topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    if world is not None and world.distributed:
        counts = dist_.all_sum(torch.tensor([correct1, correct5, total], dtype=torch.float64, device=device), world)
        correct1, correct5, total = counts.tolist()
    return 100.0 * correct1 / total, 100.0 * correct5 / total
