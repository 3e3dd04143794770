"""One training step (forward, backward, clip, optimizer, EMA), on the fast path or the reference path.

Fast path (the default on CUDA): the distiller's whole forward under torch.compile (student, both teacher passes,
prompt blocks, RAA and aligners in one region; `mode` as torch.compile's, "reduce-overhead" adds CUDA graphs),
bf16 autocast without a grad scaler, channels_last for conv models, the Triton ops through patfast.ops "auto", the
aligners' exact upsample-last rewrite, a fused optimizer. Nothing in a step reads the device from the host: the
loss terms are returned detached on the device, and the non-finite guard is decided there too (`bad`, a 0-d bool
tensor): a fused optimizer gets it as its `found_inf` (the mechanism GradScaler uses: the kernel leaves parameters
and state untouched) and the EMA update is masked by it; the loop reads the counts every few steps.
Reference path (`--backend reference --no-compile --amp fp16`): eager, fp16 autocast + grad scaler, reference ops,
the aligners' plain order: how the authors' code runs.

Both compute the same algorithm: tests/train/test_fast_path.py checks loss terms and gradients over several steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from patfast.errors import UserError
from patfast.train.config import COMPILE_MODES
from patfast.train.distributed import all_max, average_gradients
from patfast.train.ema import update_ema


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
    """step(x, y, first_batch) -> {term: detached loss (on device)}; applies the update unless the loss is NaN/Inf.

    After each call `bad` is a 0-d bool tensor on the device: True when the step was skipped (then no parameter,
    optimizer state or EMA value changed). Reading it is the caller's business (the loop does so every few steps).
    `forward` is the distiller or its compiled version; `optimizer`, `scaler` (None without fp16), `clip` (0: off),
    `ema` (timm ModelEmaV3 or None) as the loop builds them.

    accum N > 1 (gradient accumulation): x, y hold N micro-batches; each is forwarded and backpropagated alone (its
    loss divided by N), then one update. For distillers without batch statistics this equals one batch of N times
    the size (up to float rounding); BatchNorm normalises each micro-batch alone and updates its running statistics
    N times, as N processes without SyncBatchNorm would. PAT's feedback then comes from the previous micro-batch.
    """

    def __init__(self, distiller, optimizer, params, speed: Speed, device: torch.device, *, clip: float = 0.0,
                 ema=None, world=None, accum: int = 1):
        from patfast.train.distributed import World

        self.world = world or World()
        self.accum = accum
        self.distiller, self.optimizer, self.params = distiller, optimizer, params
        self.speed, self.device, self.clip, self.ema = speed, device, clip, ema
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
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
        self.uses_first_batch = distiller.first_batch_special
        self.device_skip = supports_found_inf(optimizer)
        self._primed = False  # momentum buffers made at the first step: after a resume has loaded the state

    def _forward(self):
        """The compiled forward once the distiller is compile_ready; before that (PAT's first step, which skips
        the fusion block) the eager one, so that only the steady-state graph is ever compiled."""
        if self.forward is not self.distiller and not self.distiller.compile_ready():
            return self.distiller
        return self.forward

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.speed.amp) if self.speed.amp else nullcontext()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, step: int = 0, first_batch: bool = False
                 ) -> dict[str, torch.Tensor]:
        if self.speed.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[0] % self.accum:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {self.accum} micro-batches")
        before = self.distiller.process_state()
        self.optimizer.zero_grad(set_to_none=True)
        totals, nonfinite = {}, []
        for xm, ym in zip(x.chunk(self.accum), y.chunk(self.accum)):
            forward = self._forward()
            with self.autocast():
                if self.uses_first_batch:  # every micro-batch of an epoch's first step, as every process's first
                    _, losses = forward(xm, ym, first_batch=first_batch)
                else:
                    _, losses = forward(xm, ym)
            loss = sum(losses.values())
            if self.accum > 1:
                loss = loss / self.accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            nonfinite.append(~torch.isfinite(loss.detach()))
            for k, v in losses.items():
                v = v.detach() / self.accum if self.accum > 1 else v.detach()
                totals[k] = totals[k] + v if k in totals else v
        average_gradients(self.params, self.world)  # torchrun: the mean over the ranks (no-op on one)
        # The non-finite guard, on the device: a NaN/Inf loss on any rank skips the update (and the EMA) everywhere.
        bad = torch.stack(nonfinite).any() if self.accum > 1 else nonfinite[0]
        self.bad = all_max(bad.float().reshape(1), self.world).reshape(()) > 0
        self._keep_process_state(before)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # after the mean: every rank sees the same inf/NaN
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self._optimizer_step()
        if self.ema is not None:
            update_ema(self.ema, self.distiller.student, step, keep=self.bad)
        return totals

    def _keep_process_state(self, before: dict) -> None:
        """A skipped step leaves the distiller's per-process state (PAT's feedback) as it was (its own would carry
        NaN into the next step): a torch.where on the device; only where the state did not exist before (None, a
        different graph: PAT's first step) is `bad` read on the host, once."""
        after = self.distiller.process_state()
        if not after:
            return
        if any(before.get(k) is None and v is not None for k, v in after.items()):
            if bool(self.bad):
                self.distiller.load_process_state(before)
            return
        self.distiller.load_process_state({k: torch.where(self.bad, before[k], v) if v is not None else v
                                           for k, v in after.items()})

    def _optimizer_step(self) -> None:
        """optimizer.step() unless `bad`: decided on the device for a fused optimizer (its found_inf), on the host
        for others (only ever the CPU, whose tensors a host read does not wait for)."""
        if self.device_skip and not self._primed:
            prime_momentum(self.optimizer)
            self._primed = True
        if self.scaler is not None:
            if self.device_skip and merge_into_found_inf(self.scaler, self.optimizer, self.bad):
                self.scaler.step(self.optimizer)  # fused: GradScaler hands found_inf to the kernel, no host read
            elif not bool(self.bad):  # GradScaler itself reads found_inf on the host for a non-fused optimizer
                self.scaler.step(self.optimizer)
            self.scaler.update()  # a skipped step lowers the scale, as an overflow does
            return
        if self.device_skip:
            self.optimizer.found_inf = self.bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(self.bad):
            self.optimizer.step()


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused optimizers (SGD, Adam, AdamW with fused=True): their kernel skips the whole update,
    step counts included, when the tensor attribute `found_inf` is 1 — a skip decided without a host read."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for every SGD parameter that has none yet (dampening 0: the same update as the first
    step's copy of the gradient, bit for bit).

    Fused SGD (torch 2.11-2.14) needs them: on a step where some parameters have a buffer and others do not (PAT's
    fusion blocks get their first gradient on step 1, after everything else), it raises "expected Tensor as element
    1 in argument 2, but got NoneType"; and a first step skipped through found_inf would leave its buffers
    uninitialised (torch.empty_like).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group["dampening"] != 0:
            raise ValueError("prime_momentum: SGD dampening must be 0 (a zero buffer is then exact)")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def merge_into_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> bool:
    """Fold `bad` into the inf/NaN flags that scaler.unscale_ found, on the device; False if this torch's GradScaler
    keeps them elsewhere (then the caller decides on the host)."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    flags = state.get("found_inf_per_device")
    if not flags:
        return False
    for flag in flags.values():
        torch.maximum(flag, bad.to(flag.dtype), out=flag)  # stays 0 or 1: fused kernels skip on exactly 1
    return True
