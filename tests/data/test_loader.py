"""make_loader (torch backend), transforms and the batch mixup wrapper."""

import random

import numpy as np
import pytest
import torch

from patfast.data import ArrayImages, DataSpec, ImageData, build_transform, load_data, make_loader, make_mixup
from patfast.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def constant_data(values=(10, 128, 250), n=10, size=8):
    """An ImageData whose every image is the constant RGB `values`."""
    images = np.empty((n, size, size, 3), np.uint8)
    images[:] = np.array(values, np.uint8)
    split = ArrayImages(images, np.arange(n) % 2, classes=["a", "b"], mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
                        native_size=size, name="constant")
    return ImageData(DataSpec("digits"), split, split)


def collect(loader, batches=None):
    xs, ys = [], []
    for k, (x, y) in enumerate(loader):
        if batches is not None and k == batches:
            break
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------------- batches, shapes


def test_train_batches(digits):
    loader = make_loader(digits, "train", batch_size=64, img_size=16, train=True)
    assert len(loader) == 1437 // 64 and loader.drop_last and loader.batch_size == 64
    assert loader.num_classes == 10 and loader.dataset is digits.train
    assert loader.mean == digits.mean and loader.std == digits.std
    sizes = []
    for x, y in loader:
        assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (64,) and y.dtype == torch.int64
        sizes.append(len(x))
    assert sizes == [64] * 22


def test_eval_batches_keep_last_partial_in_order(digits):
    loader = make_loader(digits, "test", batch_size=64, img_size=12, train=False)
    assert len(loader) == 6 and not loader.drop_last
    x, y = collect(loader)
    assert x.shape == (360, 3, 12, 12)
    assert y.tolist() == digits.test.labels.tolist()  # no shuffle
    x2, _ = collect(loader)
    assert torch.equal(x, x2)  # eval transforms are deterministic


def test_spec_string_and_val_alias():
    loader = make_loader("digits", "val", batch_size=100, img_size=8, train=False)
    assert len(loader.dataset) == 360 and [len(y) for _, y in loader] == [100, 100, 100, 60]


def test_eval_normalisation_of_constant_image():
    data = constant_data()
    loader = make_loader(data, "test", batch_size=4, img_size=6, train=False)
    x, _ = next(iter(loader))
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(data.mean)) / torch.tensor(data.std)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_eval_transform_resizes_then_centre_crops():
    tf = build_transform(False, 32, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)
    resize, crop = tf.transforms[0], tf.transforms[1]
    assert resize.size == 36 and crop.size == (32, 32)  # int(32 / 0.875) = 36
    tf = build_transform(True, 224, (0.5,) * 3, (0.5,) * 3, crop_scale=(0.5, 1.0))
    rrc = tf.transforms[0]
    assert rrc.size == (224, 224) and rrc.scale == (0.5, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert not any(type(t).__name__ == "ColorJitter" for t in tf.transforms)


# ------------------------------------------------------------------------------------- order, epochs, shards, seeds


def test_set_epoch_order_is_deterministic(digits):
    loader = make_loader(digits, "train", batch_size=256, img_size=8, train=True, seed=3)
    orders = {}
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.setdefault(epoch, []).append(loader.sampler.indices())
    assert orders[0][0] == orders[0][1] and orders[0][0] != orders[1][0]
    assert sorted(orders[0][0]) == list(range(1437))
    loader.set_epoch(1)
    x1, y1 = collect(loader, batches=2)
    loader.set_epoch(1)
    x2, y2 = collect(loader, batches=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert y1.tolist() == digits.train.labels[orders[1][0][:512]].tolist()
    other = make_loader(digits, "train", batch_size=256, img_size=8, train=True, seed=4)
    assert other.sampler.indices() != orders[0][0]


def test_epoch_advances_without_set_epoch(digits):
    loader = make_loader(digits, "train", batch_size=512, img_size=8, train=True)
    _, y0 = collect(loader)
    _, y1 = collect(loader)
    assert loader.epoch == 2 and not torch.equal(y0, y1)
    loader.set_epoch(0)
    _, again = collect(loader)
    assert torch.equal(again, y0)


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_are_disjoint_and_cover(digits, train):
    split = "train" if train else "test"
    n = len(digits.split(split))
    loaders = [make_loader(digits, split, batch_size=32, img_size=8, train=train, rank=r, world_size=2, seed=1)
               for r in range(2)]
    for loader in loaders:
        loader.set_epoch(5)
    shards = [set(loader.sampler.indices()) for loader in loaders]
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == (n - n % 2 if train else n)
    if train:
        assert len(loaders[0]) == len(loaders[1]) == (n // 2) // 32
        single = make_loader(digits, split, batch_size=32, img_size=8, train=True, seed=1)
        single.set_epoch(5)
        assert shards[0] | shards[1] <= set(single.sampler.indices())


def test_augmentation_reproducible_and_independent_of_workers(digits):
    def first_batches(seed, workers, **kw):
        loader = make_loader(digits, "train", batch_size=32, img_size=16, train=True, seed=seed, workers=workers,
                             **kw)
        loader.set_epoch(2)
        return collect(loader, batches=2)

    kw = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    x0, y0 = first_batches(7, 0, **kw)
    x1, y1 = first_batches(7, 0, **kw)
    x2, y2 = first_batches(7, 2, **kw)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x3, _ = first_batches(8, 0, **kw)
    assert not torch.equal(x0, x3)


def test_same_image_differs_between_epochs():
    data = constant_data(values=(0, 0, 0), n=4)
    data.train.images[:, :4] = 255  # top half white: crops and flips now change pixels
    loader = make_loader(data, "train", batch_size=4, img_size=8, train=True)
    loader.set_epoch(0)
    x0, y0 = collect(loader)
    loader.set_epoch(1)
    x1, y1 = collect(loader)
    assert not torch.equal(x0[y0.argsort(stable=True)], x1[y1.argsort(stable=True)])


def test_training_leaves_global_rngs_alone(digits):
    loader = make_loader(digits, "train", batch_size=256, img_size=8, train=True, re_prob=0.5)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    collect(loader, batches=1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ------------------------------------------------------------------------------------------------------------ mixup


def test_mixup_soft_targets(digits):
    mix = make_mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10, seed=0)
    loader = make_loader(digits, "train", batch_size=16, img_size=8, train=True)
    x, y = next(iter(loader))
    original = x.clone()
    mixed, targets = mix(x, y)
    assert mixed.shape == (16, 3, 8, 8) and targets.shape == (16, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert (targets >= 0).all() and not torch.equal(mixed, original)
    again, targets2 = make_mixup(0.8, 1.0, 0.1, 10, seed=0)(original.clone(), y)
    assert torch.equal(again, mixed) and torch.equal(targets2, targets)
    with pytest.raises(UserError, match="even batch size, got a batch of 3"):
        mix(original[:3], y[:3])


def test_mixup_disabled():
    assert make_mixup(0.0, 0.0, label_smoothing=0.1, num_classes=10) is None
    with pytest.raises(UserError, match="mixup alpha must be >= 0"):
        make_mixup(-1.0, 0.0, num_classes=10)


# ------------------------------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="ffcv"), "unknown data loader backend 'ffcv'; choose auto, torch, gpu, dali"),
        (dict(batch_size=0), "batch size must be an integer >= 1, got 0"),
        (dict(img_size=0), "image size must be an integer >= 1, got 0"),
        (dict(img_size=-3), "image size must be an integer >= 1, got -3"),
        (dict(batch_size=2000), "batch size 2000 is larger than the 1437 images of digits/train"),
        (dict(batch_size=719, world_size=2), r"\(718 per rank over 2 ranks\)"),
        (dict(rank=2, world_size=2), "rank 2 is out of range for world size 2"),
        (dict(workers=-1), "number of data workers must be an integer >= 0"),
        (dict(auto_augment="rand-q9"), "bad auto-augment 'rand-q9'"),
        (dict(crop_scale=(0.5, 0.1)), r"crop scale must satisfy 0 < min <= max <= 1, got \(0.5, 0.1\)"),
        (dict(hflip=1.5), r"hflip is a probability in \[0, 1\], got 1.5"),
        (dict(split="holdout"), "unknown split 'holdout'"),
    ],
)
def test_user_errors(digits, kwargs, message):
    args = dict(split="train", batch_size=8, img_size=8, train=True) | kwargs
    split = args.pop("split")
    with pytest.raises(UserError, match=message):
        make_loader(digits, split, **args)


def test_eval_crop_pct_checked(digits):
    with pytest.raises(UserError, match=r"crop_pct must be in \(0, 1\], got 0"):
        make_loader(digits, "test", batch_size=8, img_size=8, train=False, crop_pct=0)


def test_eval_batch_larger_than_split_is_fine(digits):
    loader = make_loader(digits, "test", batch_size=2000, img_size=8, train=False)
    assert len(loader) == 1 and next(iter(loader))[0].shape[0] == 360


def test_worker_error_is_one_line(folder_dir):
    (folder_dir / "val" / "dog" / "0.png").write_bytes(b"not a png")
    loader = make_loader(f"imagefolder:{folder_dir}", "val", batch_size=2, img_size=8, train=False, workers=1)
    with pytest.raises(UserError) as info:
        collect(loader)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot decode image ") and "dog/0.png" in message


def test_rand_augment_posterize_to_zero_bits_does_not_raise():
    # rand-m10-...-inc1 draws PosterizeIncreasing at 0 bits; Pillow 13 raises for that, patfast maps it to black.
    data = constant_data(n=64)
    loader = make_loader(data, "train", batch_size=64, img_size=8, train=True, auto_augment="rand-m10-n3-p1.0-inc1")
    for _ in range(3):
        x, _ = next(iter(loader))
        assert torch.isfinite(x).all()
