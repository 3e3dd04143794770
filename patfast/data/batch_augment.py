"""Batched tensor augmentation for the gpu/dali backends: timm's train/eval transforms as whole-batch tensor ops.

Train (timm's order): boxes = random_resized_crop_boxes(...); x = resized_crop_flip(src, boxes, flips, S, index=...)
-> x.to(uint8) (exact) -> rand_augment(x, spec, gen, fill) -> float / 255, normalise -> random_erase(x, re_prob, gen).
Eval: resized_crop_flip(src, center_crop_boxes(h, w, S, crop_pct), no flips, S, image_sizes=(h, w)) -> normalise.

The same code runs on CPU and CUDA tensors and never syncs the host with the device. Every random draw comes from
the `torch.Generator` passed in and is made on `generator.device`, then moved to the images' device: a CPU
generator gives the same draws for CPU and CUDA images; a generator on the images' device is the fast choice on a
GPU (random erasing draws a full-batch noise tensor). Same seed, same generator device -> same batch.

Differences from the PIL path (measured in tests/data/test_batch_augment.py):
- Colour/point ops reproduce PIL's integer and float32 arithmetic exactly. Posterize to 0 bits (Posterize below
  magnitude 2.5, PosterizeIncreasing at magnitude 10) gives black as older Pillow did; Pillow >= 13 raises there.
- Geometric ops sample like PIL's bilinear affine transform (pixel centres, edge-clamped taps, `fill` where the
  source centre falls outside the image, truncation to uint8; no blending with the fill at the border), in float32
  via F.grid_sample instead of PIL's float64: about 0.1-0.2% of values differ by 1; a pixel whose source lies
  within float error of the border may take the edge colour instead of the fill. timm's "random" interpolation
  would pick bilinear or bicubic per op; patfast's torch backend asks for bilinear, as done here.
- Resizing is PIL's separable triangle filter (antialiased when downscaling), rounded after the horizontal and the
  vertical pass like PIL's uint8 path, with PIL's fixed-point weights: exact when upscaling; when downscaling,
  float32 sums vs PIL's integer sums put under 1% of values 1 off (rounding ties). With TF32 matmuls enabled on
  CUDA the resize error grows to about 0.1 level before rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from patfast.errors import UserError

# timm's RandAugment op lists (timm.data.auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS), in order.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# The op kinds the image code knows; an "...Increasing" name differs only in its magnitude -> argument mapping.
KINDS = RAND_OPS
_LUT_KINDS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Contrast", "Brightness")
_GEOMETRIC_KINDS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_LEVEL_DENOM = 10.0
assert all(a == b.replace("Increasing", "") == k for a, b, k in zip(RAND_OPS, RAND_INCREASING_OPS, KINDS))
_SUPPORTED = ("the gpu and dali backends support RandAugment only, as "
              "'rand[-m<int>][-n<int>][-mstd<float>][-mmax<int>][-inc<0|1>][-p<float>]' (e.g. rand-m9-mstd0.5-inc1);"
              " use the torch backend for augmix, original/v0 AutoAugment and weighted op sets")


# ---------------------------------------------------------------------------------------------------------------------
# RandAugment configuration


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string: `num_layers` ops per image, each applied with probability `prob` at
    magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (magnitude_std inf: U(0, magnitude))."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False

    @property
    def op_names(self) -> tuple[str, ...]:
        """The 15 ops drawn from, uniformly with replacement."""
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """timm's "rand-m9-n2-mstd0.5-mmax10-inc1-p0.5" grammar -> RandAugmentSpec (defaults m10 n2 mstd0 mmax10 inc0
    p0.5; mstd > 100 means uniform magnitudes, mmax0 means 10 as in timm). Anything else raises UserError."""
    text = spec.strip() if isinstance(spec, str) else ""
    parts = text.split("-")
    if parts[0] != "rand":
        raise UserError(f"unsupported auto-augment {spec!r}: {_SUPPORTED}")
    values: dict = {}
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d.*)", part)
        if m is None:
            raise UserError(f"unsupported auto-augment {spec!r} (section {part!r}): {_SUPPORTED}")
        key, val = m.groups()
        try:
            values[key] = float(val) if key in ("mstd", "p") else int(val)
        except ValueError:
            raise UserError(f"unsupported auto-augment {spec!r} (section {part!r}): {_SUPPORTED}") from None
    mstd = values.get("mstd", 0.0)
    if mstd > 100:
        mstd = math.inf
    prob = values.get("p", 0.5)
    if not 0 <= prob <= 1 or values.get("inc", 0) not in (0, 1):
        raise UserError(f"unsupported auto-augment {spec!r} (p must be in [0, 1], inc 0 or 1): {_SUPPORTED}")
    return RandAugmentSpec(magnitude=float(values.get("m", 10)), num_layers=values.get("n", 2), prob=prob,
                           magnitude_std=mstd, magnitude_max=float(values.get("mmax", 0) or _LEVEL_DENOM),
                           increasing=bool(values.get("inc", 0)))


class RandAugmentDraw(NamedTuple):
    """The random choices for one batch, each (B, num_layers): op index into spec.op_names (-1: this layer skipped),
    magnitude (float64, clipped) and negate (the sign draw of signed ops)."""

    ops: torch.Tensor
    magnitude: torch.Tensor
    negate: torch.Tensor


def draw_rand_augment(batch: int, spec: RandAugmentSpec, generator: torch.Generator) -> RandAugmentDraw:
    """All of RandAugment's draws for `batch` images, on generator.device."""
    kw = {"generator": generator, "device": generator.device}
    shape = (batch, spec.num_layers)
    ops = torch.randint(0, len(spec.op_names), shape, **kw)
    applied = torch.rand(shape, dtype=torch.float64, **kw) < spec.prob
    if math.isinf(spec.magnitude_std):
        mag = torch.rand(shape, dtype=torch.float64, **kw) * spec.magnitude
    else:
        mag = spec.magnitude + spec.magnitude_std * torch.randn(shape, dtype=torch.float64, **kw)
    negate = torch.rand(shape, dtype=torch.float64, **kw) > 0.5
    return RandAugmentDraw(torch.where(applied, ops, -1), mag.clamp(0.0, spec.magnitude_max), negate)


def level_to_arg(name: str, magnitude: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    """timm's magnitude -> op argument mapping for op `name`, per sample: (B,) float64 magnitude, (B,) bool -> (B,)
    float64 (degrees, shear factor, translate fraction, bits kept, threshold, add, or enhance factor)."""
    mag = magnitude.double()
    lvl = mag / torch.full_like(mag, _LEVEL_DENOM)  # true division, as timm's level / 10. (torch would use * 0.1)
    sign = torch.where(negate, -1.0, 1.0).to(lvl)
    if name == "Rotate":
        return sign * (lvl * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (lvl * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (lvl * 0.45)
    if name == "Posterize":
        return torch.floor(lvl * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(lvl * 4)
    if name == "Solarize":
        return torch.floor(lvl * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(lvl * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.floor(lvl * 110).clamp(max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lvl * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + sign * (lvl * 0.9)).clamp(min=0.1)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros_like(lvl)
    raise ValueError(f"unknown RandAugment op {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# RandAugment application


def rand_augment(images: torch.Tensor, spec: RandAugmentSpec, generator: torch.Generator,
                 fill: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """timm RandAugment on a batch: uint8 (B, 3, H, W) -> new uint8 (B, 3, H, W). `fill` is the uint8 RGB of
    out-of-image pixels of geometric ops (timm: round(255 * mean))."""
    draw = draw_rand_augment(images.shape[0], spec, generator)
    return apply_rand_augment(images, draw, spec, fill)


def apply_rand_augment(images: torch.Tensor, draw: RandAugmentDraw, spec: RandAugmentSpec,
                       fill: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Apply drawn RandAugment layers in order: uint8 (B, 3, H, W) -> new uint8 (B, 3, H, W)."""
    _check_images(images)
    names = spec.op_names
    x = images
    for layer in range(draw.ops.shape[1]):
        op = draw.ops[:, layer].to(images.device)
        mag, neg = draw.magnitude[:, layer].to(images.device), draw.negate[:, layer].to(images.device)
        arg = torch.zeros_like(mag)
        for i, name in enumerate(names):
            arg = torch.where(op == i, level_to_arg(name, mag, neg), arg)
        x = _apply_kinds(x, op, arg, fill)  # op i of either list is KINDS[i]
    return x if x is not images else images.clone()


def apply_op(images: torch.Tensor, name: str, arg: torch.Tensor | float, fill: Sequence[int] | torch.Tensor = (128,) * 3
             ) -> torch.Tensor:
    """One RandAugment op on every image with per-sample argument `arg` ((B,) or scalar, as level_to_arg gives):
    uint8 (B, 3, H, W) -> new uint8 (B, 3, H, W)."""
    _check_images(images)
    kind = torch.full((images.shape[0],), KINDS.index(name.replace("Increasing", "")), device=images.device)
    if isinstance(arg, torch.Tensor):
        arg = arg.to(images.device, torch.float64).expand(images.shape[0])
    else:
        arg = torch.full((images.shape[0],), float(arg), dtype=torch.float64, device=images.device)
    return _apply_kinds(images, kind, arg, fill)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")


def _is_kind(kind: torch.Tensor, names) -> torch.Tensor:
    """(B,) bool: kind is one of `names` (comparisons with Python ints: no host-to-device copy)."""
    mask = torch.zeros_like(kind, dtype=torch.bool)
    for n in names:
        mask = mask | (kind == KINDS.index(n))
    return mask


def _present(mask: torch.Tensor) -> bool:
    """Whether any sample needs a branch: checked on CPU (saves work), assumed on other devices (a check would sync).
    Either way the result is the same: a branch only replaces the samples it masks."""
    return bool(mask.any()) if mask.device.type == "cpu" else True


def _apply_kinds(x: torch.Tensor, kind: torch.Tensor, arg: torch.Tensor, fill) -> torch.Tensor:
    """Each sample b gets op KINDS[kind[b]] with argument arg[b] (kind -1: unchanged). uint8 (B, 3, H, W) in/out."""
    out = x

    def select(mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, 1, 1, 1), y, out)

    lut_mask = _is_kind(kind, _LUT_KINDS)
    if _present(lut_mask):
        out = select(lut_mask, _apply_luts(x, kind, arg))
    geo_mask = _is_kind(kind, _GEOMETRIC_KINDS)
    if _present(geo_mask):
        out = select(geo_mask, _affine(x, kind, arg, fill))
    color_mask = kind == KINDS.index("Color")
    if _present(color_mask):
        out = select(color_mask, _blend(_grayscale(x), x, arg))
    sharp_mask = kind == KINDS.index("Sharpness")
    if _present(sharp_mask):
        out = select(sharp_mask, _blend(_smooth(x), x, arg))
    return out


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, x, factor) in its float32 arithmetic, truncated and clipped to uint8."""
    f = factor.float().view(-1, *([1] * (x.dim() - 1)))
    d = degenerate.float()
    return torch.trunc(d + f * (x.float() - d)).clamp(0, 255).to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, (B, 3, H, W) uint8 -> (B, 1, H, W) int32."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color's degenerate image: L broadcast to 3 channels, (B, 3, H, W) uint8."""
    return _luma(x).to(torch.uint8).expand_as(x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded; border pixels copied): uint8.
    Integer sums of shifted slices, so the result is exact on any device (no cuDNN algorithm choice involved)."""
    h, w = x.shape[-2:]
    xi = x.int()
    s = 4 * xi[..., 1:h - 1, 1:w - 1]
    for dy in range(3):
        for dx in range(3):
            s = s + xi[..., dy:h - 2 + dy, dx:w - 2 + dx]
    out = x.clone()
    out[..., 1:h - 1, 1:w - 1] = torch.div(2 * s + 13, 26, rounding_mode="floor").to(torch.uint8)
    return out


def _apply_luts(x: torch.Tensor, kind: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """The point ops as per-sample, per-channel 256-entry tables gathered in one pass: uint8 (B, 3, H, W)."""
    b, c, h, w = x.shape
    dev = x.device
    i = torch.arange(256, device=dev)
    lut = i.expand(b, c, 256)
    arg3 = arg.view(b, 1, 1)

    def put(name: str, table: torch.Tensor) -> None:
        nonlocal lut
        lut = torch.where((kind == KINDS.index(name)).view(b, 1, 1), table.expand(b, c, 256), lut)

    def has(*names) -> bool:
        return _present(_is_kind(kind, names))

    flat = x.reshape(b, c, h * w)
    if has("AutoContrast", "Equalize"):
        offsets = 256 * torch.arange(b * c, device=dev).view(b, c, 1)
        idx = (flat.long() + offsets).flatten()  # scatter_add, not bincount: bincount on CUDA syncs for its max
        hist = torch.zeros(b * c * 256, dtype=torch.long, device=dev).scatter_add_(0, idx, torch.ones_like(idx))
        hist = hist.view(b, c, 256)
        nonzero = hist > 0
        lo = nonzero.int().argmax(-1, keepdim=True)
        hi = 255 - nonzero.flip(-1).int().argmax(-1, keepdim=True)
        # ImageOps.autocontrast (cutoff 0): lut[i] = int(i * scale + offset) in float64, clipped
        span = (hi - lo).clamp(min=1).double()
        scale = torch.full_like(span, 255.0) / span  # not 255.0 / span: torch turns that into 255 * (1 / span)
        stretched = torch.trunc(i.double() * scale + (-lo.double()) * scale).clamp(0, 255).long()
        put("AutoContrast", torch.where(hi > lo, stretched, i))
        # ImageOps.equalize: step = (count - count of the last used level) // 255, lut = (step // 2 + cdf) // step
        last = hist.gather(-1, hi)
        step = (h * w - last) // 255
        cdf = hist.cumsum(-1) - hist
        equal = ((step // 2 + cdf) // step.clamp(min=1)).clamp(max=255)
        put("Equalize", torch.where((nonzero.sum(-1, keepdim=True) > 1) & (step > 0), equal, i))
    put("Invert", 255 - i)
    bits = arg3.long().clamp(0, 8)
    put("Posterize", i & (torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits) & 255))
    put("Solarize", torch.where(i < arg3, i, 255 - i))
    put("SolarizeAdd", torch.where(i < 128, (i + arg3.long()).clamp(max=255), i))
    put("Brightness", torch.trunc(arg3.float() * i.float()).clamp(0, 255).long())
    if has("Contrast"):
        luma_sum = _luma(x).view(b, -1).long().sum(-1).view(b, 1, 1)
        mean = (2 * luma_sum + h * w) // (2 * h * w)  # int(mean + 0.5) of ImageStat on the L image
        m = mean.float()
        put("Contrast", torch.trunc(m + arg3.float() * (i.float() - m)).clamp(0, 255).long())
    return lut.gather(-1, flat.long()).to(torch.uint8).view(b, c, h, w)


def _pil_affine(kind: torch.Tensor, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's inverse affine matrices (a, b, c, d, e, f) per sample, (B, 2, 3) float64: output pixel centre (u, v)
    samples the source at (a u + b v + c, d u + e v + f), as timm's rotate/shear/translate ops build them."""
    bsz = kind.shape[0]
    mat = torch.zeros(bsz, 2, 3, dtype=torch.float64, device=kind.device)
    mat[:, 0, 0] = mat[:, 1, 1] = 1.0
    arg = arg.double()
    rot = kind == KINDS.index("Rotate")
    angle = torch.where(rot, -torch.deg2rad(arg), 0.0)  # Image.rotate: counter-clockwise about (w/2, h/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = cos, sin, -sin, cos
    mat[:, 0, 2] = torch.where(rot, cos * -cx + sin * -cy + cx, 0.0)
    mat[:, 1, 2] = torch.where(rot, -sin * -cx + cos * -cy + cy, 0.0)
    mat[:, 0, 1] = torch.where(kind == KINDS.index("ShearX"), arg, mat[:, 0, 1])
    mat[:, 1, 0] = torch.where(kind == KINDS.index("ShearY"), arg, mat[:, 1, 0])
    mat[:, 0, 2] = torch.where(kind == KINDS.index("TranslateXRel"), arg * w, mat[:, 0, 2])
    mat[:, 1, 2] = torch.where(kind == KINDS.index("TranslateYRel"), arg * h, mat[:, 1, 2])
    return mat


def _affine(x: torch.Tensor, kind: torch.Tensor, arg: torch.Tensor, fill) -> torch.Tensor:
    """Geometric ops (identity for other kinds) via a per-sample sampling grid + grid_sample: uint8 (B, 3, H, W).

    Matches PIL's bilinear Image.transform: a source centre outside [0, W) x [0, H) gives `fill`, otherwise the
    bilinear value with edge-clamped taps (padding "border"), truncated (+1e-3 so float32 error cannot turn an
    integral value into the one below). The grid is what F.affine_grid computes, built elementwise instead so that
    TF32 matmuls (if a caller enables them) cannot blur the coordinates."""
    b, _, h, w = x.shape
    m = _pil_affine(kind, arg, h, w).float().view(b, 2, 3, 1, 1)
    v_ = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5).view(1, h, 1)
    u_ = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5).view(1, 1, w)
    src_x = m[:, 0, 0] * u_ + m[:, 0, 1] * v_ + m[:, 0, 2]  # (B, H, W) source pixel coordinates
    src_y = m[:, 1, 0] * u_ + m[:, 1, 1] * v_ + m[:, 1, 2]
    inside = ((src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)).unsqueeze(1)
    grid = torch.stack([src_x * (2.0 / w) - 1, src_y * (2.0 / h) - 1], -1)  # align_corners=False normalisation
    v = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    v = torch.trunc(v + 1e-3).clamp(0, 255)
    return torch.where(inside, v, _fill_tensor(fill, x.device)).to(torch.uint8)


def _fill_tensor(fill, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) float32 fill colour on `device`, built there (a host list copied in would sync on CUDA)."""
    if isinstance(fill, torch.Tensor):
        return fill.to(device, torch.float32).view(1, 3, 1, 1)
    if len(fill) != 3:
        raise ValueError(f"fill must be 3 uint8 values (RGB), got {fill!r}")
    return torch.stack([torch.full((), float(v), device=device) for v in fill]).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Random erasing


def random_erase(x: torch.Tensor, prob: float, generator: torch.Generator, *,
                 area: tuple[float, float] = (0.02, 1 / 3),
                 log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
                 attempts: int = 10) -> torch.Tensor:
    """timm RandomErasing(mode="pixel", count 1) on normalised float (B, C, H, W) -> a new tensor (x is untouched).

    With probability `prob` a sample gets one box: up to `attempts` tries of area ~ U(area) * H * W and aspect
    exp(U(log_ratio)), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), the first with h < H and
    w < W wins, at a uniform position; its pixels become N(0, 1) noise (drawn for the whole batch on
    generator.device: use a generator on x's device for speed)."""
    b, c, h, w = x.shape
    kw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
    chosen = torch.rand(b, **kw) < prob
    target = (area[0] + (area[1] - area[0]) * torch.rand(b, attempts, **kw)) * (h * w)
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(b, attempts, **kw))
    bh = torch.round(torch.sqrt(target * aspect))
    bw = torch.round(torch.sqrt(target / aspect))
    fits = (bh < h) & (bw < w)
    first = fits.int().argmax(1, keepdim=True)
    erased = chosen & fits.any(1)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    pos = torch.rand(b, 2, **kw)
    top = torch.floor(pos[:, 0] * (h - bh + 1))
    left = torch.floor(pos[:, 1] * (w - bw + 1))
    noise = torch.randn(b, c, h, w, generator=generator, device=generator.device, dtype=x.dtype)
    box = torch.stack([top, left, bh, bw], 1).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    t, lf, hh, ww = (v.view(b, 1, 1) for v in box.unbind(1))
    mask = (rows >= t) & (rows < t + hh) & (cols >= lf) & (cols < lf + ww) & erased.to(x.device).view(b, 1, 1)
    return torch.where(mask.unsqueeze(1), noise.to(x.device), x)


# ---------------------------------------------------------------------------------------------------------------------
# Crops and resizing


def random_resized_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float],
                              ratio: Sequence[float], generator: torch.Generator, *, attempts: int = 10
                              ) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for each (height, width): (B,) sizes -> (B, 4) float32 integral boxes
    (top, left, height, width) on heights' device. Up to `attempts` tries of area ~ U(scale) * H * W, log-uniform
    aspect w/h in `ratio`, w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)), accepted when
    0 < h <= H and 0 < w <= W, at a uniform position; else the centre crop with its aspect clamped to `ratio`."""
    dev = generator.device
    hs, ws = heights.to(dev, torch.float64), widths.to(dev, torch.float64)
    b = hs.shape[0]
    kw = {"generator": generator, "device": dev, "dtype": torch.float64}
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    target = (hs * ws).unsqueeze(1) * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, attempts, **kw))
    aspect = torch.exp(lo + (hi - lo) * torch.rand(b, attempts, **kw))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= ws.unsqueeze(1)) & (ch > 0) & (ch <= hs.unsqueeze(1))
    first = fits.int().argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    pos = torch.rand(b, 2, **kw)
    top = torch.floor(pos[:, 0] * (hs - ch + 1))
    left = torch.floor(pos[:, 1] * (ws - cw + 1))
    # fallback: whole image, cut to the nearest allowed aspect
    in_ratio = ws / hs
    rmin, rmax = min(ratio), max(ratio)
    fw = torch.where(in_ratio > rmax, torch.round(hs * rmax), ws)
    fh = torch.where(in_ratio < rmin, torch.round(ws / torch.full_like(ws, rmin)), hs)
    ok = fits.any(1)
    box = torch.stack([torch.where(ok, top, torch.floor((hs - fh) / 2)),
                       torch.where(ok, left, torch.floor((ws - fw) / 2)),
                       torch.where(ok, ch, fh), torch.where(ok, cw, fw)], 1)
    return box.to(heights.device, torch.float32)


def center_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, size: int, crop_pct: float) -> torch.Tensor:
    """The source box (B, 4) float32 (top, left, height, width) that timm's eval transform (resize the shorter side
    to floor(size / crop_pct), bilinear, then centre-crop size x size) reads, for one resized_crop_flip call with
    `image_sizes` given (the resize's taps may reach outside the box)."""
    hs, ws = heights.to(torch.float64), widths.to(torch.float64)
    short = torch.minimum(hs, ws)
    long = torch.maximum(hs, ws)
    scale_size = math.floor(size / crop_pct)
    new_long = torch.floor(scale_size * long / short)
    new_h = torch.where(ws <= hs, new_long, float(scale_size))
    new_w = torch.where(ws <= hs, float(scale_size), new_long)
    top = torch.round((new_h - size) / 2)  # CenterCrop: int(round(...)), half to even like Python's round
    left = torch.round((new_w - size) / 2)
    box = torch.stack([top * hs / new_h, left * ws / new_w, size * hs / new_h, size * ws / new_w], 1)
    return box.float()


def _resample_weights(start: torch.Tensor, length: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, size: int,
                      n: int) -> torch.Tensor:
    """PIL's bilinear resampling weights, (B, size, n) float32: output i is centred at start + (i + 0.5) * length /
    size; triangle filter stretched by max(length / size, 1) (antialiasing), taps j in [lo, hi), rows normalised
    then rounded to multiples of 2^-22 as PIL's uint8 resampler does. Memory: a few (B, size, n) float64 temporaries."""
    dev = start.device
    s = length.double() / torch.full_like(length, size, dtype=torch.float64)
    centre = start.double().view(-1, 1, 1) + (torch.arange(size, device=dev, dtype=torch.float64).view(1, -1, 1)
                                                + 0.5) * s.view(-1, 1, 1)
    support = s.clamp(min=1.0).view(-1, 1, 1)
    j = torch.arange(n, device=dev, dtype=torch.float64).view(1, 1, -1)
    wts = (1 - ((j + 0.5 - centre) / support).abs()).clamp(min=0)
    wts = wts * ((j >= lo.view(-1, 1, 1)) & (j < hi.view(-1, 1, 1)))
    wts = wts / wts.sum(-1, keepdim=True).clamp(min=1e-12)
    return (torch.floor(0.5 + wts * 2**22) / 2**22).float()  # PIL's 22-bit fixed-point coefficients, exact in fp32


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, *,
                      index: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes (B, 4) = (top, left, height, width) in source pixels out of uint8 images (N, 3, H, W) (sample b
    reads images[index[b]], or images[b] without index), resize each to (size, size) and mirror where flips (B,)
    -> float32 (B, 3, size, size) with integral values in 0..255 (`.to(torch.uint8)` is exact).

    The resize is PIL's bilinear (torchvision resized_crop on PIL, antialias=True): a separable triangle filter,
    widened by the downscale factor, rounded after the horizontal and after the vertical pass like PIL's uint8 path,
    done as two batched matmuls with dense per-sample weight matrices. Taps stay inside the box (crop then resize)
    unless image_sizes (B, 2) = true (height, width) is given: then they may read the whole image, as a resize of
    the whole image followed by a crop does (the eval transform; see center_crop_boxes).
    roi_align (aligned, adaptive sampling) would agree when upscaling but averages bilinear samples (a box filter)
    when downscaling, which is not PIL's triangle filter; hence the matrices."""
    src = images if index is None else images[index.to(images.device)]
    if src.dtype != torch.uint8 or src.dim() != 4:
        raise ValueError(f"expected uint8 (B, C, H, W) images, got {src.dtype} {tuple(src.shape)}")
    b, c, h, w = src.shape
    boxes = boxes.to(src.device, torch.float64)
    top, left, bh, bw = boxes.unbind(1)
    if image_sizes is None:
        y_lo, y_hi = torch.floor(top), torch.ceil(top + bh)
        x_lo, x_hi = torch.floor(left), torch.ceil(left + bw)
    else:
        sizes = image_sizes.to(src.device, torch.float64)
        y_lo, x_lo = torch.zeros_like(top), torch.zeros_like(left)
        y_hi, x_hi = sizes[:, 0], sizes[:, 1]
    wy = _resample_weights(top, bh, y_lo.clamp(min=0), y_hi.clamp(max=h), size, h)  # (B, size, H)
    wx = _resample_weights(left, bw, x_lo.clamp(min=0), x_hi.clamp(max=w), size, w)  # (B, size, W)
    wx = torch.where(flips.to(src.device).view(b, 1, 1), wx.flip(1), wx)
    rows = torch.bmm(src.float().view(b, c * h, w), wx.transpose(1, 2))  # (B, C*H, size)
    rows = torch.floor(rows + 0.5).clamp(0, 255).view(b, c, h, size)
    out = torch.einsum("bih,bchj->bcij", wy, rows)
    return torch.floor(out + 0.5).clamp(0, 255)
