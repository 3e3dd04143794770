"""What every loader backend (torch, gpu, dali) must guarantee, checked the same way for each.

- labels stay with their images through decode and augmentation (an ImageFolder of solid-colour classes);
- one epoch yields every sample once (minus drop_last), eval yields all in order; DDP shards cover the set once;
- the same samples in the same order per (seed, epoch) on every backend;
- for fixed crop parameters (whole-image crop, eval resize + centre crop) gpu and dali match torch within an
  interpolation tolerance.
The dali cases run where NVIDIA DALI is installed (CI installs it); the gpu backend runs here on CPU tensors.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from patfast.data import ArrayImages, DataSpec, ImageData, load_data, make_loader
from patfast.errors import UserError

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
BACKENDS = ["torch", "gpu", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="DALI not installed"))]
MEAN, STD = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)
LEVEL = 1 / 255 / 0.37596  # one uint8 level in normalised units (digits std)
# (mean, max) |backend - torch| in normalised units. gpu: PIL's filter exactly; whole-image crops equal up to
# float rounding, eval (resize of the whole image, then crop, composed into one resize) within one uint8 level.
TOLERANCE = {"gpu": {"crop": (1e-6, 1e-5), "eval": (0.05 * LEVEL, 1.01 * LEVEL)},
             "dali": {"crop": (0.5 * LEVEL, 3 * LEVEL), "eval": (0.5 * LEVEL, 3 * LEVEL)}}
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230)]


def index_data(n: int, size: int = 6) -> ImageData:
    """Image i is the constant colour (i % 256, i // 256, 7): its index survives any crop/resize/flip."""
    images = np.zeros((n, size, size, 3), np.uint8)
    idx = np.arange(n)
    images[..., 0] = (idx % 256)[:, None, None]
    images[..., 1] = (idx // 256)[:, None, None]
    images[..., 2] = 7
    split = ArrayImages(images, idx % 3, classes=["a", "b", "c"], mean=MEAN, std=STD, native_size=size,
                        name="index")
    return ImageData(DataSpec("digits"), split, split)


def decode_index(x: torch.Tensor) -> list[int]:
    """Inverse of index_data after normalisation: the mean pixel of each image back to its index."""
    pixels = x.float().mean(dim=(2, 3)) * torch.tensor(STD) * 255 + torch.tensor(MEAN) * 255
    return (pixels[:, 0].round() + 256 * pixels[:, 1].round()).long().tolist()


def epoch_indices(loader) -> list[int]:
    return [i for x, _ in loader for i in decode_index(x.cpu())]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """imagefolder whose class c is a solid colour COLOURS[c] (JPEG, varied sizes)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for sub in ("train", "val"):
        for c, colour in enumerate(COLOURS):
            os.makedirs(root / sub / f"class{c}")
            for k in range(4):
                h, w = (int(v) for v in rng.integers(20, 48, size=2))
                Image.new("RGB", (w, h), colour).save(root / sub / f"class{c}" / f"{k}.jpg", quality=95)
    return load_data(f"imagefolder:{root}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_stay_with_images(backend, colour_folder):
    loader = make_loader(colour_folder, "train", backend=backend, batch_size=4, img_size=24, train=True,
                         crop_scale=(0.08, 1.0), hflip=0.5, seed=3)
    mean, std = torch.tensor(colour_folder.mean), torch.tensor(colour_folder.std)
    colours = torch.tensor(COLOURS, dtype=torch.float32)
    seen = 0
    for epoch in range(2):
        for x, y in loader:
            rgb = x.float().mean(dim=(2, 3)) * std * 255 + mean * 255  # (B, 3) back on the 0-255 scale
            nearest = torch.cdist(rgb, colours).argmin(dim=1)
            assert nearest.tolist() == y.tolist(), f"epoch {epoch}: colours {rgb.round().tolist()} labels {y.tolist()}"
            assert torch.cdist(rgb, colours).min(dim=1).values.max() < 12  # JPEG error only
            seen += len(y)
    assert seen == 2 * (20 // 4) * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sample_once_per_epoch(backend):
    data = index_data(300)
    loader = make_loader(data, "train", backend=backend, batch_size=32, img_size=10, train=True, seed=1)
    assert len(loader) == 300 // 32
    for _ in range(2):
        got = epoch_indices(loader)
        assert len(got) == len(set(got)) == 32 * 9  # every sample at most once, 300 - 288 dropped
        assert set(got) <= set(range(300))
    test = make_loader(data, "test", backend=backend, batch_size=32, img_size=10, train=False)
    assert epoch_indices(test) == list(range(300))  # eval: all of them, in order, last partial batch kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_cover_the_set_once(backend):
    data = index_data(90)
    shards = []
    for rank in range(2):
        loader = make_loader(data, "train", backend=backend, batch_size=9, img_size=8, train=True, seed=5,
                             rank=rank, world_size=2)
        loader.set_epoch(4)
        shards.append(epoch_indices(loader))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(90))
    evals = [epoch_indices(make_loader(data, "test", backend=backend, batch_size=8, img_size=8, train=False,
                                       rank=rank, world_size=2)) for rank in range(2)]
    assert sorted(evals[0] + evals[1]) == list(range(90))


@pytest.mark.parametrize("backend", ["gpu", pytest.param("dali", marks=BACKENDS[2].marks)])
def test_same_order_as_torch(backend):
    data = index_data(70)
    orders = {}
    for b in ("torch", backend):
        loader = make_loader(data, "train", backend=b, batch_size=16, img_size=8, train=True, seed=11)
        loader.set_epoch(3)
        orders[b] = epoch_indices(loader)
    assert orders[backend] == orders["torch"]


@pytest.mark.parametrize("backend", ["gpu", pytest.param("dali", marks=BACKENDS[2].marks)])
def test_reproducible_and_epochs_differ(backend):
    data = load_data("digits")
    loader = make_loader(data, "train", backend=backend, batch_size=16, img_size=16, train=True, seed=2)
    loader.set_epoch(5)
    a = next(iter(loader))[0]
    loader.set_epoch(5)
    b = next(iter(loader))[0]
    c = next(iter(loader))[0]  # epoch 6
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _batches(data, backend, train, **kw):
    loader = make_loader(data, "train" if train else "test", backend=backend, batch_size=50, img_size=32,
                         train=train, **kw)
    loader.set_epoch(0)
    return torch.cat([x for x, _ in loader])


@pytest.mark.parametrize("backend", ["gpu", pytest.param("dali", marks=BACKENDS[2].marks)])
@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_whole_image_crop_matches_torch(backend, hflip):
    # crop scale (1, 1) on square images: every backend's random-resized-crop is the whole image (a ratio != 1
    # does not fit, and the fallback is the whole image), so the outputs must agree up to interpolation (bilinear
    # upsampling 8 -> 32 px). gpu reproduces PIL's filter and rounding: equal up to float rounding of the normalise.
    data = load_data("digits")
    ref = _batches(data, "torch", True, crop_scale=(1.0, 1.0), hflip=hflip, seed=4)
    out = _batches(data, backend, True, crop_scale=(1.0, 1.0), hflip=hflip, seed=4)
    assert out.shape == ref.shape
    err = (out - ref).abs()
    mean_tol, max_tol = TOLERANCE[backend]["crop"]
    assert err.mean() <= mean_tol and err.max() <= max_tol, (err.mean().item(), err.max().item())


@pytest.mark.parametrize("backend", ["gpu", pytest.param("dali", marks=BACKENDS[2].marks)])
def test_eval_matches_torch(backend):
    # eval: resize the shorter side to int(32 / 0.875) = 36, centre crop 32 (upsampling from 8 px)
    data = load_data("digits")
    ref = _batches(data, "torch", False)
    out = _batches(data, backend, False)
    err = (out - ref).abs()
    mean_tol, max_tol = TOLERANCE[backend]["eval"]
    assert err.mean() <= mean_tol and err.max() <= max_tol, (err.mean().item(), err.max().item())


@pytest.mark.parametrize("backend", ["gpu", pytest.param("dali", marks=BACKENDS[2].marks)])
def test_eval_folder_matches_torch(backend, colour_folder, tmp_path):
    # downsampling from real photos-like content: a gradient image folder, eval resize + centre crop to 16 px
    root = tmp_path / "grad"
    y, x = np.mgrid[0:40, 0:52]
    for c in range(2):
        os.makedirs(root / "val" / f"k{c}")
        os.makedirs(root / "train" / f"k{c}")
        img = np.stack([x * 4 + c * 10, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "val" / f"k{c}" / "0.png")
        Image.fromarray(img).save(root / "train" / f"k{c}" / "0.png")
    data = load_data(f"imagefolder:{root}")
    ref = torch.cat([x for x, _ in make_loader(data, "test", backend="torch", batch_size=2, img_size=16,
                                               train=False)])
    out = torch.cat([x for x, _ in make_loader(data, "test", backend=backend, batch_size=2, img_size=16,
                                               train=False)])
    err = (out - ref).abs()
    assert err.mean() < 0.05, err.mean().item()


def test_auto_is_torch_on_the_cpu():
    loader = make_loader(index_data(20), "train", backend="auto", batch_size=4, img_size=8, train=True)
    assert loader.backend == "torch"


@pytest.mark.parametrize("backend", ["gpu", pytest.param("dali", marks=BACKENDS[2].marks)])
def test_random_erasing_on_batches(backend):
    data = index_data(64, size=16)
    plain = _batches(data, backend, True, seed=0, crop_scale=(1.0, 1.0), hflip=0.0)
    erased = _batches(data, backend, True, seed=0, crop_scale=(1.0, 1.0), hflip=0.0, re_prob=1.0)
    changed = (plain != erased).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.9  # (one draw may not fit in 10 attempts: a few may stay untouched)
    assert torch.equal(erased, _batches(data, backend, True, seed=0, crop_scale=(1.0, 1.0), hflip=0.0, re_prob=1.0))


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="unknown data loader backend 'fast'"):
        make_loader(index_data(8), "train", backend="fast", batch_size=4, img_size=8, train=True)


def test_gpu_backend_refuses_a_split_over_its_memory_budget(monkeypatch):
    import patfast.data.gpu as gpu

    monkeypatch.setattr(gpu, "memory_budget", lambda device: 100)
    with pytest.raises(UserError, match="memory budget"):
        make_loader(index_data(8), "train", backend="gpu", batch_size=4, img_size=8, train=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("re_prob", [0.0, 0.5])
def test_resuming_mid_epoch_continues_exactly(backend, re_prob):
    # set_epoch(e, skip_batches=k): the batches an uninterrupted epoch yields from batch k on, bit for bit
    data = index_data(100, size=12)
    kw = dict(backend=backend, batch_size=8, img_size=16, train=True, seed=7, re_prob=re_prob)
    full = make_loader(data, "train", **kw)
    full.set_epoch(3)
    whole = list(full)
    resumed = make_loader(data, "train", **kw)
    resumed.set_epoch(3, skip_batches=5)
    rest = list(resumed)
    assert len(whole) == 12 and len(rest) == 7
    for (xa, ya), (xb, yb) in zip(whole[5:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(list(resumed)) == 12  # the skip applies to one iteration only
