# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Exactly balanced training batches: half normal, half anomalous images in every batch.

The official training draws every batch with half normal and half outlier images (16 = 8 + 8). anomalib's
class-weighted ``WeightedRandomSampler`` balances only on average, so a batch can hold a single class, which
gives the heads' batch norm and the focal losses a different mix than the official training.
:class:`BalancedBatchSampler` is a seeded batch sampler for any dataset with binary labels.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from anomalib_uas.data.sampling import BalancedBatchSampler
    >>> sampler = BalancedBatchSampler([0, 0, 0, 1, 1], batch_size=4, seed=0)
    >>> [sorted(batch) for batch in sampler][0][-2:]  # two anomalous images (indices 3 and 4)
    [3, 4]
    >>> loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate_fn)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["BalancedBatchSampler"]


class _Stream:
    """An endless stream of indices: shuffled passes over a pool, reshuffled whenever a pass ends."""

    def __init__(self, pool: list[int], generator: torch.Generator) -> None:
        self.pool = pool
        self.generator = generator
        self.order: list[int] = []

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if not self.order:
                self.order = [self.pool[i] for i in torch.randperm(len(self.pool), generator=self.generator).tolist()]
            out.append(self.order.pop())
        return out


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // 2`` normal and ``batch_size - batch_size // 2`` anomalous indices.

    Each class is drawn in shuffled passes over its images, so every image is used before any repeats. Draws are
    seeded: the same seed gives the same batches, and every epoch continues the stream with new batches.

    Args:
        labels: Label per dataset index (0 normal, 1 anomalous).
        batch_size: Images per batch, at least 2.
        num_batches: Batches per epoch; by default enough to visit the dataset once, ``ceil(len / batch_size)``.
        seed: Seed of the draws.

    Raises:
        ValueError: For a batch size below 2 or labels without both classes.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if batch_size < 2:
            msg = f"A balanced batch needs at least 2 images (one of each class), got batch_size={batch_size}."
            raise ValueError(msg)
        labels = [int(label) for label in labels]
        normal = [i for i, label in enumerate(labels) if label == 0]
        anomalous = [i for i, label in enumerate(labels) if label != 0]
        if not normal or not anomalous:
            msg = (
                f"Balanced batches need normal and anomalous images; found {len(normal)} normal and "
                f"{len(anomalous)} anomalous."
            )
            raise ValueError(msg)
        self.batch_size = batch_size
        self.num_batches = num_batches if num_batches is not None else math.ceil(len(labels) / batch_size)
        generator = torch.Generator().manual_seed(seed)
        self._normal = _Stream(normal, generator)
        self._anomalous = _Stream(anomalous, generator)

    def __len__(self) -> int:
        """Batches per epoch.

        Returns:
            The number of batches.
        """
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the batches of one epoch.

        Yields:
            Dataset indices of one batch, normal ones first.
        """
        half = self.batch_size // 2
        for _ in range(self.num_batches):
            yield self._normal.take(half) + self._anomalous.take(self.batch_size - half)
