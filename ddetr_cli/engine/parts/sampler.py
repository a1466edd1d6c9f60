"""Sample orders: training as a pure function of (seed, epoch)
(:class:`EpochSampler`), evaluation as a fixed split over processes
(:class:`ShardSampler`).

Every process draws the same permutation from ``seed + epoch``, pads it to a
multiple of the world size and takes its own stride, so a resumed run sees the
same batches as an uninterrupted one. ``skip_batches`` drops the batches an
interrupted epoch already trained on (mid-epoch resume).
"""

from __future__ import annotations

import math

import torch


class EpochSampler(torch.utils.data.Sampler[int]):
    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def batches_per_epoch(self) -> int:
        per = self.per_rank
        return per // self.batch_size if self.drop_last and per >= self.batch_size else math.ceil(per / self.batch_size)

    def _rank_indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]  # pad so every rank gets as many
        return order[self.rank : total : self.world_size]

    def __iter__(self):
        idx = self._rank_indices()
        usable = self.batches_per_epoch() * self.batch_size
        return iter(idx[self.skip_batches * self.batch_size : usable])

    def __len__(self) -> int:
        usable = self.batches_per_epoch() * self.batch_size
        return max(0, min(usable, self.per_rank) - self.skip_batches * self.batch_size)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation order: a deterministic, non-padding split of ``range(n)`` over
    processes (rank r takes r, r+W, ...), so no image is evaluated twice."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
