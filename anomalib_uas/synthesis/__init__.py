# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic training data: change pairs (prompt, query, change mask), their datamodule, Perlin-noise masks.

Example:
    >>> from anomalib_uas.synthesis import ChangePairDataset, PairSynthesisConfig, offline_source_images
    >>> config = PairSynthesisConfig(image_size=256)
    >>> dataset = ChangePairDataset(offline_source_images(), length=2048, seed=0, config=config)  # doctest: +SKIP
    >>> pair = dataset[0]  # doctest: +SKIP
"""

from anomalib_uas.synthesis.datamodule import ChangePairBatch, ChangePairDataModule, collate_change_pairs
from anomalib_uas.synthesis.pairs import (
    CHANGE_KINDS,
    OFFLINE_SOURCES,
    ChangePair,
    ChangePairDataset,
    PairSynthesisConfig,
    load_source_images,
    offline_source_images,
)
from anomalib_uas.synthesis.perlin import perlin_mask, perlin_noise

__all__ = [
    "CHANGE_KINDS",
    "OFFLINE_SOURCES",
    "ChangePair",
    "ChangePairBatch",
    "ChangePairDataModule",
    "ChangePairDataset",
    "PairSynthesisConfig",
    "collate_change_pairs",
    "load_source_images",
    "offline_source_images",
    "perlin_mask",
    "perlin_noise",
]
