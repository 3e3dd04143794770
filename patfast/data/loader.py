"""`make_loader`: batches of normalised images for one split, from a chosen backend: torch, gpu or dali.

Backends: "torch" (below), "gpu" (patfast/data/gpu.py: the split resident on the device, batched augmentation),
"dali" (patfast/data/dali.py: NVIDIA DALI pipelines, CPU-only without CUDA). "auto" picks dali when DALI is installed
and the device is CUDA, else gpu on CUDA for in-memory data sets, else torch. All backends share the sample order
below; random erasing is per sample in the torch backend and on the batch tensors for gpu and dali (BatchErasing).

The "torch" backend is a plain `torch.utils.data.DataLoader` over the split with timm transforms on PIL images.
Order and augmentation are deterministic functions of (seed, epoch):
- the shuffle permutation comes from a generator seeded with (seed, epoch), then is sharded over ranks
  (DistributedSampler-like: rank r takes positions r, r + world_size, ...);
- every training sample's augmentation RNGs (Python `random`, NumPy, torch CPU) are seeded from
  (seed, epoch, sample index), so results do not depend on the number of workers, the batch size or the rank.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from patfast.data.datasets import DataSpec, FolderImages, ImageData, Split, load_data
from patfast.data.transforms import build_transform
from patfast.errors import UserError

BACKENDS = ("torch", "gpu", "dali")
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


class ShardedSampler(Sampler):
    """Indices of one rank's shard for the current epoch; yields (index, sample_seed) pairs.

    shuffle: permutation from (seed, epoch), cut to a multiple of world_size so every rank has the same count.
    no shuffle: 0..N-1 in order, rank r takes r, r + world_size, ... (shards may differ in size by one).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0
        self._skip = 0  # samples to leave out at the start of the next indices() call (resuming mid-epoch)
        self.skipped = 0  # what the last indices() call left out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, samples: int) -> None:
        """Make the next indices() call start `samples` into the epoch's order (once; len() stays the epoch's)."""
        self._skip = int(samples)

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order (minus a pending skip_next)."""
        skip, self._skip = self._skip, 0
        self.skipped = skip
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world_size))[skip:]
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0x5EED))
        order = torch.randperm(self.n, generator=g)
        order = order[: self.n - self.n % self.world_size]
        return order[self.rank :: self.world_size].tolist()[skip:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        keys = [(i, _mix(self.seed, self.epoch, i)) for i in self.indices()]  # now: consumes a pending skip
        return iter(keys)

    def __len__(self) -> int:
        if self.shuffle:
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))


class TransformedSplit(Dataset):
    """A split with a transform: key (index, sample_seed) -> ((3, S, S) float tensor, int label).

    With `seeded`, the augmentation RNGs are seeded from sample_seed before each sample; in the main process
    (workers=0) their previous states are restored after each batch, so the caller's RNG streams are untouched.
    """

    def __init__(self, split: Split, transform: Callable, seeded: bool):
        self.split, self.transform, self.seeded = split, transform, seeded

    def __len__(self) -> int:
        return len(self.split)

    def _one(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, sample_seed = key
        if self.seeded:
            random.seed(sample_seed)
            np.random.seed(sample_seed & 0xFFFFFFFF)
            torch.random.default_generator.manual_seed(sample_seed)
        image, label = self.split.get(i)
        return self.transform(image), label

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        if not self.seeded or get_worker_info() is not None:
            return [self._one(k) for k in keys]
        saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
        try:
            return [self._one(k) for k in keys]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.default_generator.set_state(saved[2])


def _seed_worker(worker_id: int) -> None:
    # Global RNGs of a worker start from (seed, epoch, worker id) of the epoch the workers were started in.
    info = get_worker_info()
    seed, epoch = info.dataset.worker_seed
    s = _mix(seed, epoch, worker_id, 0x3017)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.manual_seed(s)


class EpochLoader:
    """What every backend shares: the epoch counter over a ShardedSampler, set_epoch (with a mid-epoch start) and
    the number of batches. Subclasses set `sampler`, `batch_size`, `drop_last` and `_next_epoch = 0`."""

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._next_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration epoch `epoch`: its order and augmentation depend only on (seed, epoch).

        skip_batches: the next iteration starts after that many batches of the epoch (resuming mid-epoch; the rest
        of the epoch is exactly what an uninterrupted iteration would have given). Without a call, each full or
        partial iteration advances the epoch by one (starting at 0).
        """
        self._next_epoch = int(epoch)
        self.sampler.set_epoch(self._next_epoch)
        self.sampler.skip_next(skip_batches * self.batch_size)

    def batches(self, samples: int) -> int:
        """Batches that `samples` samples make (the last partial one dropped when drop_last)."""
        return samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)

    def __len__(self) -> int:
        return self.batches(len(self.sampler))


class TorchLoader(EpochLoader):
    """Iterable of (images (B, 3, S, S) float32 normalised, labels (B,) int64), both on `device`."""

    backend = "torch"

    def __init__(self, split: Split, *, transform: Callable, batch_size: int, train: bool, device: torch.device,
                 seed: int, workers: int, rank: int, world_size: int):
        self.dataset = split
        self.mean, self.std = split.mean, split.std
        self.num_classes = split.num_classes
        self.batch_size, self.drop_last, self.train = batch_size, train, train
        self.device = device
        self.seed = seed
        self.sampler = ShardedSampler(len(split), shuffle=train, seed=seed, rank=rank, world_size=world_size)
        self._next_epoch = 0
        self._data = TransformedSplit(split, transform, seeded=train)
        self._data.worker_seed = (seed, 0)
        g = torch.Generator().manual_seed(_mix(seed, 0x10AD))
        self._loader = DataLoader(self._data, batch_size=batch_size, sampler=self.sampler, drop_last=self.drop_last,
                                  num_workers=workers, worker_init_fn=_seed_worker if workers else None,
                                  persistent_workers=workers > 0, pin_memory=device.type == "cuda", generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self.sampler.set_epoch(epoch)
        self._data.worker_seed = (self.seed, epoch)
        device, non_blocking = self.device, self.device.type == "cuda"
        try:
            for images, labels in self._loader:
                yield images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking)
        except UserError as e:  # raised in a worker: keep the one-line message, drop the worker traceback
            raise UserError(_worker_message(str(e))) from None

    def __repr__(self) -> str:
        return (f"TorchLoader({self.dataset.name}, batch_size={self.batch_size}, batches={len(self)}, "
                f"train={self.train}, device={self.device})")


def _worker_message(text: str) -> str:
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split("UserError: ", 1)[-1].strip()


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
