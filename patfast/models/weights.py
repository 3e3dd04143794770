"""Weights files in and out: .safetensors and torch files (read weights-only), strict loading with the mismatches
named, atomic .safetensors writing; every failure a one-line UserError."""

from __future__ import annotations

import json
import os
import stat

import torch
from torch import nn

from patfast.errors import UserError


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) from a .safetensors file or a torch file, never executing pickled code.

    Torch files may hold the weights directly or under "state_dict", "model", "student" or "model_ema";
    a "module." prefix (DDP) is removed.
    """
    check_file(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read checkpoint {path}: {first}") from None
        return state, meta
    return unwrap_state(torch_load(path), path)


def is_training_state(obj) -> bool:
    """Whether a torch file held a patfast training state (last.pth / best.pth of `patfast train` or `teacher`)."""
    return isinstance(obj, dict) and isinstance(obj.get("distiller"), dict) and isinstance(obj.get("config"), dict)


def training_state_weights(state: dict, path: str, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, metadata) of the model a training state trained (a `train` run's student, a `teacher` run's
    teacher; with use_ema its EMA copy): metadata as a .safetensors file of it would hold (model, img_size, data)."""
    cfg = state["config"]
    if use_ema:
        if not isinstance(state.get("ema"), dict):
            raise UserError(f"{path} holds no EMA weights (the run had --no-model-ema)")
        weights = dict(state["ema"])
    else:
        weights = {k.removeprefix("student."): v for k, v in state["distiller"].items() if k.startswith("student.")}
    if not weights:
        raise UserError(f"{path} holds no model weights (not a last.pth of `patfast train` or `teacher`)")
    model = cfg.get("teacher") if cfg.get("command") == "teacher" else cfg.get("student")
    meta = {k: str(v) for k, v in (("model", model), ("img_size", cfg.get("img_size")), ("data", cfg.get("data")))
            if v is not None}
    return weights, meta


def checkpoint_meta(path: str) -> dict[str, str]:
    """What a weights file says about itself (model, img_size, data...) without reading its weights: a .safetensors
    header, a training state's config; {} for other files or when unreadable (loading them reports why)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return dict(f.metadata() or {})
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return training_state_weights(obj, path)[1] if is_training_state(obj) else {}
    except Exception:
        return {}


def unwrap_state(obj, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) out of what a torch file held: the weights directly or under "state_dict", "model",
    "student" or "model_ema" (the first of these present), metadata under "meta"; a "module." prefix is removed."""
    meta: dict[str, str] = {}
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "student", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                meta = {k: str(v) for k, v in obj.get("meta", {}).items()} if isinstance(obj.get("meta"), dict) else {}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, meta


def check_file(path: str) -> None:
    """A UserError unless `path` is a regular file that can be opened for reading."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory, not a weights file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint {path} is not readable (permission denied)")


def torch_load(path: str, *, allow: tuple = ()):
    """torch.load(path, weights_only=True) on the CPU: no code from the file runs; a UserError says why it failed.

    `allow`: classes the file may hold besides torch's weights-only defaults, for this load only (e.g.
    argparse.Namespace, which timm's training checkpoints carry as their "args"); only those classes are rebuilt (from
    their saved attributes), any other Python object in the file is still refused.
    """
    check_file(path)
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} safely (weights only): {_load_failure(e)}") from None


def _load_failure(e: Exception) -> str:
    """The one line that says why torch.load(weights_only=True) failed, out of torch's many-line messages."""
    text = str(e).strip()
    if not text:
        return "the file is empty or truncated" if isinstance(e, EOFError) else type(e).__name__
    if "Unsupported global" in text:  # a pickled Python object (class, function): loading it would run its code
        name = text.split("GLOBAL ", 1)[-1].split()[0] if "GLOBAL " in text else "a Python object"
        return (f"it holds a pickled {name}, which only loads by running code from the file; save plain tensors "
                "(a state_dict) or a .safetensors file instead")
    if "WeightsUnpickler error" in text:  # not a pickle at all, or one with opcodes a weights file never has
        detail = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        return f"not a torch weights file ({detail[0] if detail else 'unsupported pickle content'})"
    if "failed finding central directory" in text or "PytorchStreamReader" in text:
        return "truncated or corrupt torch zip archive"
    return text.splitlines()[0]


def load_weights(model: nn.Module, path: str, *, what: str = "model") -> dict[str, str]:
    """Load a checkpoint into `model` strictly (mismatches are a UserError naming keys or shapes); returns metadata."""
    state, meta = read_state_dict(path)
    load_state(model, state, source=path, what=what, meta=meta)
    return meta


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, what: str = "model",
               meta: dict | None = None) -> None:
    """model.load_state_dict(state) with the mismatches (missing, unexpected, other shapes) named in a UserError."""
    meta = meta or {}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch in {len(shapes)} tensors (checkpoint vs model), "
                         f"e.g. {'; '.join(shapes[:2])}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
        made_for = f" (it was saved for {meta['model']})" if "model" in meta else ""
        raise UserError(f"{what} checkpoint {source} does not fit the model{made_for}: " + "; ".join(parts))
    model.load_state_dict(state)


def save_weights(model: nn.Module, path: str, metadata: dict) -> None:
    """Write the model's weights to a .safetensors file (atomically) with string metadata (model name, classes...).

    The file gets the mode a plain open() gives (0666 less the umask, so 0644 usually), not safetensors' 0600."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = path + ".tmp"
    with open(tmp, "wb"):  # created as open() creates files: its mode is the one to keep
        pass
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    save_file(state, tmp, metadata=meta)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
