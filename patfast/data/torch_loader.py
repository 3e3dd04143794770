"""The "torch" data backend: a plain `torch.utils.data.DataLoader` over the split with timm transforms on PIL images.

Order and sharding are ShardedSampler's (patfast/data/sampling.py). Every training sample's augmentation RNGs
(Python `random`, NumPy, torch CPU) are seeded from (seed, epoch, sample index), so results do not depend on the
number of workers, the batch size or the rank. Random erasing is per sample here (in the transform).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from patfast.data.datasets import Split
from patfast.data.sampling import EpochLoader, ShardedSampler, _mix
from patfast.errors import UserError


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
