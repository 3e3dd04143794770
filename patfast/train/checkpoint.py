"""The training state (last.pth, best.pth): what it holds, writing it atomically, reading it safely, resuming.

A state holds everything that shapes the rest of a run: the trainable modules (student, RAA, aligners, prompt
blocks), the teacher's buffers (the official variant's first-batch switch updates its BatchNorm statistics),
optimizer, grad scaler, EMA, mixup RNG, the position (epoch, batches done in it, global step), the partial sums of
the epoch's loss terms, the PAT feedback, the best metric, the finished epochs' summary rows, the RNG states
(Python, NumPy, torch CPU and CUDA) and the resolved config; under torchrun the feedback, RNG states and partial
sums of every process (gathered into the one file rank 0 writes, so it stays one atomic write). Only tensors and
plain Python values: it is read back
with `torch.load(weights_only=True)`, never executing pickled code.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from patfast.errors import UserError
from patfast.train import faults

VERSION = 1
# Config keys that may change on resume without changing what the run computes.
FREE_KEYS = {"out", "resume", "progress", "workers", "device", "checkpoint_every", "allow_config_change",
             "nonfinite_patience", "config", "compile", "compile_mode", "channels_last"}


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, flush + fsync, rename: a kill at any moment leaves the old file or the new."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    faults.reached("save")
    os.replace(tmp, path)


def rng_state() -> dict:
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng(state) -> list:
    kind, keys, pos, has_gauss, gauss = state
    return [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss]


def per_process_state(distiller, sums: dict[str, float], seen: int, counted: int, skipped: int) -> dict:
    """What differs between torchrun processes: PAT feedback, RNG states, the epoch's partial sums."""
    return {"feedback": {k: v.cpu() if v is not None else None for k, v in distiller.process_state().items()},
            "rng": rng_state(), "sums": dict(sums), "seen": seen, "counted": counted, "skipped": skipped}


def gather_processes(local: dict, world) -> list[dict]:
    """Every process's per_process_state, in rank order (a collective: all processes call it)."""
    if not world.distributed:
        return [local]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, local)
    return out


def training_state(distiller, optimizer, scaler, ema, *, epoch: int, batch: int, step: int, best: dict,
                   rows: list[dict], processes: list[dict], mixup=None, config: dict) -> dict:
    """The state after `batch` batches of epoch `epoch` (batch == the epoch's length: the epoch is finished).
    `processes`: per_process_state of each torchrun process in rank order (one entry for a single process)."""
    return {
        "version": VERSION,
        "distiller": distiller.trainable_state_dict(),
        "teacher_buffers": distiller.shared_state(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.module.state_dict() if ema is not None else None,
        "mixup": _numpy_rng(mixup.state_dict()["rng"]) if mixup is not None else None,
        "processes": processes,
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "best": dict(best),
        "rows": [dict(r) for r in rows],
        "config": dict(config),
    }


def read_state(path: str) -> dict:
    """A training state written by atomic_save, read without executing pickled code; UserError otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or needing code execution
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} safely (weights only): {first}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION or "distiller" not in state:
        raise UserError(f"{path} is not a patfast training state of this version (written by `patfast train`)")
    return state


def read_config(path: str) -> dict:
    """The config a training state was written with (memory-mapped: the weights are not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = read_state(path)  # its message
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise UserError(f"{path} is not a patfast training state of this version (written by `patfast train`)")
    return dict(state["config"])


def check_compatible(saved: dict, cfg: dict, path: str, allow_change: bool) -> list[str]:
    """Keys whose values differ between the checkpoint's config and this one (UserError unless allowed; the
    epochs may always change: a longer run extends it, its cosine schedule recomputed for the new length)."""
    from patfast.train.config import BY_NAME

    # a key the checkpoint lacks (an option added since it was written) had its default then
    saved = {**{k: BY_NAME[k].default for k in cfg if k not in saved and k in BY_NAME}, **saved}
    keys = sorted((set(saved) | set(cfg)) - FREE_KEYS - {"epochs"})
    changed = [k for k in keys if saved.get(k) != cfg.get(k)]
    if changed and not allow_change:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {cfg.get(k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"cannot resume from {path}: the run was made with another config: {shown}{more} "
                        "(--allow-config-change to resume anyway)")
    return changed


def restore(state: dict, distiller, optimizer, scaler, ema, mixup, rank: int = 0, world_size: int = 1) -> dict:
    """Load a state into freshly built objects (same config): modules, optimizer, scaler, EMA, mixup, and this
    process's feedback and RNG states. Returns this process's entry (partial sums); the position (epoch, batch,
    step) is the caller's to use."""
    if len(state["processes"]) != world_size:
        raise UserError(f"the checkpoint was written by {len(state['processes'])} process(es); resume it with as "
                        f"many (this run has {world_size})")
    mine = state["processes"][rank]
    missing, unexpected = distiller.load_trainable_state_dict(state["distiller"])
    if missing or unexpected:
        raise UserError(f"the checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    distiller.load_shared_state(state["teacher_buffers"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"] is not None:
        ema.module.load_state_dict(state["ema"])
    if mixup is not None and state["mixup"] is not None:
        kind, keys, pos, has_gauss, gauss = state["mixup"]
        mixup.load_state_dict({"rng": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)})
    device = next(distiller.parameters()).device
    distiller.load_process_state({k: v.to(device) if v is not None else None for k, v in mine["feedback"].items()})
    set_rng_state(mine["rng"])
    return mine
