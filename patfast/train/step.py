"""One training step (forward, backward, clip, optimizer, EMA), on the fast path or the reference path.

Fast path (the default on CUDA): the distiller's whole forward under torch.compile (student, both teacher passes,
prompt blocks, RAA and aligners in one region; `mode` as torch.compile's, "reduce-overhead" adds CUDA graphs),
bf16 autocast without a grad scaler, channels_last for conv models, the Triton ops through patfast.ops "auto", the
aligners' exact upsample-last rewrite, a fused optimizer on CUDA. The one host read in a step is the non-finite
check, made after the backward is queued; the loss terms are returned detached on the device and summed there.
Reference path (`--backend reference --no-compile --amp fp16`): eager, fp16 autocast + grad scaler, reference ops,
the aligners' plain order: how the authors' code runs.

Both compute the same algorithm: tests/train/test_fast_path.py checks loss terms and gradients over several steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from patfast.errors import UserError
from patfast.train.distributed import all_max, average_gradients

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Speed:
    """How a step runs: compile (mode), autocast dtype (None: fp32), grad scaler, channels_last."""

    compile: bool
    compile_mode: str
    amp: torch.dtype | None
    channels_last: bool

    @property
    def scaler(self) -> bool:
        return self.amp == torch.float16

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}[self.amp]
        compiled = f"torch.compile ({self.compile_mode})" if self.compile else "eager"
        return f"{compiled}, {amp}" + (", channels_last" if self.channels_last else "")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp value -> autocast dtype (None: fp32); "auto" is bf16 on CUDA, fp32 on the CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def resolve_speed(cfg: dict, device: torch.device) -> Speed:
    """compile / channels_last "auto" (None) -> on for CUDA, off on the CPU; amp "auto" -> bf16 on CUDA."""
    mode = cfg.get("compile_mode") or "default"
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
    cuda = device.type == "cuda"
    compile_ = cfg.get("compile")
    channels_last = cfg.get("channels_last")
    return Speed(compile=cuda if compile_ is None else bool(compile_), compile_mode=mode,
                 amp=amp_dtype(cfg.get("amp") or "auto", device),
                 channels_last=cuda if channels_last is None else bool(channels_last))


def avoid_cpu_outer_loop_fusion() -> None:
    """Turn off Inductor's C++ outer-loop fusion, which crashes on the PAT step on the CPU in torch 2.14
    ("KeyError: 'bufN'" in try_outer_loop_fusion_with_local_buf, pytorch/pytorch#188228 and #196570, open). Only
    a fusion heuristic: the generated code computes the same values."""
    try:
        from torch._inductor.codegen.cpp import CppScheduling
    except ImportError:
        return
    if hasattr(CppScheduling, "_get_outer_loop_fusion_depth"):
        CppScheduling._get_outer_loop_fusion_depth = lambda self, node1, node2: 0


def has_convs(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


class TrainStep:
    """step(x, y, first_batch) -> {term: detached loss (on device)}; applies the update unless the loss is NaN/Inf
    (then `skipped` is True and nothing changes).

    `forward` is the distiller or its compiled version; `optimizer`, `scaler` (None without fp16), `clip` (0: off),
    `ema` (timm ModelEmaV3 or None) as the loop builds them.
    """

    def __init__(self, distiller, optimizer, params, speed: Speed, device: torch.device, *, clip: float = 0.0,
                 ema=None, world=None):
        from patfast.train.distributed import World

        self.world = world or World()
        self.distiller, self.optimizer, self.params = distiller, optimizer, params
        self.speed, self.device, self.clip, self.ema = speed, device, clip, ema
        self.skipped = False
        self.scaler = torch.amp.GradScaler(device.type) if speed.scaler else None
        if speed.channels_last and has_convs(distiller):
            distiller.to(memory_format=torch.channels_last)  # 4-D parameters only; others are unchanged
        self.forward = distiller
        if speed.compile and device.type == "cpu":
            avoid_cpu_outer_loop_fusion()
        if speed.compile:
            # One region: the hooks that tap stage features and insert prompts are traced with the modules.
            mode = None if speed.compile_mode == "default" else speed.compile_mode
            self.forward = torch.compile(distiller, mode=mode)
        # The official variant's first-batch switch is the only Python value that changes between steps: pass it only
        # where it matters, so the paper variant compiles one graph.
        variant = getattr(distiller, "variant", None)
        self.uses_first_batch = bool(variant is not None and variant.teacher_train_first_batch)
        self.prompts = list(getattr(distiller, "prompts", {}).values())

    def _forward(self):
        """The compiled forward once every prompt block has feedback; before that (PAT's first step, which skips
        the fusion block) the eager one, so that only the steady-state graph is ever compiled."""
        if self.forward is not self.distiller and any(p.feedback is None for p in self.prompts):
            return self.distiller
        return self.forward

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.speed.amp) if self.speed.amp else nullcontext()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, step: int = 0, first_batch: bool = False
                 ) -> dict[str, torch.Tensor]:
        if self.speed.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = self._forward()
        with self.autocast():
            if self.uses_first_batch:
                _, losses = forward(x, y, first_batch=first_batch)
            else:
                _, losses = forward(x, y)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        average_gradients(self.params, self.world)  # torchrun: the mean over the ranks (no-op on one)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # after the mean: every rank sees the same inf/NaN
        # The non-finite guard: the step's one host read, after the backward is queued (only the optimizer's
        # launch waits for it). A NaN/Inf loss (on any rank) skips the update (and the EMA); the caller counts it.
        bad = all_max((~torch.isfinite(loss.detach())).float().reshape(1), self.world)
        self.skipped = bool(bad.item())
        if self.skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale as a skipped fp16 step does
            return {k: v.detach() for k, v in losses.items()}
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.distiller.student, step=step)
        return {k: v.detach() for k, v in losses.items()}
