"""A PAT training step on synthetic data, timed: the rate a data loader has to keep up with.

Random-initialised timm models (the rate does not depend on the weights), synthetic images and labels already on
the device, SGD over everything PAT trains. CUDA: CUDA events around `steps` steps after `warmup` steps. CPU: host
clock (only for dry runs).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch


def build_pat_step(teacher: str, student: str, batch: int, img_size: int, device: torch.device,
                   num_classes: int = 100, amp: torch.dtype | None = None):
    """A function doing one PAT step (forward, backward, SGD) on fixed synthetic data."""
    from patfast.distill.build import build_distiller
    from patfast.models.create import create_model

    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    s_model = create_model(student, num_classes, img_size)
    t_model = create_model(teacher, num_classes, img_size)
    distiller = build_distiller("pat", s_model, t_model, img_size=img_size, data_mean=mean, data_std=std).to(device)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def step(first: bool = False):
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            _, losses = distiller(x, y, first_batch=first)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pat_step_rate(teacher: str, student: str, batch: int, img_size: int, device: torch.device, *, steps: int = 10,
                  warmup: int = 3, amp: torch.dtype | None = None) -> dict:
    """Images/s a PAT step of (teacher -> student) consumes at (batch, img_size) -> {"img_s", "step_ms", "timer"}."""
    step = build_pat_step(teacher, student, batch, img_size, device, amp=amp)
    for i in range(warmup):
        step(first=i == 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        ms, timer = start.elapsed_time(end) / steps, "CUDA events"
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms, timer = (time.perf_counter() - t0) * 1e3 / steps, "host clock (CPU)"
    return {"img_s": batch * 1e3 / ms, "step_ms": ms, "timer": timer}
