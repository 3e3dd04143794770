"""The "gpu" loader backend: the whole split resident on the device as uint8, augmented there in batches.

No CPU workers and no per-image Python: each batch is one gather from the resident tensor, one batched crop+resize
(+ flip), optional batched RandAugment, and a normalise. On the CPU the same code runs on CPU tensors (how it is
tested; also a fast path for small data sets on the CPU).

In-memory splits (digits, CIFAR) are copied as they are (CIFAR-100 train: 50,000 x 3 x 32 x 32 = 150 MB). An
ImageFolder is decoded once when the loader is built (a progress bar on a TTY) and kept as one (N, 3, Hmax, Wmax)
tensor, every image padded to the largest size by repeating its last row/column, so bilinear sampling at an image's
edge sees the edge pixel; each sample's crop box and resampling taps lie inside its own (height, width). The resize is
PIL's bilinear filter (batch_augment.resized_crop_flip), so for the same crop box the pixels equal the torch
backend's up to PIL's own rounding. A split too big for
the memory budget is refused with a UserError (use the torch or dali backend).

Order and sharding are those of the torch backend (ShardedSampler: same samples in the same order for a (seed,
epoch)). Batch k of an epoch draws its augmentation from a torch.Generator on the device seeded from (seed, epoch,
rank, k), per batch rather than per sample, so it is reproducible for a given (seed, epoch, batch size, world size)
(and a resumed epoch continues exactly) but differs from the torch backend's per-sample draws.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from patfast.data.batch_augment import (
    center_crop_boxes,
    parse_rand_augment,
    rand_augment,
    random_resized_crop_boxes,
    resized_crop_flip,
)
from patfast.data.datasets import ArrayImages, FolderImages, Split
from patfast.data.sampling import EpochLoader, ShardedSampler, _mix
from patfast.data.transforms import RATIO, check_augment_args
from patfast.errors import UserError

MEMORY_FRACTION = 0.5  # of the device's free memory (CUDA) or of the machine's RAM (CPU) a split may take


def memory_budget(device: torch.device) -> int:
    """Bytes a resident split may occupy on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_FRACTION)


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.height, img.width  # header only, no decode
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None


def resident_images(split: Split, device: torch.device, progress: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split on `device`: images uint8 (N, 3, Hmax, Wmax), heights (N,) and widths (N,) int64."""
    if isinstance(split, ArrayImages):
        n, h, w, _ = split.images.shape
        need = split.images.nbytes
        if need > memory_budget(device):
            raise UserError(f"{split.name}: {need / 2**30:.1f} GiB does not fit the gpu backend's memory budget; "
                            "use --data-backend torch or dali")
        images = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2).contiguous()
        return images, torch.full((n,), h, device=device), torch.full((n,), w, device=device)
    if not isinstance(split, FolderImages):
        raise TypeError(f"unsupported split type {type(split).__name__}")
    sizes = np.array([_image_size(path) for path, _ in split.samples], dtype=np.int64).reshape(-1, 2)
    hmax, wmax = (int(v) for v in sizes.max(axis=0))
    need = len(sizes) * 3 * hmax * wmax
    if need > memory_budget(device):
        raise UserError(f"{split.name}: {len(sizes)} images padded to {hmax}x{wmax} need {need / 2**30:.1f} GiB, "
                        "more than the gpu backend's memory budget; use --data-backend torch or dali")
    images = torch.empty((len(sizes), 3, hmax, wmax), dtype=torch.uint8, device=device)
    from tqdm import tqdm

    bar = tqdm(range(len(sizes)), desc=f"decode {split.name}", leave=False, dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    for i in bar:
        image, _ = split.get(i)  # UserError on a corrupt file
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        h, w = pixels.shape[1:]
        if (h, w) != tuple(sizes[i]):
            raise UserError(f"image {split.samples[i][0]} changed size while being read")
        # Pad by repeating the last row/column: sampling at the edge then sees the edge pixel (as PIL clamps).
        padded = torch.nn.functional.pad(pixels[None].float(), (0, wmax - w, 0, hmax - h), mode="replicate")
        images[i] = padded[0].to(torch.uint8).to(device)
    return images, torch.from_numpy(sizes[:, 0]).to(device), torch.from_numpy(sizes[:, 1]).to(device)


class GpuLoader(EpochLoader):
    """Iterable of (images (B, 3, S, S) float32 normalised, labels (B,) int64), both on `device`.

    train=True: random-resized-crop (area scale `crop_scale`, ratio 3/4..4/3), flip with probability `hflip`,
    RandAugment when `auto_augment` is a "rand-..." string, normalise; drop_last. train=False: resize the shorter
    side to int(img_size / crop_pct) and centre-crop img_size, as one crop+resize; last partial batch kept, in order.
    """

    backend = "gpu"

    def __init__(self, split: Split, *, batch_size: int, img_size: int, train: bool, device: torch.device, seed: int,
                 rank: int, world_size: int, crop_scale=(0.08, 1.0), hflip: float = 0.5,
                 auto_augment: str | None = None, crop_pct: float = 0.875, progress: bool = True):
        lo, hi = check_augment_args(crop_scale, hflip, crop_pct)
        self.augment = parse_rand_augment(auto_augment) if train and auto_augment else None
        self.dataset = split
        self.mean, self.std = split.mean, split.std
        self.num_classes = split.num_classes
        self.batch_size, self.drop_last, self.train = batch_size, train, train
        self.img_size, self.crop_scale, self.hflip, self.crop_pct = img_size, (lo, hi), hflip, crop_pct
        self.device, self.seed, self.rank = device, seed, rank
        self.sampler = ShardedSampler(len(split), shuffle=train, seed=seed, rank=rank, world_size=world_size)
        self._next_epoch = 0
        self.images, self.heights, self.widths = resident_images(split, device, progress)
        self.labels = torch.from_numpy(split.labels).to(device)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std as one multiply-add
        self._fill = tuple(round(255 * m) for m in self.mean)  # RandAugment's fill, as timm uses the data mean

    def batch(self, index: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `index` (B,) on the device, augmented with `generator` (train) -> (images, labels)."""
        heights, widths = self.heights[index], self.widths[index]
        if self.train:
            boxes = random_resized_crop_boxes(heights, widths, self.crop_scale, RATIO, generator)
            flips = torch.rand(len(index), generator=generator, device=self.device) < self.hflip
        else:
            boxes = center_crop_boxes(heights, widths, self.img_size, self.crop_pct)
            flips = torch.zeros(len(index), dtype=torch.bool, device=self.device)
        # eval reads the whole image (a resize of the whole image, then a crop); train crops, then resizes
        sizes = None if self.train else torch.stack([heights, widths], 1)
        x = resized_crop_flip(self.images, boxes, flips, self.img_size, index=index, image_sizes=sizes)  # 0..255
        if self.augment is not None:
            x = rand_augment(x.to(torch.uint8), self.augment, generator, self._fill).float()
        return x.mul_(self._scale).add_(self._shift), self.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self.sampler.set_epoch(epoch)
        order = torch.tensor(self.sampler.indices(), dtype=torch.int64).to(self.device, non_blocking=True)
        first = self.sampler.skipped // self.batch_size
        generator = torch.Generator(self.device) if self.train else None
        count = self.batches(len(order))
        for k in range(count):
            if generator is not None:  # batch k's own draws: a resumed epoch continues exactly
                generator.manual_seed(_mix(self.seed, epoch, self.rank, first + k, 0x6B0))
            yield self.batch(order[k * self.batch_size:(k + 1) * self.batch_size], generator)

    def __repr__(self) -> str:
        return (f"GpuLoader({self.dataset.name}, batch_size={self.batch_size}, batches={len(self)}, "
                f"train={self.train}, device={self.device}, resident={tuple(self.images.shape)})")
