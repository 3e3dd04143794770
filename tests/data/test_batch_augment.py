"""patfast.data.batch_augment against timm's PIL ops and torchvision's PIL resize, on CPU.

Tolerances, measured on these images (smooth random colour fields plus noise, and pure noise):
- colour/point ops: exact (PIL's integer and float32 arithmetic is reproduced).
- geometric ops: max |diff| 1 level on 0.07-0.2% of values (float32 grid vs PIL's float64 coordinates, values
  truncated to uint8 as PIL does); bound used: max 1, fraction differing < 2.5%.
- resize: upscaling 32 -> 64 / 224 exact; downscaling 64 -> 24 and the eval resize+centre crop: max 1 level on
  ~0.5-0.6% of values (float32 sums vs PIL's fixed-point sums at rounding ties); bound used: max 1, fraction < 3%.
- whole RandAugment vs timm's (different draws): mean |change| and unchanged fraction agree within noise.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from patfast.data import batch_augment as ba
from patfast.errors import UserError

FILL = (124, 116, 104)  # timm: round(255 * IMAGENET_DEFAULT_MEAN)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) uint8: smooth colour fields plus noise, one pure-noise image and one low-contrast image."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 5, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    x = (x + 12 * torch.randn(n, 3, h, w, generator=g)).round().clamp(0, 255).to(torch.uint8)
    x[0] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    x[1] = x[1] // 4 + 90
    return x


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy())


def _tensor(p: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------- parsing


def test_parse_good_strings():
    s = ba.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert s == ba.RandAugmentSpec(magnitude=9, num_layers=2, prob=0.5, magnitude_std=0.5, magnitude_max=10,
                                   increasing=True)
    assert s.op_names == ba.RAND_INCREASING_OPS
    assert ba.parse_rand_augment("rand") == ba.RandAugmentSpec()
    assert ba.parse_rand_augment("rand").op_names == ba.RAND_OPS
    s = ba.parse_rand_augment("rand-m7-n3-mstd101-mmax20-inc0-p1.0")
    assert (s.magnitude, s.num_layers, s.magnitude_std, s.magnitude_max, s.increasing, s.prob) == (
        7, 3, math.inf, 20, False, 1.0)
    assert ba.parse_rand_augment("rand-mmax0").magnitude_max == 10  # timm: "magnitude_max or 10"


def test_op_lists_are_timms():
    from timm.data import auto_augment as aa

    assert ba.RAND_OPS == tuple(aa._RAND_TRANSFORMS)
    assert ba.RAND_INCREASING_OPS == tuple(aa._RAND_INCREASING_TRANSFORMS)


@pytest.mark.parametrize("bad", ["augmix-m5-w4-d2", "original", "v0r-mstd0.5", "rand-m9-tweights", "rand-x3",
                                 "rand-m9.5", "rand-p2", "rand-inc2", "", "garbage", "randm9"])
def test_parse_bad_strings(bad):
    with pytest.raises(UserError, match="gpu and dali backends support RandAugment only") as e:
        ba.parse_rand_augment(bad)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ ops against timm


def _timm_arg(aa, monkeypatch, name, m, negate):
    monkeypatch.setattr(aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
    fn = aa.LEVEL_TO_ARG[name]
    return fn(m, {}) if fn is not None else ()


@pytest.mark.parametrize("name", sorted(set(ba.RAND_OPS + ba.RAND_INCREASING_OPS)))
def test_level_to_arg_matches_timm(name, monkeypatch):
    from timm.data import auto_augment as aa

    mags = [0.0, 0.3, 2.4, 2.5, 4.99, 5.0, 7.3, 9.0, 10.0, 13.0]
    for negate in (False, True):
        ours = ba.level_to_arg(name, torch.tensor(mags, dtype=torch.float64), torch.full((len(mags),), negate))
        for m, got in zip(mags, ours.tolist()):
            ref = _timm_arg(aa, monkeypatch, name, m, negate)
            assert got == (ref[0] if ref else 0.0), (name, m, negate)


_TIMM_FN = {"AutoContrast": "auto_contrast", "Equalize": "equalize", "Invert": "invert", "Rotate": "rotate",
            "Posterize": "posterize", "Solarize": "solarize", "SolarizeAdd": "solarize_add", "Color": "color",
            "Contrast": "contrast", "Brightness": "brightness", "Sharpness": "sharpness", "ShearX": "shear_x",
            "ShearY": "shear_y", "TranslateXRel": "translate_x_rel", "TranslateYRel": "translate_y_rel"}
_COLOUR_OPS = [n for n in sorted(set(ba.RAND_OPS + ba.RAND_INCREASING_OPS))
               if n.replace("Increasing", "") not in ba._GEOMETRIC_KINDS]
_GEOMETRIC_OPS = list(ba._GEOMETRIC_KINDS)


def _compare_with_timm(name, monkeypatch, shape):
    """(max |diff|, fraction of differing values) over magnitudes, signs and the images of `shape`."""
    from timm.data import auto_augment as aa

    imgs = _images(4, *shape)
    fn = getattr(aa, _TIMM_FN[name.replace("Increasing", "")])
    worst, differing, total = 0, 0, 0
    for m in (0.0, 1.0, 3.0, 5.0, 9.0, 10.0):
        for negate in (False, True):
            args = _timm_arg(aa, monkeypatch, name, m, negate)
            if name.startswith("Posterize") and not 1 <= args[0] < 8:
                continue  # Pillow >= 13 refuses 0 bits (test_posterize_zero_bits); timm skips >= 8
            ours = ba.apply_op(imgs, name, args[0] if args else 0.0, FILL)
            ref = torch.stack([_tensor(fn(_pil(im), *args, fillcolor=FILL, resample=Image.BILINEAR)) for im in imgs])
            d = (ours.int() - ref.int()).abs()
            worst, differing, total = max(worst, int(d.max())), differing + int((d > 0).sum()), total + d.numel()
    return worst, differing / total


@pytest.mark.parametrize("shape", [(37, 45), (7, 9)])
@pytest.mark.parametrize("name", _COLOUR_OPS)
def test_colour_op_matches_timm_exactly(name, shape, monkeypatch):
    assert _compare_with_timm(name, monkeypatch, shape) == (0, 0.0)


@pytest.mark.parametrize("shape", [(37, 45), (7, 9)])
@pytest.mark.parametrize("name", _GEOMETRIC_OPS)
def test_geometric_op_close_to_timm(name, shape, monkeypatch):
    worst, frac = _compare_with_timm(name, monkeypatch, shape)
    print(f"{name} {shape}: max |diff| {worst}, fraction differing {frac:.4f}")
    assert worst <= 1 and frac < 0.025


def test_posterize_zero_bits_is_black():
    # Old Pillow (and TF) posterize to 0 bits gives 0; Pillow 13 raises instead, so timm would crash there.
    imgs = _images(3, 8, 8)
    assert (ba.apply_op(imgs, "Posterize", 0.0) == 0).all()
    assert torch.equal(ba.apply_op(imgs, "Posterize", 8.0), imgs)


# --------------------------------------------------------------------------------------------------- RandAugment


def test_draw_statistics():
    spec = ba.RandAugmentSpec(magnitude=5, num_layers=2, prob=0.5, magnitude_std=1.0)
    d = ba.draw_rand_augment(40000, spec, _gen(0))
    assert d.ops.shape == d.magnitude.shape == d.negate.shape == (40000, 2)
    applied = d.ops >= 0
    n = applied.numel()
    assert abs(applied.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    counts = torch.bincount(d.ops[applied], minlength=15).double()
    k = applied.sum().item()
    p = 1 / 15
    assert (counts - k * p).abs().max().item() < 5 * math.sqrt(k * p * (1 - p))
    chi2 = ((counts - k * p) ** 2 / (k * p)).sum().item()
    assert chi2 < 45  # 14 degrees of freedom: P(chi2 > 45) ~ 4e-5
    mag = d.magnitude
    assert abs(mag.mean().item() - 5) < 0.05 and abs(mag.std().item() - 1) < 0.05
    assert abs(d.negate.float().mean().item() - 0.5) < 0.01
    # clipping at mmax, as timm: N(9, 0.5) clipped to [0, 10]
    clipped = ba.draw_rand_augment(40000, ba.parse_rand_augment("rand-m9-mstd0.5"), _gen(1)).magnitude
    assert clipped.max().item() == 10 and abs((clipped == 10).double().mean().item() - 0.0228) < 0.005
    # mstd > 100: U(0, m)
    uni = ba.draw_rand_augment(40000, ba.parse_rand_augment("rand-m8-mstd101"), _gen(2)).magnitude
    assert uni.min().item() >= 0 and uni.max().item() < 8 and abs(uni.mean().item() - 4) < 0.05


def test_apply_matches_op_by_op():
    spec = ba.parse_rand_augment("rand-m9-n3-mstd0.5-inc1-p0.8")
    imgs = _images(40, 11, 13)
    draw = ba.draw_rand_augment(40, spec, _gen(3))
    out = ba.apply_rand_augment(imgs, draw, spec, FILL)
    for b in range(40):
        x = imgs[b:b + 1]
        for layer in range(spec.num_layers):
            op = int(draw.ops[b, layer])
            if op >= 0:
                name = spec.op_names[op]
                x = ba.apply_op(x, name, ba.level_to_arg(name, draw.magnitude[b:b + 1, layer],
                                                         draw.negate[b:b + 1, layer]), FILL)
        assert torch.equal(out[b:b + 1], x), b


def test_rand_augment_contract():
    spec = ba.parse_rand_augment("rand-m9-mstd0.5-inc1")
    imgs = _images(16, 7, 9)
    before = imgs.clone()
    a = ba.rand_augment(imgs, spec, _gen(5), FILL)
    assert a.dtype == torch.uint8 and a.shape == imgs.shape
    assert torch.equal(imgs, before)  # input untouched
    assert torch.equal(a, ba.rand_augment(imgs, spec, _gen(5), FILL))
    assert not torch.equal(a, ba.rand_augment(imgs, spec, _gen(6), FILL))
    assert not torch.equal(a, imgs)
    off = ba.parse_rand_augment("rand-m9-mstd0.5-inc1-p0")
    assert torch.equal(ba.rand_augment(imgs, off, _gen(5), FILL), imgs)
    with pytest.raises(ValueError, match="uint8"):
        ba.rand_augment(imgs.float(), spec, _gen(5), FILL)


def test_rand_augment_statistics_match_timm():
    """Whole RandAugment against timm's on the same images: same change statistics (draws differ, so loosely).
    m7 keeps magnitudes below 10, where timm's PosterizeIncreasing would ask Pillow 13 for 0 bits and crash."""
    import random

    from timm.data.auto_augment import rand_augment_transform

    spec = "rand-m7-mstd0.5-inc1"
    imgs = _images(3000, 16, 16, seed=3)
    state = random.getstate(), np.random.get_state()
    random.seed(0)
    np.random.seed(0)
    try:
        tf = rand_augment_transform(spec, {"translate_const": 7, "img_mean": FILL, "interpolation": Image.BILINEAR})
        ref = torch.stack([_tensor(tf(_pil(im))) for im in imgs])
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    ours = ba.rand_augment(imgs, ba.parse_rand_augment(spec), _gen(0), FILL)
    stats = []
    for out in (ref, ours):
        d = (out.float() - imgs.float()).abs().flatten(1)
        stats.append((d.mean().item(), (d.max(1).values == 0).float().mean().item(), out.float().mean().item()))
    print("timm vs ours (mean |change|, unchanged fraction, mean):", stats)
    (d_ref, u_ref, m_ref), (d_ours, u_ours, m_ours) = stats
    assert abs(d_ours - d_ref) < 0.1 * d_ref and abs(u_ours - u_ref) < 0.05 and abs(m_ours - m_ref) < 3


# ------------------------------------------------------------------------------------------------- random erasing


def test_random_erase():
    b, h, w = 3000, 32, 32
    x = torch.full((b, 3, h, w), 7.0)
    out = ba.random_erase(x, 0.25, _gen(7))
    assert (x == 7).all() and out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, ba.random_erase(x, 0.25, _gen(7)))
    erased = out != 7
    assert torch.equal(erased[:, 0], erased[:, 1]) and torch.equal(erased[:, 0], erased[:, 2])
    hit = erased[:, 0].flatten(1).any(1)
    assert abs(hit.float().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / b)
    fractions, aspects = [], []
    for m in erased[hit, 0]:
        rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        bh, bw = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw and m.sum() == bh * bw  # one box
        assert bh < h and bw < w
        fractions.append(bh * bw / (h * w))
        aspects.append(bh / bw)
    # area ~ U(0.02, 1/3) before rounding h and w to integers; aspect within (0.3, 1/0.3) likewise
    assert 0.02 * 0.6 < min(fractions) and max(fractions) < 1 / 3 * 1.25
    assert abs(np.mean(fractions) - (0.02 + 1 / 3) / 2) < 0.02
    assert 0.3 * 0.7 < min(aspects) and max(aspects) < 1 / 0.3 / 0.7
    noise = out[erased]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    assert torch.equal(ba.random_erase(x, 0.0, _gen(7)), x)


# -------------------------------------------------------------------------------------------------- crops, resize


def _torchvision_crop(imgs, boxes, flips, size):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = []
    for im, (t, lf, bh, bw), f in zip(imgs, boxes, flips):
        p = TF.resized_crop(_pil(im), t, lf, bh, bw, [size, size], InterpolationMode.BILINEAR, antialias=True)
        out.append(_tensor(TF.hflip(p) if f else p))
    return torch.stack(out).float()


@pytest.mark.parametrize("src, size, boxes", [
    (32, 64, [(0, 0, 32, 32), (3, 5, 20, 27), (10, 0, 22, 11), (0, 31, 32, 1)]),
    (32, 224, [(0, 0, 32, 32), (1, 2, 17, 29)]),
    (64, 24, [(0, 0, 64, 64), (3, 5, 50, 57), (10, 1, 39, 60), (20, 20, 24, 24)]),
])
def test_resized_crop_flip_matches_torchvision(src, size, boxes):
    imgs = _images(len(boxes), src, src, seed=8)
    flips = torch.tensor([k % 2 == 1 for k in range(len(boxes))])
    out = ba.resized_crop_flip(imgs, torch.tensor(boxes, dtype=torch.float32), flips, size)
    assert out.dtype == torch.float32 and out.shape == (len(boxes), 3, size, size)
    assert torch.equal(out, out.round())
    d = (out - _torchvision_crop(imgs, boxes, flips.tolist(), size)).abs()
    print(f"{src} -> {size}: max |diff| {d.max().item()}, fraction differing {(d > 0).float().mean().item():.4f}")
    if size > src:
        assert d.max().item() == 0
    else:
        assert d.max().item() <= 1 and (d > 0).float().mean().item() < 0.03


def test_resized_crop_flip_index_and_flip():
    imgs = _images(3, 20, 20, seed=9)
    boxes = torch.tensor([[2.0, 3.0, 15.0, 12.0]] * 4)
    index = torch.tensor([2, 0, 2, 1])
    out = ba.resized_crop_flip(imgs, boxes, torch.tensor([False, False, True, False]), 16, index=index)
    plain = ba.resized_crop_flip(imgs[index], boxes, torch.zeros(4, dtype=torch.bool), 16)
    assert torch.equal(out[[0, 1, 3]], plain[[0, 1, 3]])
    assert torch.equal(out[2], plain[2].flip(-1))


def test_center_crop_boxes_match_timm_eval():
    from timm.data import create_transform

    size = 24
    tf = create_transform(size, is_training=False, interpolation="bilinear", crop_pct=0.875, crop_mode="center",
                          use_prefetcher=True)
    sizes = [(37, 50), (50, 37), (40, 40), (31, 64), (27, 27), (64, 20)]
    padded = torch.zeros(len(sizes), 3, 64, 64, dtype=torch.uint8)
    refs = []
    for k, (h, w) in enumerate(sizes):
        im = _images(2, h, w, seed=10 + k)[1 if k % 2 else 0]  # noise and low-contrast smooth images
        padded[k, :, :h, :w] = im
        refs.append(torch.as_tensor(np.asarray(tf(_pil(im)))))
    hs, ws = torch.tensor([s[0] for s in sizes]), torch.tensor([s[1] for s in sizes])
    boxes = ba.center_crop_boxes(hs, ws, size, 0.875)
    out = ba.resized_crop_flip(padded, boxes, torch.zeros(len(sizes), dtype=torch.bool), size,
                               image_sizes=torch.stack([hs, ws], 1))
    d = (out - torch.stack(refs).float()).abs()
    print(f"eval: max |diff| {d.max().item()}, fraction differing {(d > 0).float().mean().item():.4f}")
    assert d.max().item() <= 1 and (d > 0).float().mean().item() < 0.03


def test_random_resized_crop_boxes():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    hs = torch.tensor([32, 375, 500, 40] * 1500)
    ws = torch.tensor([32, 500, 375, 60] * 1500)
    boxes = ba.random_resized_crop_boxes(hs, ws, scale, ratio, _gen(11))
    assert boxes.shape == (6000, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, ba.random_resized_crop_boxes(hs, ws, scale, ratio, _gen(11)))
    assert torch.equal(boxes, boxes.round())
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= hs).all() and (left + bw <= ws).all()
    # rounding h and w to integers moves area and aspect a little (most on the 32 x 32 images)
    frac = bh * bw / (hs * ws)
    big = hs > 100
    assert frac[big].min() > 0.08 * 0.97 and frac[big].max() <= 1.0
    assert frac.min() > 0.08 * 0.8
    aspect = bw / bh
    assert aspect[big].min() > 0.75 * 0.97 and aspect[big].max() < 4 / 3 / 0.97
    assert len(torch.unique(top[big])) > 100  # positions vary
    # the accepted boxes are biased (big areas fit less often), so compare with torchvision's own draws
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 375, 500), scale, ratio) for _ in range(3000)])
    ref_frac = (ref[:, 2] * ref[:, 3] / (375 * 500)).double()
    ours = frac[(hs == 375)].double()
    sigma = math.sqrt(ref_frac.var().item() * (1 / len(ref) + 1 / len(ours)))
    assert abs(ours.mean().item() - ref_frac.mean().item()) < 5 * sigma
    ref_log_aspect = (ref[:, 3] / ref[:, 2]).double().log()
    ours_log_aspect = aspect[hs == 375].double().log()
    sigma = math.sqrt(ref_log_aspect.var().item() * (1 / len(ref) + 1 / len(ours_log_aspect)))
    assert abs(ours_log_aspect.mean().item() - ref_log_aspect.mean().item()) < 5 * sigma


def test_random_resized_crop_boxes_fallback():
    # No attempt can fit: tall, wide and square images fall back to the centre crop with aspect clamped to ratio.
    hs, ws = torch.tensor([100, 10, 50]), torch.tensor([10, 100, 50])
    tall = ba.random_resized_crop_boxes(hs[:2], ws[:2], (0.9, 1.0), (3 / 4, 4 / 3), _gen(12))
    assert tall.tolist() == [[43.0, 0.0, 13.0, 10.0], [0.0, 43.0, 10.0, 13.0]]
    whole = ba.random_resized_crop_boxes(hs[2:], ws[2:], (1.5, 2.0), (3 / 4, 4 / 3), _gen(12))
    assert whole.tolist() == [[0.0, 0.0, 50.0, 50.0]]


# ---------------------------------------------------------------------------------------------------------- device


@pytest.mark.gpu
def test_cuda_matches_cpu_with_a_cpu_generator():
    spec = ba.parse_rand_augment("rand-m9-mstd0.5-inc1")
    imgs = _images(64, 33, 31)
    cpu = ba.rand_augment(imgs, spec, _gen(13), FILL)
    gpu = ba.rand_augment(imgs.cuda(), spec, _gen(13), FILL).cpu()
    d = (cpu.int() - gpu.int()).abs()
    assert (d > 1).float().mean().item() < 0.01
    boxes = ba.random_resized_crop_boxes(torch.tensor([33] * 64), torch.tensor([31] * 64), (0.08, 1), (0.75, 4 / 3),
                                         _gen(14))
    flips = torch.rand(64, generator=_gen(15)) < 0.5
    a = ba.resized_crop_flip(imgs, boxes, flips, 24)
    b = ba.resized_crop_flip(imgs.cuda(), boxes.cuda(), flips.cuda(), 24).cpu()
    assert (a - b).abs().max().item() <= 1
    x = torch.randn(64, 3, 24, 24)
    assert torch.equal(ba.random_erase(x, 0.5, _gen(16)), ba.random_erase(x.cuda(), 0.5, _gen(16)).cpu())


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Contrast", "Color", "Sharpness", "Brightness"])
def test_colour_op_special_images_match_timm(name):
    from timm.data import auto_augment as aa

    g = _gen(17)
    imgs = torch.stack([
        torch.full((3, 6, 5), 77, dtype=torch.uint8),  # constant
        torch.randint(0, 2, (3, 6, 5), generator=g, dtype=torch.uint8) * 200 + 20,  # two levels
        torch.cat([torch.full((1, 6, 5), 3, dtype=torch.uint8),
                   torch.randint(0, 256, (2, 6, 5), generator=g, dtype=torch.uint8)]),  # one channel constant
        torch.randint(250, 256, (3, 6, 5), generator=g, dtype=torch.uint8),  # near white
    ])
    fn = getattr(aa, _TIMM_FN[name])
    for factor in (0.1, 0.55, 1.0, 1.9):
        args = () if name in ("AutoContrast", "Equalize") else (factor,)
        ref = torch.stack([_tensor(fn(_pil(im), *args)) for im in imgs])
        assert torch.equal(ba.apply_op(imgs, name, factor), ref), factor
    for h, w in ((1, 4), (2, 5), (3, 3)):
        small = imgs[:, :, :h, :w].contiguous()
        ref = torch.stack([_tensor(fn(_pil(im), *(() if name in ("AutoContrast", "Equalize") else (1.7,))))
                           for im in small])
        assert torch.equal(ba.apply_op(small, name, 1.7), ref), (h, w)
