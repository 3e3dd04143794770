"""Stage taps for any timm model: read its 4 stage features and insert modules on the tensors entering its stages.

Which modules (SPEC sections 4 and 5), found from timm's `feature_info`, never from a per-family forward:
  hierarchical models (4+ distinct reductions): stage i = the last feature_info module of each of the last 4
      reductions (ResNet layer1..4, ConvNeXt stages.0..3, Swin layers.0..3, MobileNetV2 blocks.1/2/4/6); models with a
      head conv after their last stage (EfficientNet/MobileNet `conv_head` + `bn2`) use `bn2` as stage 4.
      Prompt i goes on the input of the module that follows stage i-1 (stage 1: its own module); in token/NHWC
      models (Swin) a stage that starts with a `downsample` gets its prompt after it, on `<stage>.blocks`.
  isotropic models (ViT, DeiT, Mixer, ResMLP): stage features = outputs of blocks 1, 3, 9, 11 of 12 and prompts on
      the inputs of blocks 0, 2, 4, 10, the indices scaled to other depths.
Users override both lists with module names (`--student-stages`, `--teacher-stages`, `--teacher-prompt-points`),
4 different modules in forward order (the order of `model.named_modules()`: outputs for stages, inputs for prompts).

Features come out in one of two canonical forms: maps (B, C, H, W), or tokens (B, L, C) with the prefix (class)
tokens removed; NHWC outputs (timm Swin) become tokens (B, H*W, C).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from patfast.errors import UserError
from patfast.models import tokens as tk

ISOTROPIC_STAGE_BLOCKS = (1, 3, 9, 11)  # of 12 blocks: feature taps
ISOTROPIC_PROMPT_BLOCKS = (0, 2, 4, 10)  # of 12 blocks: prompt points


@dataclass(frozen=True)
class StageShape:
    """One stage's tensor without the batch axis: kind "map" = (C, H, W), kind "tokens" = (H*W, C) on an H x W grid."""

    kind: str
    channels: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.height * self.width


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"{type(model).__name__} has no timm feature_info: name its 4 stage modules explicitly")
    return [dict(f) for f in info]


def _is_isotropic(info: list[dict]) -> bool:
    return len({f["reduction"] for f in info}) < 4


def works_on_tokens(model: nn.Module) -> bool:
    """ViT/MLP-style models (isotropic blocks) and NHWC token models (Swin), as opposed to CNNs."""
    return getattr(model, "output_fmt", "NCHW") == "NHWC" or _is_isotropic(_feature_info(model))


def _scaled(indices: Sequence[int], depth: int, offset: int) -> list[int]:
    return [max(0, min(depth - 1, round((i + offset) * depth / 12) - offset)) for i in indices]


def default_stage_modules(model: nn.Module) -> list[str]:
    """Names of the 4 modules whose outputs are the stage features."""
    info = _feature_info(model)
    if _is_isotropic(info):
        return [info[i]["module"] for i in _scaled(ISOTROPIC_STAGE_BLOCKS, len(info), 1)]
    last_of_reduction: dict[int, str] = {}
    for f in info:
        last_of_reduction[f["reduction"]] = f["module"]
    names = [last_of_reduction[r] for r in sorted(last_of_reduction)[-4:]]
    modules = dict(model.named_modules())
    if isinstance(modules.get("conv_head"), nn.Conv2d) and "bn2" in modules:
        names[3] = "bn2"  # EfficientNet/MobileNet: the last stage is the head conv + bn2 output (SPEC section 5)
    return names


def _next_sibling(modules: dict[str, nn.Module], name: str) -> str | None:
    parent, _, child = name.rpartition(".")
    siblings = [n for n, _ in (modules[parent] if parent else modules[""]).named_children()]
    i = siblings.index(child)
    if i + 1 < len(siblings):
        return f"{parent}.{siblings[i + 1]}" if parent else siblings[i + 1]
    return None


def default_prompt_points(model: nn.Module) -> list[str]:
    """Names of the 4 modules whose INPUT gets prompt 1..4 (SPEC section 4's table)."""
    info = _feature_info(model)
    if _is_isotropic(info):
        return [info[i]["module"] for i in _scaled(ISOTROPIC_PROMPT_BLOCKS, len(info), 0)]
    modules = dict(model.named_modules())
    stages = default_stage_modules(model)
    points = [stages[0]] + [_next_sibling(modules, s) or stages[i + 1] for i, s in enumerate(stages[:3])]
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        # timm 1.x Swin merges patches at the START of a stage; the prompt goes after the merging.
        points = [p + ".blocks" if p + ".downsample" in modules and p + ".blocks" in modules else p for p in points]
    return points


def _forward_rank(model: nn.Module, inputs: bool) -> dict[str, int]:
    """Module name -> its place in the forward pass, taken from the module order of `model.named_modules()`: the
    order inputs arrive in (pre-order, a module before its sub-modules) or, `inputs` False, the order outputs leave in
    (post-order, a module after its sub-modules)."""
    if inputs:
        return {n: i for i, (n, _) in enumerate(model.named_modules())}
    rank: dict[str, int] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for child, sub in module.named_children():
            visit(f"{prefix}.{child}" if prefix else child, sub)
        rank.setdefault(prefix, len(rank))

    visit("", model)
    return rank


def _check_names(model: nn.Module, names: Sequence[str], flag: str, *, inputs: bool = False,
                 defaults: Callable[[nn.Module], list[str]] | None = None, ordered: bool = True) -> list[str]:
    """UserError unless `names` are 4 modules of `model` (an unknown one named with close matches and the
    `defaults`) in forward order without repeats (`ordered`; inputs: the order their inputs arrive in, else their
    outputs)."""
    names = list(names)
    if len(names) != 4:
        raise UserError(f"{flag} needs exactly 4 module names, got {len(names)}: {','.join(names)}")
    modules = dict(model.named_modules())
    what = "prompt points" if inputs else "stages"
    try:
        default = ",".join(defaults(model)) if defaults is not None else ""
    except UserError:  # no feature_info: no defaults to show
        default = ""
    shown = f"; the default {what}: {flag} {default}" if default else ""
    for n in names:
        if n not in modules or n == "":
            order = [m for m in modules if m]
            close = sorted(difflib.get_close_matches(n, order, n=4, cutoff=0.6), key=order.index)
            hint = f"close names: {', '.join(close)}; " if close else ""
            raise UserError(f"{flag}: {type(model).__name__} has no module '{n}' ({hint}names as in "
                            f"model.named_modules()){shown}")
    if not ordered:
        return names
    repeated = [n for i, n in enumerate(names) if n in names[:i]]
    if repeated:
        raise UserError(f"{flag}: module '{repeated[0]}' is named twice; name 4 different modules in forward order, "
                        f"earliest first{shown}")
    rank = _forward_rank(model, inputs)
    for a, b in zip(names, names[1:]):
        if rank[b] < rank[a]:
            raise UserError(f"{flag}: the {what} must be in forward order, earliest first, but '{b}' comes before "
                            f"'{a}' in {type(model).__name__}'s forward; "
                            f"e.g. {flag} {','.join(sorted(names, key=rank.__getitem__))}")
    return names


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class StageTaps:
    """Hooks on a timm model: `features()` after a forward gives the 4 stage features; `set_prompts` inserts modules.

    class_token: "first" (prefix tokens lead, count from `num_prefix_tokens`) or "last" (official rule).
    token_return: "transpose" or "reshape" (official scramble) for maps going back to tokens after a prompt.
    """

    def __init__(self, model: nn.Module, img_size: int, *, stage_modules: Sequence[str] | None = None,
                 prompt_points: Sequence[str] | None = None, class_token: str = "first",
                 token_return: str = "transpose", flag: str = "--stages"):
        self.model = model
        self.class_token = class_token
        self.token_return = token_return
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        # Names given by the user must be in forward order; the defaults need not be (shallow isotropic models
        # repeat blocks there).
        user_stages, user_points = stage_modules is not None, prompt_points is not None
        if stage_modules is None:
            stage_modules = default_stage_modules(model)
        if prompt_points is None:
            prompt_points = default_prompt_points(model)
        self.stage_modules = _check_names(model, stage_modules, flag, defaults=default_stage_modules,
                                          ordered=user_stages)
        self.prompt_points = _check_names(model, prompt_points, flag.replace("stages", "prompt-points"), inputs=True,
                                          defaults=default_prompt_points, ordered=user_points)
        self.prompts: list[nn.Module | None] = [None] * 4
        self.prompting = False  # prompts act only while this is True (the prompted teacher forward)
        self._raw: list[torch.Tensor | None] = [None] * 4
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._capture_hook(i))
                         for i, n in enumerate(self.stage_modules)]
        self._handles += [modules[n].register_forward_pre_hook(self._prompt_hook(i))
                          for i, n in enumerate(self.prompt_points)]
        self.stage_shapes, self.prompt_shapes = self._probe(img_size)

    # --- hooks -----------------------------------------------------------------------------------------------
    def _capture_hook(self, i: int):
        def hook(module, args, output):
            self._raw[i] = _first(output)
        return hook

    def _prompt_hook(self, i: int):
        def hook(module, args):
            if not self.prompting or self.prompts[i] is None:
                return None
            return (self.apply_on_input(i, args[0], self.prompts[i]),) + tuple(args[1:])
        return hook

    # --- layouts ---------------------------------------------------------------------------------------------
    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """A raw stage output -> map (B, C, H, W) or tokens (B, L', C) without prefix tokens."""
        if x.dim() == 4:
            return x.flatten(1, 2) if self.nhwc else x
        if x.dim() == 3:
            return tk.split_prefix(x, self.num_prefix, self.class_token)[0]
        raise ValueError(f"a stage output of shape {tuple(x.shape)} is neither a map nor tokens")

    def apply_on_input(self, i: int, x: torch.Tensor, fn: nn.Module) -> torch.Tensor:
        """Run `fn` (map -> map) on the tensor entering prompt point i, in and out of the model's own layout."""
        if x.dim() == 4 and not self.nhwc:
            return fn(x)
        if x.dim() == 4:  # NHWC
            b, h, w, c = x.shape
            y = fn(x.permute(0, 3, 1, 2))
            return y.permute(0, 2, 3, 1) if self.token_return == "transpose" else y.reshape(b, h, w, c)
        spatial, prefix = tk.split_prefix(x, self.num_prefix, self.class_token)
        y = fn(tk.tokens_to_map(spatial))
        return tk.join_prefix(tk.map_to_tokens(y, self.token_return), prefix, self.class_token)

    def features(self) -> list[torch.Tensor]:
        """The 4 stage features of the last forward, canonical (maps or prefix-free tokens); the taps let go of
        them (the caller holds them as long as it needs them, the taps not beyond)."""
        return [f for f, _ in self.features_with_prefix()]

    def features_with_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """features(), each with the prefix (class) tokens (B, P, C) its stage output carried, or None."""
        if any(r is None for r in self._raw):
            raise RuntimeError("no forward has run through the tapped model yet")
        feats = [(self.canonical(r), self.prefix_of(r)) for r in self._raw]
        self.clear()
        return feats

    def prefix_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """The prefix tokens (B, P, C) of a raw token stage output (by this taps' class-token rule); None for maps."""
        return tk.split_prefix(x, self.num_prefix, self.class_token)[1] if x.dim() == 3 else None

    def clear(self) -> None:
        """Forget the captured features (after a forward whose features are not wanted, e.g. the clean teacher)."""
        self._raw = [None] * 4

    def strip_hooks(self, copy_of_model: nn.Module) -> nn.Module:
        """A deep copy of the tapped model (timm's EMA) carries these hooks too, writing into these taps: remove
        them from the copy (by hook id: a copy keeps the ids) and return it."""
        ids = {h.id for h in self._handles}
        for m in copy_of_model.modules():
            for hooks in (m._forward_hooks, m._forward_pre_hooks):
                for hid in ids & set(hooks):
                    del hooks[hid]
        return copy_of_model

    def set_prompts(self, prompts: Sequence[nn.Module | None]) -> None:
        """Modules (map -> map) applied on the inputs of the 4 prompt points while `prompting` is True."""
        self.prompts = list(prompts) + [None] * (4 - len(prompts))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # --- probe -----------------------------------------------------------------------------------------------
    def _shape_of(self, x: torch.Tensor, is_input: bool) -> StageShape:
        if x.dim() == 4 and not self.nhwc:
            return StageShape("map", x.shape[1], x.shape[2], x.shape[3])
        if x.dim() == 4:
            return StageShape("tokens", x.shape[3], x.shape[1], x.shape[2])
        spatial = tk.split_prefix(x, self.num_prefix, self.class_token)[0]
        n = spatial.shape[1]
        h = math.isqrt(n)
        if h == 0 or n % h:
            where = "entering a prompt point" if is_input else "at a stage output"
            raise UserError(f"{type(self.model).__name__}: {n} tokens {where} do not form a grid "
                            f"(class-token rule '{self.class_token}', {self.num_prefix} prefix tokens)")
        return StageShape("tokens", spatial.shape[2], h, n // h)

    def _probe(self, img_size: int) -> tuple[list[StageShape], list[StageShape]]:
        inputs: list[torch.Tensor | None] = [None] * 4
        modules = dict(self.model.named_modules())
        probes = [modules[n].register_forward_pre_hook(
            lambda m, a, i=i: inputs.__setitem__(i, _first(a))) for i, n in enumerate(self.prompt_points)]
        was_training = self.model.training
        param = next(self.model.parameters())
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype))
        except (RuntimeError, AssertionError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"image size {img_size} is too small or unsuitable for "
                            f"{type(self.model).__name__}: {msg}") from None
        finally:
            self.model.train(was_training)
            for p in probes:
                p.remove()
        stage_shapes = [self._shape_of(r, False) for r in self._raw]
        prompt_shapes = [self._shape_of(x, True) for x in inputs]
        self._raw = [None] * 4
        return stage_shapes, prompt_shapes
