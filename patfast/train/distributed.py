"""Data-parallel training under torchrun: process group, gradient averaging, collective sums.

`torchrun --nproc_per_node N -m patfast train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the group
(NCCL on CUDA, gloo on the CPU). Gradients are averaged by one all-reduce of the flattened trainable gradients after
the backward (a gradient that is None — PAT's fusion blocks before the first feedback exists, on every rank alike —
stays None), so no DDP wrapper and no find_unused_parameters scan are needed; the compiled forward stays one graph.
BatchNorm normalises with per-process batch statistics (no SyncBatchNorm); the running statistics are made rank 0's
on every process before each evaluation and checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (no-op for a single process)."""
    world = from_env()
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Mean of every trainable gradient over the ranks, in one all-reduce (None -> zeros, then kept)."""
    if not world.distributed:
        return
    unused = [p.grad is None for p in params]  # the same on every rank (the same graph)
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, none in zip(params, unused):
        n = p.numel()
        if not none:  # a parameter without a gradient stays without one: the optimizer skips it, as on one rank
            p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of `values` over the ranks (in place; returned)."""
    if world.distributed:
        dist.all_reduce(values)
    return values


def all_max(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank (the same seed builds the same model; this makes sure)."""
    if not world.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics, which each process updates from its own batches) on every
    process: done before evaluating and at each checkpoint, so every process evaluates the model rank 0 saves and a
    resumed run continues from exactly the state the uninterrupted one had."""
    if not world.distributed:
        return
    with torch.no_grad():
        for t in module.buffers():
            dist.broadcast(t.data, src=0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def any_signal(signum: int | None, device: torch.device, world: World) -> int | None:
    """The largest signal number any process has received (None: none): a collective, every process calls it at the
    same step."""
    flag = all_max(torch.tensor([signum or 0], device=device), world)
    return int(flag.item()) or None


def sync_batchnorm(distiller: torch.nn.Module, world: World, device: torch.device, log) -> None:
    """--sync-bn: every BatchNorm that learns (student, aligners, prompt blocks) becomes a SyncBatchNorm, in place;
    the frozen teacher keeps its own. timm's conversion (its BatchNormAct2d keep their activation) and the hooks on a
    converted module (a stage tap may sit on a BatchNorm) move to its replacement. One process: nothing to
    synchronise (said, ignored). torch runs SyncBatchNorm on CUDA only: a UserError elsewhere."""
    from timm.layers import convert_sync_batchnorm

    from patfast.errors import UserError

    if not world.distributed:
        log("--sync-bn: one process, nothing to synchronise (ignored)")
        return
    if device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    for name, child in distiller.named_children():
        if name == "teacher":
            continue
        hooks = {n: (m._forward_hooks, m._forward_pre_hooks) for n, m in child.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m._forward_hooks or m._forward_pre_hooks)}
        converted = convert_sync_batchnorm(child)
        modules = dict(converted.named_modules())
        for n, (forward, pre) in hooks.items():
            modules[n]._forward_hooks.update(forward)
            modules[n]._forward_pre_hooks.update(pre)
        setattr(distiller, name, converted)
