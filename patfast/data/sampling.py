"""Sample order shared by every data backend: the seed hash, the per-rank shard of an epoch, the epoch counter.

Order is a deterministic function of (seed, epoch): the shuffle permutation comes from a generator seeded with
(seed, epoch), then is sharded over ranks (DistributedSampler-like: rank r takes positions r, r + world_size, ...).
Each sample's seed is `_mix(seed, epoch, sample index)`, so a sample's augmentation does not depend on the number of
workers, the batch size or the rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

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
