"""Train and eval image transforms, built with timm's `create_transform`: PIL RGB in, normalised (3, S, S) float out.

train: RandomResizedCrop(S, scale=crop_scale, ratio=(3/4, 4/3), bilinear) -> hflip -> [RandAugment] -> ToTensor
       -> Normalize(mean, std) -> [RandomErasing(re_prob, mode "pixel")]
eval:  Resize(int(S / crop_pct), bilinear, shorter side) -> CenterCrop(S) -> ToTensor -> Normalize(mean, std)

timm's transforms draw from Python's `random`, NumPy's global RNG and (random erasing) torch's CPU generator;
the loader seeds those per sample to make augmentation reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from patfast.errors import UserError

RATIO = (3 / 4, 4 / 3)


def check_augment_args(crop_scale, hflip: float, crop_pct: float) -> tuple[float, float]:
    """UserError unless the crop scale is 0 < min <= max <= 1, hflip a probability and crop_pct in (0, 1]; the crop
    scale as floats (every loader backend checks its arguments here)."""
    lo, hi = (float(v) for v in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise UserError(f"crop scale must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    if not 0 <= hflip <= 1:
        raise UserError(f"hflip is a probability in [0, 1], got {hflip}")
    if not 0 < crop_pct <= 1:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return lo, hi


AUTO_AUGMENT_EXAMPLES = "rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2 (AugMix) or original (AutoAugment)"
AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
# The sections timm parses after the first one, each a key and its value: int, float, or one of the strings listed.
_AA_SECTIONS = {
    "rand": {"m": int, "n": int, "mstd": float, "mmax": int, "inc": ("0", "1"), "p": float,
             "t": ("weights", "3aw", "3a")},
    "augmix": {"m": int, "w": int, "d": int, "a": float, "b": ("0", "1"), "mstd": float},
    "policy": {"mstd": float},
}


def check_auto_augment(text: str | None) -> str | None:
    """A timm auto-augment string checked against the grammar timm 1.x parses (which skips sections it cannot read,
    e.g. 'rand-bogus', silently): the stripped string, None for ''/None (off); a one-line UserError otherwise."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()

    def bad(reason: str) -> UserError:
        return UserError(f"bad auto-augment '{text}': {reason}; e.g. {AUTO_AUGMENT_EXAMPLES}")

    first, *sections = text.split("-")
    if first in ("rand", "augmix"):
        grammar = _AA_SECTIONS[first]
    elif first in AUTO_AUGMENT_POLICIES:
        grammar = _AA_SECTIONS["policy"]
    else:
        raise bad(f"it must start with rand, augmix or one of {', '.join(AUTO_AUGMENT_POLICIES)}, not '{first}'")
    family = first if first in ("rand", "augmix") else first + " (AutoAugment)"
    for section in sections:
        if not section:
            raise bad("an empty section (a '-' doubled or at the end)")
        if section.startswith("t") and "t" in grammar:
            key, value = "t", section[1:]
        else:
            m = re.fullmatch(r"([a-z]+)(\d[\d.]*)", section)
            key, value = m.groups() if m else (section, None)
        kind = grammar.get(key)
        if kind is None or value is None:
            keys = "".join(f"[-{k}<{'|'.join(t) if isinstance(t, tuple) else t.__name__}>]" for k, t in grammar.items())
            raise bad(f"unknown section '{section}' (the form is {first}{keys})")
        if isinstance(kind, tuple) and value not in kind:
            raise bad(f"section '{section}': {family} {key} takes {'|'.join(kind)}")
        if kind is int and not value.isdigit() or kind is float and not re.fullmatch(r"\d+(\.\d*)?", value):
            raise bad(f"section '{section}': {family} {key} takes {'an integer' if kind is int else 'a number'}")
        if key == "p" and not 0 <= float(value) <= 1:
            raise bad(f"section '{section}': p is a probability in [0, 1]")
    return text


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits giving black as Pillow < 13 did (Pillow 13 raises for bits < 1)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    # timm's RandAugment asks for 0 bits at high magnitudes (PosterizeIncreasing at m=10, Posterize below 2.5):
    # about 0.15% of images under rand-m9-mstd0.5-inc1, each an exception with Pillow 13.
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_transform(train: bool, img_size: int, mean: Sequence[float], std: Sequence[float], *,
                    crop_scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5, auto_augment: str | None = None,
                    re_prob: float = 0.0, re_mode: str = "pixel", color_jitter: float = 0.0,
                    crop_pct: float = 0.875) -> Callable:
    """The training (random) or eval (deterministic) transform for `img_size` x `img_size` outputs.

    `auto_augment` is a timm augmentation string such as "rand-m9-mstd0.5-inc1" (None or "": off; checked by
    check_auto_augment). `color_jitter` is off
    by default (timm's own default is 0.4): the paper's protocol does not list it. Options of the other mode are
    ignored (crop_pct for train; crop_scale, hflip, auto_augment, re_prob, color_jitter for eval).
    """
    from timm.data import create_transform

    _patch_timm_posterize()

    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise UserError(f"image size must be a positive integer, got {img_size!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"mean/std must be 3 values each with std > 0, got mean={mean} std={std}")
    lo, hi = check_augment_args(crop_scale, hflip, crop_pct)
    if not train:
        return create_transform(img_size, is_training=False, interpolation="bilinear", crop_pct=crop_pct,
                                crop_mode="center", mean=mean, std=std)
    if not 0 <= re_prob <= 1:
        raise UserError(f"re_prob is a probability in [0, 1], got {re_prob}")
    if color_jitter < 0:
        raise UserError(f"color_jitter must be >= 0, got {color_jitter}")
    auto_augment = check_auto_augment(auto_augment)
    try:
        return create_transform(img_size, is_training=True, scale=(lo, hi), ratio=RATIO, hflip=hflip,
                                color_jitter=color_jitter or None, auto_augment=auto_augment, interpolation="bilinear",
                                mean=mean, std=std, re_prob=re_prob, re_mode=re_mode)
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(f"bad auto-augment '{auto_augment}' (e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, "
                        f"original): {e}") from None
