"""Deterministic, resumable data order for training.

Exact resume comes from one rule: nothing random depends on hidden state. The data order is a
seeded permutation per epoch plus a position counter (:class:`DataPosition`, saved in every
checkpoint); DataLoader workers are seeded from (seed, epoch, rank, worker).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (same inputs, same seed, on every machine)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclasses.dataclass
class DataPosition:
    """Where the data stream stands: ``position`` global batches into ``epoch``."""

    epoch: int = 0
    position: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        self.position += 1
        if self.position >= batches_per_epoch:
            self.epoch += 1
            self.position = 0


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless stream of this rank's index lists; a seeded permutation per epoch, drop-last.

    Global batch ``g`` of an epoch is ``perm[g * B * W : (g + 1) * B * W]`` and rank ``r`` takes
    its ``r``-th block of ``B``, so W processes of B see exactly what one process of W * B sees.
    Starting at (epoch, position) continues a stopped run mid-epoch.

    ``weights`` (one per sample, e.g. `task_balance_weights`) replaces the permutation by a seeded
    weighted draw of the same size with replacement: every epoch is as long, and a sample's chance
    is proportional to its weight.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int,
                 start: DataPosition | None = None, weights: torch.Tensor | None = None) -> None:
        self.n = int(num_samples)
        if weights is not None and (weights.shape != (self.n,) or not bool((weights >= 0).all())
                                    or float(weights.sum()) <= 0):
            raise ValueError(f"sampler weights: expected {self.n} non-negative values with a positive sum, "
                             f"got shape {tuple(weights.shape)}")
        self.weights = weights.double() if weights is not None else None
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.start = dataclasses.replace(start) if start else DataPosition()
        self.global_batch = self.batch_size * self.world_size
        self.batches_per_epoch = self.n // self.global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(f"global batch {self.global_batch} is larger than the dataset ({self.n} windows)")

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5A3D, epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g)  # (N,)
        return torch.randperm(self.n, generator=g)  # (N,)

    def __iter__(self) -> Iterator[list[int]]:
        pos = dataclasses.replace(self.start)
        epoch, perm = -1, None
        while True:
            if pos.epoch != epoch:
                epoch, perm = pos.epoch, self.permutation(pos.epoch)
            lo = pos.position * self.global_batch + self.rank * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()
            pos.advance(self.batches_per_epoch)

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its own bookkeeping
        return sys.maxsize


BALANCE_MODES = ("none", "task", "subtask")


def sample_weights(dcfg, dataset) -> torch.Tensor | None:
    """``dataset.balance``: "none" samples every window alike; "task" gives every task the same share of
    draws; "subtask" gives every (task, stage) pair the same share, where a stage is the index of the
    subtask within its episode (pick-place: 2 stages, pick-place-two: 4, so the second pick and place of
    the longer family get as many draws as the first)."""
    mode = str(dcfg.get("balance") or "none")
    if mode not in BALANCE_MODES:
        raise ValueError(f"dataset.balance: expected one of {list(BALANCE_MODES)}, got {mode!r}")
    if mode == "task":
        return task_balance_weights(dataset.sample_tasks)
    if mode == "subtask":
        return task_balance_weights(dataset.sample_tasks, dataset.sample_stages)
    return None


def task_balance_weights(sample_tasks: list[str], sample_stages=None) -> torch.Tensor:
    """Per-sample weights that give every task (or, with ``sample_stages``, every (task, stage) pair) the
    same share of draws: 1 / (samples of its group)."""
    keys = list(sample_tasks) if sample_stages is None else list(zip(sample_tasks, map(int, sample_stages),
                                                                     strict=True))
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.float64)  # (N,)


def worker_init(seed: int, epoch: int, rank: int):
    def init(worker_id: int) -> None:
        s = mix_seed(seed, epoch, rank, worker_id)
        random.seed(s)
        np.random.seed(s % (2**32))
        torch.manual_seed(s)

    return init
