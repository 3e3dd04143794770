"""The dali loader backend (patfast/data/dali.py), on CPU-only DALI pipelines.

Interpolation tolerance used below: DALI's and PIL's bilinear resamplers compute in floating/fixed point and both
round to uint8, so inside the image they differ by at most one uint8 level (1 / 255 / std in normalised units).
When downscaling, the outermost output row/column differs more: PIL renormalises its filter where it is cut by the
image edge, DALI repeats the edge pixel; that ring gets a looser bound (the cut part of the filter's weight).
"""

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from patfast.data import ArrayImages, DataSpec, ImageData, load_data, make_loader  # noqa: E402
from patfast.data import dali as dali_module  # noqa: E402
from patfast.data.batch_augment import RAND_OPS, RandAugmentSpec, parse_rand_augment  # noqa: E402
from patfast.data.dali import (  # noqa: E402
    CROP_ATTEMPTS,
    DaliLoader,
    crop_flip_draws,
    dali_available,
    rand_augment_draws,
    resized_crop_dali,
)
from patfast.data.transforms import RATIO  # noqa: E402
from patfast.errors import UserError  # noqa: E402

CPU = torch.device("cpu")
MEAN, STD = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]


def dali_loader(split, **kw):
    args = dict(batch_size=8, img_size=8, train=True, device=CPU, seed=0, workers=1, rank=0, world_size=1)
    args.update(kw)
    return DaliLoader(split, **args)


def index_split(n: int, size: int = 6) -> ArrayImages:
    """Image i is the constant colour (i % 256, i // 256, 7): its index survives any crop, resize or flip."""
    images = np.zeros((n, size, size, 3), np.uint8)
    idx = np.arange(n)
    images[..., 0] = (idx % 256)[:, None, None]
    images[..., 1] = (idx // 256)[:, None, None]
    images[..., 2] = 7
    return ArrayImages(images, idx % 3, classes=["a", "b", "c"], mean=MEAN, std=STD, native_size=size, name="index")


def decode_index(x: torch.Tensor) -> list[int]:
    pixels = x.float().mean(dim=(2, 3)) * torch.tensor(STD) * 255 + torch.tensor(MEAN) * 255
    return (pixels[:, 0].round() + 256 * pixels[:, 1].round()).long().tolist()


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def colour_jpegs(tmp_path_factory):
    """imagefolder whose class c is the solid colour COLOURS[c], JPEG files of varied sizes."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for sub in ("train", "val"):
        for c, colour in enumerate(COLOURS):
            os.makedirs(root / sub / f"class{c}")
            for k in range(3):
                h, w = (int(v) for v in rng.integers(16, 40, size=2))
                Image.new("RGB", (w, h), colour).save(root / sub / f"class{c}" / f"{k}.jpg", quality=95)
    return load_data(f"imagefolder:{root}")


# ------------------------------------------------------------------------------------------- shapes, lengths


def test_dali_is_available_and_loader_attributes(digits):
    assert dali_available()
    loader = dali_loader(digits.train, batch_size=64, img_size=16, seed=3)
    assert loader.backend == "dali" and loader.dataset is digits.train and loader.drop_last and loader.train
    assert loader.mean == digits.mean and loader.std == digits.std and loader.num_classes == 10
    assert loader.batch_size == 64 and len(loader) == 1437 // 64 and loader.epoch == 0
    assert "DaliLoader(digits/train" in repr(loader)


def test_array_batches_train_and_eval(digits):
    train = dali_loader(digits.train, batch_size=100, img_size=12, workers=2)
    sizes = []
    for x, y in train:
        assert x.shape == (100, 3, 12, 12) and x.dtype == torch.float32 and x.device == CPU
        assert y.shape == (100,) and y.dtype == torch.int64
        sizes.append(len(y))
    assert sizes == [100] * 14 == [100] * len(train) and train.epoch == 1
    test = dali_loader(digits.test, batch_size=100, img_size=12, train=False)
    assert len(test) == 4 and not test.drop_last
    x, y = epoch(test)
    assert x.shape == (360, 3, 12, 12) and y.tolist() == digits.test.labels.tolist()


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_folder_batches_train_and_eval(kind, folder_dir, colour_jpegs):
    data = load_data(f"imagefolder:{folder_dir}") if kind == "png" else colour_jpegs  # 9 / 12 train images
    augment = "rand-m9-mstd0.5-inc1" if kind == "jpeg" else None  # RandAugment on decoded files too
    train = dali_loader(data.train, batch_size=4, img_size=10, auto_augment=augment)
    batches = list(train)
    assert len(batches) == len(train) == len(data.train) // 4
    assert all(x.shape == (4, 3, 10, 10) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    test = dali_loader(data.test, batch_size=4, img_size=10, train=False)  # 6 / 12 val images
    x, y = epoch(test)
    assert x.shape == (len(data.test), 3, 10, 10) and y.tolist() == data.test.labels.tolist()
    assert [len(b[1]) for b in test] == [4] * (len(data.test) // 4) + [len(data.test) % 4] * (len(data.test) % 4 > 0)


# ----------------------------------------------------------------------------------------------------- parity


def torch_resized_crop(image, box, flip, size, mean, std):
    import torchvision.transforms.functional as F

    top, left, h, w = box
    pil = F.resized_crop(Image.fromarray(image), top, left, h, w, [size, size],
                         interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if flip:
        pil = F.hflip(pil)
    return F.normalize(F.to_tensor(pil), mean, std)


@pytest.mark.parametrize("size, shape, boxes", [
    (56, (32, 32), [(0, 0, 32, 32), (3, 5, 20, 16), (10, 1, 7, 30)]),  # upsampling 32 -> 56 px and more
    (12, (40, 50), [(0, 0, 40, 50), (2, 3, 37, 41), (5, 9, 30, 13)]),  # downsampling (antialiased)
])
def test_resized_crop_matches_torchvision(size, shape, boxes):
    rng = np.random.default_rng(size)
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in boxes]  # noise: the hardest case
    flips = [False, True, True]
    out = resized_crop_dali(images, boxes, flips, size, MEAN, STD)
    ref = torch.stack([torch_resized_crop(i, b, f, size, MEAN, STD) for i, b, f in zip(images, boxes, flips)])
    assert out.shape == ref.shape == (3, 3, size, size)
    levels = (out - ref).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255  # error in uint8 levels
    assert levels[..., 1:-1, 1:-1].max() < 1.001  # rounding only
    assert levels[..., 1:-1, 1:-1].mean() < 0.3
    if size > shape[0]:
        assert levels.max() < 1.001  # upsampling: beyond the edge is the edge pixel for both
    else:
        ring = torch.cat([levels[..., [0, -1], :].flatten(), levels[..., [0, -1]].flatten()])
        # the cut filter misses at most 1/8 of its weight there: <= 32 levels on noise (2.9 on average here)
        assert ring.mean() < 6 and ring.max() < 40


def test_eval_matches_torch_backend(digits, tmp_path):
    # digits: 8 px upsampled to int(16 / 0.875) = 18, centre crop 16; folder: gradients of 40 x 52 / 52 x 40 px
    # downsampled to 13 x 16 (longer side truncated), and 33 x 33 to 13 x 13 whose centre-crop margin of 1 is
    # rounded half to even as torchvision does
    for sub in ("train", "val"):
        for c, (h, w) in enumerate([(40, 52), (52, 40), (33, 33)]):
            os.makedirs(tmp_path / sub / f"k{c}")
            y, x = np.mgrid[0:h, 0:w]
            img = np.stack([x * 4 + c * 10, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / sub / f"k{c}" / "0.png")
    gradients = load_data(f"imagefolder:{tmp_path}")
    for data, size in ((digits, 16), (gradients, 12)):
        ref_x, ref_y = epoch(make_loader(data, "test", backend="torch", batch_size=50, img_size=size, train=False))
        out_x, out_y = epoch(dali_loader(data.test, batch_size=50, img_size=size, train=False))
        assert out_y.tolist() == ref_y.tolist()
        level = 1 / 255 / min(data.std)
        err = (out_x - ref_x).abs()
        assert err[..., 1:-1, 1:-1].max() <= level + 1e-5, err.max().item() / level
        assert err.mean() < 0.3 * level


def test_random_crop_boxes_follow_timm():
    # the in-graph box computation against timm's RandomResizedCropAndInterpolation.get_params on the same draws
    from nvidia.dali import fn, pipeline_def, types

    shapes = np.array([[40, 50], [50, 40], [8, 8], [30, 300], [300, 30], [17, 5], [224, 331], [1, 1]], np.int32)
    seeds = np.arange(len(shapes), dtype=np.uint64) * 7919 + 11
    draws = crop_flip_draws(seeds, (0.08, 1.0), 0.5)
    draws[3, :CROP_ATTEMPTS] = 1.0  # whole-area crops of a 1:10 image never fit: the ratio-clamped fallback

    @pipeline_def(batch_size=len(shapes), num_threads=1, device_id=None, seed=0)
    def graph():
        shape = fn.external_source(source=lambda: list(shapes), batch=True, dtype=types.INT32)
        d = fn.external_source(source=lambda: list(draws), batch=True, dtype=types.FLOAT64)
        return dali_module._random_crop_box(shape, d)

    pipe = graph()
    pipe.build()
    anchors, sizes = (o.as_array() for o in pipe.run())
    a = CROP_ATTEMPTS
    for (height, width), row, anchor, size in zip(shapes.tolist(), draws, anchors, sizes):
        for attempt in range(a):  # timm's loop, with our draws in place of random.uniform / randint
            target_area = height * width * row[attempt]
            w = int(round(math.sqrt(target_area * row[a + attempt])))
            h = int(round(math.sqrt(target_area / row[a + attempt])))
            if 0 < w <= width and 0 < h <= height:
                expected = (int(row[2 * a] * (height - h + 1)), int(row[2 * a + 1] * (width - w + 1)), h, w)
                break
        else:
            in_ratio = width / height
            w, h = width, height
            if in_ratio < min(RATIO):
                h = int(round(w / min(RATIO)))
            elif in_ratio > max(RATIO):
                w = int(round(h * max(RATIO)))
            expected = ((height - h) // 2, (width - w) // 2, h, w)
        assert (*anchor.tolist(), *size.tolist()) == expected, (height, width)


# -------------------------------------------------------------------------------------------- labels, order


def test_labels_stay_with_images(colour_jpegs):
    loader = dali_loader(colour_jpegs.train, batch_size=4, img_size=12, crop_scale=(0.08, 1.0), hflip=0.5, seed=3)
    mean, std = torch.tensor(colour_jpegs.mean), torch.tensor(colour_jpegs.std)
    colours = torch.tensor(COLOURS, dtype=torch.float32)
    seen = 0
    for _ in range(2):
        for x, y in loader:
            rgb = x.mean(dim=(2, 3)) * std * 255 + mean * 255
            assert torch.cdist(rgb, colours).argmin(dim=1).tolist() == y.tolist()
            assert torch.cdist(rgb, colours).min(dim=1).values.max() < 12  # JPEG error only
            seen += len(y)
    assert seen == 2 * 12


def test_each_sample_once_per_epoch_and_eval_in_order():
    split = index_split(300)
    loader = dali_loader(split, batch_size=32, img_size=10, seed=1)
    for _ in range(2):
        got = decode_index(epoch(loader)[0])
        assert len(got) == len(set(got)) == 32 * 9 and set(got) <= set(range(300))  # 300 - 288 dropped
    test = dali_loader(split, batch_size=32, img_size=10, train=False)
    x, y = epoch(test)
    assert decode_index(x) == list(range(300)) and y.tolist() == split.labels.tolist()


def test_shards_cover_the_epoch_once():
    split = index_split(90)
    shards = []
    for rank in range(2):
        loader = dali_loader(split, batch_size=9, seed=5, rank=rank, world_size=2)
        loader.set_epoch(4)
        shards.append(decode_index(epoch(loader)[0]))
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(90))
    evals = [decode_index(epoch(dali_loader(split, batch_size=8, train=False, rank=r, world_size=2))[0])
             for r in range(2)]
    assert evals == [list(range(0, 90, 2)), list(range(1, 90, 2))]


def test_same_order_as_torch_backend():
    split = index_split(70)
    data = ImageData(DataSpec("digits"), split, split)
    torch_loader = make_loader(data, "train", backend="torch", batch_size=16, img_size=8, train=True, seed=11)
    loader = dali_loader(split, batch_size=16, seed=11)
    for e in (0, 3):
        torch_loader.set_epoch(e)
        loader.set_epoch(e)
        ref_x, ref_y = epoch(torch_loader)
        x, y = epoch(loader)
        assert decode_index(x) == decode_index(ref_x) and y.tolist() == ref_y.tolist()


# ----------------------------------------------------------------------------------------- reproducibility


def test_reproducible_per_seed_and_epoch(digits):
    loader = dali_loader(digits.train, batch_size=16, img_size=16, seed=2)
    loader.set_epoch(5)
    a = next(iter(loader))[0]
    loader.set_epoch(5)
    b = next(iter(loader))[0]
    c = next(iter(loader))[0]  # epoch 6
    assert loader.epoch == 7
    assert torch.equal(a, b) and not torch.equal(a, c)
    other = dali_loader(digits.train, batch_size=16, img_size=16, seed=3)
    other.set_epoch(5)
    assert not torch.equal(a, next(iter(other))[0])


def test_reused_pipeline_equals_fresh_ones():
    # an in-memory split keeps its pipeline between epochs (DALI reset); a partial epoch drops it
    split = index_split(50, size=8)
    loader = dali_loader(split, batch_size=8, img_size=8, seed=9)
    runs = [epoch(loader)[0]]
    assert loader._idle is not None
    pipe = loader._idle[0]
    runs.append(epoch(loader)[0])
    assert loader._idle[0] is pipe  # reused
    next(iter(loader))  # epoch 2, abandoned after one batch
    assert loader._idle is None
    runs.append(epoch(loader)[0])  # epoch 3 on a new pipeline
    for e, got in zip((0, 1, 3), runs):
        fresh = dali_loader(split, batch_size=8, img_size=8, seed=9)
        fresh.set_epoch(e)
        assert torch.equal(got, epoch(fresh)[0]), e
    assert not torch.equal(runs[0], runs[1])
    test = dali_loader(split, batch_size=8, img_size=8, train=False)
    assert decode_index(epoch(test)[0]) == decode_index(epoch(test)[0]) == list(range(50))


def test_augmentation_is_per_sample(digits):
    # draws depend on (seed, epoch, sample) only: batch size and thread count do not change the images
    x16 = epoch(dali_loader(digits.train, batch_size=16, img_size=16, seed=4, workers=1))[0]
    x32 = epoch(dali_loader(digits.train, batch_size=32, img_size=16, seed=4, workers=2))[0]
    assert torch.equal(x16[:len(x32)], x32)


def test_flip_and_crop_draws_statistics():
    seeds = np.arange(4000, dtype=np.uint64) * 0x9E37 + 1
    draws = crop_flip_draws(seeds, (0.3, 0.6), 0.25)
    a = CROP_ATTEMPTS
    assert draws.shape == (4000, 2 * a + 3)
    assert 0.3 <= draws[:, :a].min() and draws[:, :a].max() < 0.6
    assert 3 / 4 <= draws[:, a:2 * a].min() and draws[:, a:2 * a].max() <= 4 / 3
    assert abs(np.log(draws[:, a:2 * a]).mean()) < 0.01  # log-uniform, symmetric about ratio 1
    assert abs(draws[:, -1].mean() - 0.25) < 0.03 and set(np.unique(draws[:, -1])) == {0.0, 1.0}
    assert not np.array_equal(crop_flip_draws(seeds + np.uint64(1), (0.3, 0.6), 0.25), draws)


# ------------------------------------------------------------------------------------------------ RandAugment


def test_rand_augment_spec_and_magnitude_bins(digits):
    # the grammar is batch_augment's (shared with the gpu backend); dali quantises magnitudes to 0.1
    loader = dali_loader(digits.train, auto_augment="rand-n3-m12-mmax15-p0.7-mstd101")
    assert loader.augment == parse_rand_augment("rand-n3-m12-mmax15-p0.7-mstd101")
    assert dali_module._num_bins(loader.augment) == 151 and dali_module._num_bins(RandAugmentSpec()) == 101
    assert dali_loader(digits.train, auto_augment="rand-n0").augment is None  # no layers: nothing to do
    suite = dali_module._rand_augment_suite(parse_rand_augment("rand-inc1"))
    assert len(suite) == len(RAND_OPS) + 1  # timm's 15 ops and identity (a skipped layer)


@pytest.mark.parametrize("inc", [0, 1])
def test_rand_augment_ops_follow_timm(inc, monkeypatch):
    # every op at magnitude 9, both signs, against timm's AugmentOp (same fill, bilinear) on a gradient + noise image
    from nvidia.dali import fn, pipeline_def, types
    from timm.data import auto_augment as timm_aa

    size, fill = 24, 128
    rng = np.random.default_rng(inc)
    y, x = np.mgrid[:size, :size]
    image = np.stack([x * 9, y * 8, 255 - (x + y) * 4], -1) + rng.normal(0, 12, (size, size, 3))
    image = image.clip(0, 255).astype(np.uint8)
    spec = parse_rand_augment(f"rand-n1-m9-p1-inc{inc}")
    params = [np.array([[k // 2, 90, k % 2]], np.int32) for k in range(2 * len(RAND_OPS))]

    @pipeline_def(batch_size=len(params), num_threads=1, device_id=None, seed=0, enable_conditionals=True)
    def graph():
        images = fn.external_source(source=lambda: [image] * len(params), batch=True, layout="HWC",
                                    dtype=types.UINT8)
        p = fn.external_source(source=lambda: params, batch=True, dtype=types.INT32)
        return dali_module._rand_augment(images, p, suite, spec, size, fill)

    with dali_module.quiet_dali_aliases():
        suite = dali_module._rand_augment_suite(spec)
        pipe = graph()
        pipe.build()
    (out,) = pipe.run()
    hparams = dict(timm_aa._HPARAMS_DEFAULT, img_mean=(fill,) * 3, interpolation=Image.BILINEAR)
    for k, name in enumerate(spec.op_names):
        refs = []
        for negate in (False, True):
            monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
            op = timm_aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)
            refs.append(np.asarray(op(Image.fromarray(image)), dtype=np.float64))
        for sign in (0, 1):  # DALI's sign convention may mirror timm's: compare with the closer of the two
            got = np.asarray(out[2 * k + sign], dtype=np.float64)
            err = min((np.abs(got - ref) for ref in refs), key=np.mean)
            kind = name.replace("Increasing", "")
            if kind in ("Invert", "Posterize", "Solarize", "SolarizeAdd"):
                assert err.max() == 0, name
            elif kind in ("AutoContrast", "Color", "Contrast", "Brightness"):
                assert err.max() <= 2, name  # rounding
            elif kind == "Sharpness":
                assert err[1:-1, 1:-1].max() <= 1 and err.mean() < 2, name  # PIL keeps the 1 px border
            elif kind == "Equalize":
                assert err.mean() < 25, name  # OpenCV's lookup-table formula, not PIL's (documented)
            else:  # rotate, shear, translate: resampling and the fill edge may move by a pixel
                assert err.mean() < 2, (name, err.mean())


def test_rand_augment_draws_follow_the_config():
    seeds = np.arange(3000, dtype=np.uint64) + 5
    draws = rand_augment_draws(seeds, parse_rand_augment("rand-m9-mstd0.5-inc1"))
    assert draws.shape == (3000, 2, 3) and draws.dtype == np.int32
    op, bins, sign = draws[..., 0], draws[..., 1], draws[..., 2]
    skipped = op == len(RAND_OPS)
    assert abs(skipped.mean() - 0.5) < 0.03 and set(np.unique(op[~skipped])) == set(range(15))
    assert abs(bins.mean() / 10 - 9) < 0.05 and 0.4 < bins.std() / 10 < 0.6 and bins.max() <= 100
    assert set(np.unique(sign)) == {0, 1}
    fixed = rand_augment_draws(seeds, parse_rand_augment("rand-n1-m7-p1"))
    assert (fixed[..., 1] == 70).all() and (fixed[..., 0] < 15).all()


def test_rand_augment_runs_and_is_reproducible(digits):
    kw = dict(batch_size=32, img_size=16, seed=6, crop_scale=(1.0, 1.0), hflip=0.0)
    loader = dali_loader(digits.train, auto_augment="rand-m9-mstd0.5-inc1", **kw)
    loader.set_epoch(2)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    loader.set_epoch(2)
    assert torch.equal(next(iter(loader))[0], x)
    plain = dali_loader(digits.train, **kw)
    plain.set_epoch(2)
    p, py = next(iter(plain))
    assert torch.equal(py, y)
    changed = (x != p).flatten(1).any(dim=1).float().mean()
    assert 0.5 < changed < 1.0  # each of 2 ops applies with p = 0.5 (some ops leave an image as it is)


def test_rand_augment_ignored_for_eval_and_bad_strings_rejected(digits):
    dali_loader(digits.test, train=False, auto_augment="augmix-m5")  # eval ignores auto_augment, as torch does
    for bad in ("augmix-m5", "original", "rand-m9-x3", "rand-tweights"):
        with pytest.raises(UserError, match="support RandAugment only"):
            dali_loader(digits.train, auto_augment=bad)


# ---------------------------------------------------------------------------------------------------- errors


def test_corrupt_jpeg_is_a_user_error(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("train", "val"):
        for c in range(2):
            os.makedirs(tmp_path / sub / f"k{c}")
            for k in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / sub / f"k{c}" / f"{k}.jpg")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = tmp_path / "train" / "k1" / "bad.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    data = load_data(f"imagefolder:{tmp_path}")
    loader = dali_loader(data.train, batch_size=7, img_size=8)  # one batch: all 7 files
    with pytest.raises(UserError) as info:
        epoch(loader)
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad}") and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_dali_is_a_user_error(monkeypatch, digits):
    monkeypatch.setattr(dali_module, "dali_available", lambda: False)
    with pytest.raises(UserError, match=r"needs NVIDIA DALI: pip install 'patfast\[dali\]'"):
        dali_loader(digits.train)


def test_bad_options_are_user_errors(digits):
    for kw, match in ((dict(crop_scale=(0.5, 0.2)), "crop scale"), (dict(hflip=1.5), "hflip"),
                      (dict(crop_pct=0.0, train=False), "crop_pct"), (dict(device=torch.device("meta")), "CPU or")):
        with pytest.raises(UserError, match=match):
            dali_loader(digits.train, **kw)
