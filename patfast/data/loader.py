"""`make_loader`: batches of normalised images for one split, from a chosen backend: torch, gpu or dali.

Backends: "torch" (patfast/data/torch_loader.py: a DataLoader with timm transforms on PIL images), "gpu"
(patfast/data/gpu.py: the split resident on the device, batched augmentation), "dali" (patfast/data/dali.py: NVIDIA
DALI pipelines, CPU-only without CUDA). "auto" picks dali when DALI is installed and the device is CUDA, else gpu on
CUDA for in-memory data sets, else torch. All backends share the sample order of patfast/data/sampling.py (a
deterministic function of (seed, epoch), sharded over ranks); random erasing is per sample in the torch backend and
on the batch tensors for gpu and dali (BatchErasing).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from patfast.data.datasets import DataSpec, FolderImages, ImageData, load_data
from patfast.data.sampling import ShardedSampler, _mix
from patfast.data.torch_loader import TorchLoader
from patfast.data.transforms import build_transform
from patfast.errors import UserError

BACKENDS = ("torch", "gpu", "dali")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchErasing:
    """A loader whose training batches get random erasing (timm "pixel" mode) on the batch tensors.

    Batch k of an epoch draws from a generator seeded from (seed, epoch, rank, k). Everything else is the wrapped
    loader's (attributes are passed through).
    """

    def __init__(self, loader, prob: float, rank: int):
        self.loader, self.prob, self.rank = loader, prob, rank
        self._skip = 0

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.loader.set_epoch(epoch, skip_batches)
        self._skip = skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from patfast.data.batch_augment import random_erase

        epoch, skip, self._skip = self.loader.epoch, self._skip, 0
        generator = torch.Generator(self.loader.device)
        for k, (images, labels) in enumerate(self.loader, start=skip):
            generator.manual_seed(_mix(self.loader.seed, epoch, self.rank, k, 0xE7A))  # batch k's own draws
            yield random_erase(images, self.prob, generator), labels

    def __repr__(self) -> str:
        return f"BatchErasing({self.loader!r}, prob={self.prob})"


def resolve_backend(backend: str, device: torch.device, in_memory: bool) -> str:
    """The backend "auto" stands for on `device` (dali if installed on CUDA, gpu on CUDA for in-memory data, torch)."""
    if backend not in ("auto", *BACKENDS):
        raise UserError(f"unknown data loader backend '{backend}'; choose auto, {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from patfast.data.dali import dali_available

        if dali_available():
            return "dali"
        if in_memory:
            return "gpu"
    return "torch"


def make_loader(data: str | DataSpec | ImageData, split: str, *, backend: str = "torch", batch_size: int,
                img_size: int, train: bool, device: str | torch.device = "cpu", seed: int = 0, workers: int = 0,
                crop_scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, auto_augment: str | None = None,
                re_prob: float = 0.0, crop_pct: float = 0.875, rank: int = 0, world_size: int = 1,
                progress: bool = True):
    """Batches of split `split` ("train", "test"; "val" = "test") of `data` (a spec string or a loaded ImageData).

    train=True: shuffled per epoch, drop_last, training transforms (RandomResizedCrop(img_size, crop_scale), hflip,
    auto_augment, random erasing re_prob). train=False: in order, last partial batch kept, eval transforms
    (resize to int(img_size / crop_pct), centre crop img_size). Each batch: images (B, 3, img_size, img_size)
    float32 normalised with the dataset's mean/std and labels (B,) int64, both on `device`. The result has
    .mean, .std, .num_classes, .dataset, .batch_size, .drop_last, .backend, len() (batches per epoch on this rank)
    and .set_epoch(epoch). rank/world_size shard the samples into disjoint parts. backend: "auto" | "torch" | "gpu" |
    "dali" (module docstring); `workers` are DataLoader processes (torch) or DALI threads (dali).
    """
    batch_size = _check_int("batch size", batch_size, 1)
    img_size = _check_int("image size", img_size, 1)
    workers = _check_int("number of data workers", workers, 0)
    world_size = _check_int("world size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    seed = _check_int("seed", seed, 0)
    if rank >= world_size:
        raise UserError(f"rank {rank} is out of range for world size {world_size}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"bad device '{device}': {e}") from None
    images = load_data(data).split(split)
    backend = resolve_backend(backend, device, in_memory=not isinstance(images, FolderImages))
    if not 0 <= re_prob <= 1:
        raise UserError(f"re_prob is a probability in [0, 1], got {re_prob}")
    per_rank = len(ShardedSampler(len(images), shuffle=train, seed=seed, rank=rank, world_size=world_size))
    if per_rank == 0:
        raise UserError(f"{images.name} has {len(images)} images: none left for rank {rank} of {world_size}")
    if train and per_rank < batch_size:
        shard = f" ({per_rank} per rank over {world_size} ranks)" if world_size > 1 else ""
        raise UserError(f"batch size {batch_size} is larger than the {len(images)} images of {images.name}"
                        f"{shard}: with drop_last an epoch would have no batches")
    augment = {"crop_scale": crop_scale, "hflip": hflip, "auto_augment": auto_augment or None, "crop_pct": crop_pct}
    common = {"batch_size": batch_size, "train": train, "device": device, "seed": seed, "rank": rank,
              "world_size": world_size}
    if backend == "torch":
        transform = build_transform(train, img_size, images.mean, images.std, re_prob=re_prob, **augment)
        loader = TorchLoader(images, transform=transform, workers=workers, **common)
    elif backend == "gpu":
        from patfast.data.gpu import GpuLoader

        loader = GpuLoader(images, img_size=img_size, progress=progress, **common, **augment)
    else:
        from patfast.data.dali import DaliLoader

        loader = DaliLoader(images, img_size=img_size, workers=workers, **common, **augment)
    if backend != "torch" and train and re_prob > 0:
        loader = BatchErasing(loader, re_prob, rank)
    return loader
