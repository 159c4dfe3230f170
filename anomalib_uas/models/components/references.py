# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Reference (prompt) images chosen reproducibly.

Few-shot and one-prompt models need normal reference images. They come from a datamodule's normal training
images (drawn with a seed, never from the shuffled train loader), from a folder, or from a list of files
(read with :func:`anomalib_uas.data.images.read_image`).

Example:
    >>> from anomalib_uas.models.components.references import seeded_choice
    >>> seeded_choice(10, 3, seed=0) == seeded_choice(10, 3, seed=0)
    True
"""

from __future__ import annotations

import torch

__all__ = ["seeded_choice"]


def seeded_choice(population: int, count: int, seed: int) -> list[int]:
    """Draw ``count`` distinct indices out of ``population`` reproducibly.

    Args:
        population: Number of candidates.
        count: Number of indices to draw.
        seed: Seed of the draw.

    Returns:
        Sorted indices.

    Raises:
        ValueError: When there are fewer candidates than requested.
    """
    if count > population:
        msg = f"Need {count} normal reference images but only {population} are available."
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(population, generator=generator)[:count].tolist())
