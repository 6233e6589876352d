"""Samplers whose position can be saved and restored, for exact resumption of an interrupted epoch."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler", "ShardSampler"]


class ResumableDistributedSampler(Sampler[int]):
    """Shuffled sharding of a dataset over ``num_replicas`` processes, resumable mid-epoch.

    Like ``torch.utils.data.DistributedSampler`` (a permutation seeded by ``seed + epoch``, padded
    to a multiple of ``num_replicas``, rank ``r`` takes every ``num_replicas``-th index from ``r``),
    plus a position: :meth:`set_position` ``(epoch, start)`` makes the next iteration skip the first
    ``start`` indices of this rank's share of ``epoch``. ``drop_last`` drops the tail instead of
    padding. With ``num_replicas=1`` it is a seeded, resumable random sampler.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        if dataset_len < num_replicas:
            raise ValueError(f"dataset of {dataset_len} samples is smaller than the {num_replicas} processes")
        self.dataset_len = int(dataset_len)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if drop_last:
            self.num_samples = self.dataset_len // self.num_replicas
        else:
            self.num_samples = math.ceil(self.dataset_len / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full share of ``epoch`` (ignoring the start position)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.drop_last:
            order = order[:self.total_size]
        else:
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / len(order)))[:pad] if pad > 0 else []
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "num_replicas": self.num_replicas}


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` takes indices ``r, r + n, ...`` in order, without padding (exact distributed eval)."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))
