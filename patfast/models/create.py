"""Creating timm models by name, with user-facing errors (weights files: patfast/models/weights.py)."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from patfast.errors import UserError


def check_model_name(name: str) -> None:
    """A UserError, with the closest names, unless timm knows a model called `name`; a pretrained tag
    (`resnet18.a1_in1k`) must be one timm has for that model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise UserError(f"unknown timm model '{name}'{hint}")
    arch, tag = split_tag(name)
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            known = f"its tags: {', '.join(tags)}; " if tags else "it has no pretrained tags; "
            raise UserError(f"unknown pretrained tag '.{tag}' for timm model {arch} ({known}or drop the tag: {arch})")


def split_tag(name: str) -> tuple[str, str]:
    """timm's "arch.tag" -> (arch, tag); tag "" when there is none (`resnet18.a1_in1k` -> resnet18, a1_in1k)."""
    arch, _, tag = name.partition(".")
    return arch, tag


def random_init_note(name: str, hint: str = "no download here; pass a weights file") -> str | None:
    """The one-line note for the log when `name` carries a pretrained tag (`resnet18.a1_in1k`) that create_model does
    not use: the model starts from random weights whatever the tag says. None for a name without a tag."""
    _, tag = split_tag(name)
    if not tag:
        return None
    return f"{name}: the tag '.{tag}' names pretrained weights, but the model starts from random weights ({hint})"


def create_model(name: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    """A timm model by name, randomly initialised, with `num_classes` outputs, built for `img_size` inputs.

    A pretrained tag in the name (`resnet18.a1_in1k`) is checked and otherwise unused: no weights are downloaded
    (random_init_note(name) is the line to log about it).

    Models that take an `img_size` argument (ViT, Swin, Mixer...) are built for that size; the others (CNNs) accept
    any size as they are.
    """
    check_model_name(name)
    if img_size <= 0 or num_classes <= 0:
        raise UserError(f"cannot build {name} with {num_classes} classes for {img_size}px images")
    try:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot build {name} for {img_size}x{img_size} images: {e}") from None
    stride = max((f["reduction"] for f in getattr(model, "feature_info", []) or []), default=1)
    if img_size < stride:
        raise UserError(f"image size {img_size} is too small for {name}: its deepest stage reduces the input "
                        f"{stride}x, so use --img-size {stride} or more")
    return model
