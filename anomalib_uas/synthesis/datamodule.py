# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""A datamodule of synthetic change pairs for MetaUAS meta-training.

Each training item is a (prompt, query, change mask) triple from
:class:`~anomalib_uas.synthesis.ChangePairDataset`. Batches are :class:`ChangePairBatch` objects whose ``image``
is the query and ``gt_mask`` the change mask, so anomalib's PreProcessor callback normalises the queries as
it does for any anomalib batch; the model normalises the prompts with the same transform.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_uas.synthesis import ChangePairDataModule
    >>> from anomalib_uas.models import MetaUAS
    >>> Engine(max_steps=100).fit(MetaUAS(meta_train=True), datamodule=ChangePairDataModule())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from anomalib_uas.synthesis.pairs import (
    ChangePair,
    ChangePairDataset,
    PairSynthesisConfig,
    load_source_images,
    offline_source_images,
)

__all__ = ["ChangePairBatch", "ChangePairDataModule", "collate_change_pairs"]


@dataclass
class ChangePairBatch:
    """A batch of change pairs.

    Attributes:
        image: Queries ``[B, 3, S, S]`` in ``[0, 1]`` (normalised by the PreProcessor callback during training).
        prompt: Prompts ``[B, 3, S, S]`` in ``[0, 1]``.
        gt_mask: Change masks ``[B, S, S]`` in ``{0, 1}``.
        kind: The kind of change of each pair.
    """

    image: torch.Tensor
    prompt: torch.Tensor
    gt_mask: torch.Tensor
    kind: list[str]


def collate_change_pairs(pairs: Sequence[ChangePair]) -> ChangePairBatch:
    """Stack change pairs into a batch.

    Args:
        pairs: Items of a :class:`~anomalib_uas.synthesis.ChangePairDataset`.

    Returns:
        The batch.
    """
    return ChangePairBatch(
        image=torch.stack([pair.query for pair in pairs]),
        prompt=torch.stack([pair.prompt for pair in pairs]),
        gt_mask=torch.stack([pair.mask for pair in pairs]),
        kind=[pair.kind for pair in pairs],
    )


class ChangePairDataModule(LightningDataModule):
    """Synthetic change pairs from image folders, or from the images that ship with installed packages.

    Args:
        sources: Image folders; ``None`` uses :func:`~anomalib_uas.synthesis.offline_source_images`.
        image_size: Side of the generated pairs.
        num_pairs: Pairs per epoch.
        batch_size: Training batch size.
        num_workers: Data-loading workers.
        seed: Seed of the pairs and of their order.
        config: Synthesis settings; ``image_size`` overrides its size.
    """

    def __init__(
        self,
        sources: Sequence[str | Path] | None = None,
        image_size: int = 256,
        num_pairs: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        config: PairSynthesisConfig | None = None,
    ) -> None:
        super().__init__()
        self.sources = [str(source) for source in sources] if sources is not None else None
        self.image_size = image_size
        self.num_pairs = num_pairs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.config = replace(config or PairSynthesisConfig(), image_size=image_size)
        self.train_data: ChangePairDataset | None = None

    @property
    def name(self) -> str:
        """Dataset name used in anomalib's results folders.

        Returns:
            ``"ChangePairs"``.
        """
        return "ChangePairs"

    @property
    def category(self) -> str:
        """Category used in anomalib's results folders.

        Returns:
            ``"offline"`` for the package images, else ``"folders"``.
        """
        return "offline" if self.sources is None else "folders"

    def setup(self, stage: str | None = None) -> None:
        """Load the source images and build the pair dataset.

        Args:
            stage: Lightning stage (unused).
        """
        del stage
        if self.train_data is None:
            images = offline_source_images() if self.sources is None else load_source_images(self.sources)
            self.train_data = ChangePairDataset(images, length=self.num_pairs, seed=self.seed, config=self.config)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training pairs.

        Returns:
            The loader.
        """
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_data,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=collate_change_pairs,
            persistent_workers=self.num_workers > 0,
        )
