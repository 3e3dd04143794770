"""Teachers as timm 1.x models: from timm training checkpoints (timm 0.6.5's layout included) and timm's pretrained
weights.

The PAT paper distils from OFA-KD's CIFAR-100 teachers, which are timm 0.6.5 `CheckpointSaver` files: a torch file
holding `epoch`, `arch`, `state_dict`, `optimizer`, `version`, `args` (an argparse.Namespace), `metric` and, for runs
with `--model-ema`, `state_dict_ema`, with parameter names in timm 0.6.5's layout (Swin: patch merging at the end of a
stage, `head` for `head.fc`, the relative_position_index / attn_mask buffers stored). `load_teacher` reads such a file
with `weights_only=True` (argparse.Namespace allowed for that load, nothing else), converts the weights with the
model family's own timm `checkpoint_filter_fn` (the function timm applies to pretrained weights) and loads them
strictly. No renames are written here: for Swin, ConvNeXt, ViT/DeiT and MLP-Mixer timm's filters cover timm 0.6.5's
layout (for ConvNeXt, ViT and Mixer it is timm 1.x's layout already; tests/models/test_legacy_checkpoint.py checks
the logits against timm 0.6.5's).
"""

from __future__ import annotations

import argparse
import importlib
import json
import warnings

import timm
import torch
from torch import nn

from patfast.errors import UserError
from patfast.models.create import check_model_name, create_model
from patfast.models.weights import (
    check_file,
    is_training_state,
    load_state,
    read_state_dict,
    torch_load,
    training_state_weights,
    unwrap_state,
)

# buffers timm 0.6.5 stored that timm 1.x computes when it builds the model (Swin); timm's filters drop them
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
SAVER_KEYS = ("epoch", "arch", "version", "optimizer", "args")  # what tells a timm CheckpointSaver file
EMA_KEYS = ("state_dict_ema", "model_ema")  # timm's CheckpointSaver; DeiT-style training scripts


def load_teacher(name: str, checkpoint: str, num_classes: int, img_size: int = 224, use_ema: bool = False,
                 **model_kwargs) -> nn.Module:
    """timm 1.x model `name` (patfast's create_model) with the weights of `checkpoint`, loaded strictly.

    `checkpoint`: a timm training checkpoint (timm 0.6.5's CheckpointSaver files, e.g. OFA-KD's teachers), any
    torch file of weights, or patfast's .safetensors (then this is `load_weights`). Torch files go through timm's
    checkpoint filter for the model's family. `use_ema`: take the file's EMA weights (`state_dict_ema`); a UserError
    if it has none. `model_kwargs`: architecture arguments for timm.create_model (e.g. a smaller `depths`).
    Mismatches are a UserError naming keys or shapes.
    """
    return _load_teacher(name, checkpoint, num_classes, img_size, use_ema, model_kwargs)[0]


def pretrained_teacher(name: str, num_classes: int, img_size: int = 224, file: str | None = None,
                       use_ema: bool = False, **model_kwargs) -> nn.Module:
    """timm's pretrained `name`: `timm.create_model(name, pretrained=True, num_classes=...)`, which downloads the
    weights, or, with `file`, reads them from that file instead (offline).

    Either way timm converts and adapts them as it does for its hub weights (the family's checkpoint filter; the
    classifier is left newly initialised when `num_classes` differs from the weights'). A file is read by patfast
    (weights only, a training checkpoint's `state_dict`, or with `use_ema` its `state_dict_ema`) and handed to timm
    as the pretrained state dict; tensors the model has no place for, or model tensors the file lacks (other than a
    reset classifier), are a UserError naming them. No network and no file: a one-line UserError.
    """
    return _pretrained(name, num_classes, img_size, file, use_ema, model_kwargs)[0]


def teacher_from_config(cfg: dict, num_classes: int, path: str | None) -> tuple[nn.Module, dict[str, str], str]:
    """The teacher of a `patfast train` run: (model, metadata for its mean/std, where its weights came from).

    cfg["teacher_pretrained"]: timm's pretrained weights (from `path` when given); otherwise the weights of `path`.
    cfg["teacher_ema"]: the checkpoint's EMA weights.
    """
    name, img_size, use_ema = cfg["teacher"], cfg["img_size"], bool(cfg.get("teacher_ema"))
    ema = " (EMA weights)" if use_ema else ""
    if cfg.get("teacher_pretrained"):
        model, meta = _pretrained(name, num_classes, img_size, path, use_ema, {})
        return model, meta, f"timm's pretrained weights{f' in {path}' if path else ''}{ema}"
    if not path:
        raise UserError("give --teacher-checkpoint FILE (or --teacher-pretrained for timm's pretrained weights)")
    model, meta = _load_teacher(name, path, num_classes, img_size, use_ema, {})
    return model, meta, path + ema


def read_teacher_state(path: str, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:
    """(state_dict, metadata, whether it came from a torch file) of a teacher weights file.

    A timm CheckpointSaver file gives `state_dict` (`state_dict_ema` with use_ema), its model name (`args.model`) and
    the mean/std it was trained with when its args record them.
    """
    check_file(path)
    if path.endswith(".safetensors"):
        if use_ema:
            raise UserError(f"teacher checkpoint {path} is a .safetensors file of one set of weights, with no EMA "
                            "weights to pick: drop --teacher-ema")
        state, meta = read_state_dict(path)
        return state, meta, False
    obj = torch_load(path, allow=(argparse.Namespace,))
    if is_training_state(obj):  # a patfast run's last.pth: the model it trained
        state, meta = training_state_weights(obj, path, use_ema)
        return state, meta, False
    outer = obj
    if use_ema:
        key = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if key is None:
            raise UserError(f"teacher checkpoint {path} has no EMA weights (no 'state_dict_ema'; {_holds(obj)}): "
                            "drop --teacher-ema")
        obj = obj[key]
    state, meta = unwrap_state(obj, path)
    state = timm.models.clean_state_dict(state)  # DDP's "module." and torch.compile's "_orig_mod." prefixes
    return state, {**_saver_meta(outer), **meta}, True


def timm_filter(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state through timm's checkpoint_filter_fn of the model's family, the tensors it resized).

    Families without a filter (ResNet...) and states the filter does not understand (it raises: another family's
    weights) are returned as they are, for the strict load to name what does not fit.
    """
    fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return dict(state), []
    try:
        out = fn(dict(state), model)
    except Exception:  # e.g. ConvNeXt's filter reading another family's keys as Facebook's layout: KeyError
        return dict(state), []
    given = {v.untyped_storage().data_ptr() for v in state.values()}  # renamed tensors are the same tensors
    resized = [k for k, v in out.items() if k in state and v.shape != state[k].shape
               and v.untyped_storage().data_ptr() not in given]
    return dict(out), resized


def _load_teacher(name, checkpoint, num_classes, img_size, use_ema, model_kwargs) -> tuple[nn.Module, dict]:
    model = create_model(name, num_classes, img_size, **model_kwargs)
    state, meta, torch_file = read_teacher_state(checkpoint, use_ema)
    if not torch_file:  # patfast's own .safetensors or last.pth: exactly load_weights
        try:
            load_state(model, state, source=checkpoint, what="teacher", meta=meta)
        except UserError as e:
            trained_at = meta.get("img_size")
            if trained_at and str(trained_at) != str(img_size):
                raise UserError(f"teacher checkpoint {checkpoint} was trained at {trained_at}px and does not fit a "
                                f"{name} built for {img_size}px: use --img-size {trained_at}") from None
            raise e from None
        return model, meta
    filtered, resized = timm_filter(state, model)
    load_state(model, filtered, source=checkpoint, what="teacher", meta=meta)
    _check_nothing_lost(state, filtered, checkpoint, model)
    _warn_resized(resized, checkpoint)
    return model, meta


def _pretrained(name, num_classes, img_size, file, use_ema, model_kwargs) -> tuple[nn.Module, dict]:
    check_model_name(name)
    if file is None:
        if use_ema:
            raise UserError("--teacher-ema picks a checkpoint file's EMA weights; timm's pretrained weights have "
                            "none: drop it, or give --teacher-checkpoint FILE")
        try:
            model = _timm_model(name, num_classes, img_size, dict(pretrained=True, **model_kwargs))
        except UserError:
            raise
        except Exception as e:  # offline: huggingface_hub's LocalEntryNotFoundError, urllib's URLError...
            raise UserError(f"cannot get timm's pretrained weights for {name} ({_first_line(e)}): without "
                            "network access, pass --teacher-checkpoint FILE (a copy of them) with "
                            "--teacher-pretrained") from None
        return model, _cfg_meta(model)
    state, meta, _ = read_teacher_state(file, use_ema)
    model, failure = None, ""
    try:
        # timm's file= source would pick the EMA weights of a training checkpoint whenever it has them; handing timm
        # the state dict we picked keeps --teacher-ema's choice, and timm converts it as it converts a file's
        model = _timm_model(name, num_classes, img_size,
                            dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state)), **model_kwargs))
    except UserError:
        raise
    except Exception as e:  # a state that does not fit: named below by the strict check
        failure = _first_line(e)
    loaded = model is not None
    if loaded:
        for cfg in {id(c): c for c in (model.pretrained_cfg, getattr(model, "default_cfg", None))
                    if isinstance(c, dict)}.values():
            cfg.pop("state_dict", None)  # timm keeps the overlay: a second copy of the weights
    else:
        model = create_model(name, num_classes, img_size, **model_kwargs)
    _check_pretrained(model, state, num_classes, file, meta, keep_own=loaded)
    if not loaded:
        raise UserError(f"cannot load {file} as timm's pretrained {name}: {failure}")
    return model, {**_cfg_meta(model), **meta}


def _check_pretrained(model, state, num_classes, file, meta, keep_own) -> None:
    """The strict check timm skips when it resets the classifier (it then loads with strict=False): every model
    tensor but the reset classifier comes from the file and every file tensor has a place (load_state names them)."""
    converted, _ = timm_filter(state, model)
    filtered, own = dict(converted), model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    if num_classes != cfg.get("num_classes", num_classes):
        for head in heads:
            for key in (f"{head}.weight", f"{head}.bias"):
                filtered.pop(key, None)
                if key in own:
                    filtered[key] = own[key]
    if keep_own:  # timm loaded it: compare names only, keep timm's tensors (input conv / label offset adapted)
        filtered = {k: own.get(k, v) for k, v in filtered.items()}
    load_state(model, filtered, source=file, what="teacher (pretrained)", meta=meta)
    _check_nothing_lost(state, converted, file, model)


def _check_nothing_lost(state, filtered, source, model) -> None:
    """A UserError if timm's filter dropped weights (not the buffers timm 1.x rebuilds): the model would not be the
    one trained (e.g. a timm 0.6.5 ViT with a `pre_logits` layer, which timm 1.x's ViT no longer has)."""
    kept = {v.untyped_storage().data_ptr() for v in filtered.values()}
    lost = [k for k, v in state.items() if k not in filtered and not k.endswith(DERIVED_BUFFERS)
            and v.numel() and v.untyped_storage().data_ptr() not in kept]
    if lost:
        raise UserError(f"teacher checkpoint {source}: timm's checkpoint filter for {type(model).__name__} drops "
                        f"{len(lost)} tensors the timm {timm.__version__} model has no place for, e.g. "
                        f"{', '.join(lost[:3])}: it would not be the model that was trained")


def _warn_resized(resized: list[str], source: str) -> None:
    if resized:
        warnings.warn(f"teacher checkpoint {source}: timm's checkpoint filter resized {len(resized)} tensors to fit "
                      f"the model (e.g. {', '.join(resized[:2])}): it was trained for another image or window size, "
                      "and the teacher is not exactly the one trained", UserWarning, stacklevel=3)


def _timm_model(name: str, num_classes: int, img_size: int, kwargs: dict) -> nn.Module:
    """timm.create_model with img_size for the models that take it (as create.create_model does)."""
    try:
        model = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    stride = max((f["reduction"] for f in getattr(model, "feature_info", []) or []), default=1)
    if img_size < stride:
        raise UserError(f"image size {img_size} is too small for {name}: its deepest stage reduces the input "
                        f"{stride}x, so use --img-size {stride} or more")
    return model


def _saver_meta(obj) -> dict[str, str]:
    """Model name and, when recorded, the mean/std of a timm training checkpoint (its argparse.Namespace `args`)."""
    if not isinstance(obj, dict) or not any(k in obj for k in SAVER_KEYS):
        return {}
    args = obj.get("args")
    meta: dict[str, str] = {}
    name = getattr(args, "model", None) or obj.get("arch")
    if isinstance(name, str):
        meta["model"] = name
    for key in ("mean", "std"):
        value = getattr(args, key, None)
        try:
            if value is not None and len(value) == 3:
                meta[key] = json.dumps([float(v) for v in value])
        except (TypeError, ValueError):
            pass
    return meta


def _cfg_meta(model: nn.Module) -> dict[str, str]:
    """The mean/std timm's pretrained weights expect (the model's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: json.dumps([float(v) for v in cfg[k]]) for k in ("mean", "std") if cfg.get(k) is not None}


def _holds(obj) -> str:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "it holds " + ", ".join(str(k) for k in list(obj)[:12])
    return "it is a plain state dict"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)
