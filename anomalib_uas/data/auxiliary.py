# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Auxiliary training data: every image of several MVTec-layout categories, normal and anomalous.

Universal models (InCTRL, FAPrompt, MetaUAS fine-tuning) are trained on *auxiliary* categories that hold labelled
anomalies, then applied to unseen ones. anomalib's datamodules only put normal images in the train split, so this
module provides a datamodule whose train split holds all images (train/good and every test folder) of the given
categories with their labels and masks, optionally in exactly class-balanced batches. Validation and test
use the categories' test folders.

Example:
    >>> from anomalib_uas.data import AuxiliaryDataModule
    >>> datamodule = AuxiliaryDataModule("datasets/mvtec", categories=["bottle", "cable"])  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
    >>> datamodule.train_data.category_of(datamodule.train_data[0].image_path)  # doctest: +SKIP
    'bottle'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.mvtecad import IMG_EXTENSIONS, make_mvtec_ad_dataset
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform

from anomalib_uas.data.sampling import BalancedBatchSampler

__all__ = ["AuxiliaryDataModule", "AuxiliaryDataset"]


class AuxiliaryDataset(AnomalibDataset):
    """Images of several MVTec-layout categories with labels, masks and their category.

    Args:
        root: Dataset root holding one folder per category.
        categories: Categories to include.
        split: ``None`` for every image, ``"train"`` or ``"test"`` for one split.
        augmentations: Augmentations applied to each item.

    Raises:
        FileNotFoundError: A category folder does not exist.
        ValueError: No category given.
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str],
        split: str | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        if not categories:
            msg = "AuxiliaryDataset needs at least one category."
            raise ValueError(msg)
        frames = []
        for category in categories:
            folder = Path(root) / category
            if not folder.is_dir():
                msg = f"Category folder {folder} does not exist; categories are sub-folders of {root}."
                raise FileNotFoundError(msg)
            samples = make_mvtec_ad_dataset(folder, split=split, extensions=IMG_EXTENSIONS)
            frames.append(samples.assign(category=category))
        samples = pd.concat(frames, ignore_index=True)
        samples.attrs = frames[0].attrs
        self.samples = samples
        self._category_by_path = dict(zip(samples.image_path, samples.category, strict=True))

    def category_of(self, image_path: str) -> str:
        """Category of an image of this dataset.

        Args:
            image_path: ``image_path`` of an item or batch entry.

        Returns:
            The category name.
        """
        return self._category_by_path[str(image_path)]

    def normal_indices(self, category: str) -> list[int]:
        """Indices of the normal images of a category.

        Args:
            category: Category name.

        Returns:
            Sorted dataset indices.
        """
        mask = (self.samples.category == category) & (self.samples.label_index == 0)
        return self.samples.index[mask].tolist()


class AuxiliaryDataModule(AnomalibDataModule):
    """Train on all images of auxiliary categories; validate and test on their test folders.

    Args:
        root: Dataset root in MVTec AD layout.
        categories: Auxiliary categories.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Data-loading workers.
        balanced: Every training batch holds half normal, half anomalous images (seeded, see
            :class:`~anomalib_uas.data.sampling.BalancedBatchSampler`).
        train_augmentations: Augmentations of training images.
        val_augmentations: Augmentations of validation images.
        test_augmentations: Augmentations of test images.
        augmentations: Augmentations used where no stage-specific ones are given.
        seed: Seed of the balanced batches.
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str],
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        balanced: bool = True,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode="same_as_test",
            test_split_mode="from_dir",
            seed=seed,
        )
        self.root = Path(root)
        self.categories = list(categories)
        self.balanced = balanced
        self.category = "+".join(self.categories)

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = AuxiliaryDataset(self.root, self.categories, augmentations=self.train_augmentations)
        self.test_data = AuxiliaryDataset(
            self.root, self.categories, split="test", augmentations=self.test_augmentations
        )

    def train_dataloader(self) -> DataLoader:
        """Training loader, with exactly balanced batches when ``balanced`` is set.

        Returns:
            The loader.
        """
        if not self.balanced:
            return super().train_dataloader()
        labels = self.train_data.samples.label_index.tolist()
        sampler = BalancedBatchSampler(labels, batch_size=self.train_batch_size, seed=self.seed)
        return DataLoader(
            self.train_data, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=self.train_data.collate_fn
        )
