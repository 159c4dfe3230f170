# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""A training-free one-shot baseline for MetaUAS: L2 distance to the nearest prompt patch in encoder features.

The features of strides 8 and 16 are each 3x3 average-pooled (a local neighbourhood per position, as in PatchCore),
the stride-16 map is upsampled bilinearly to stride 8 and the two are concatenated. Each query position is scored
by the Euclidean distance to the nearest position of the prompt images; the map is upsampled bilinearly to the
input size and the image score is the maximum distance. Meta-training MetaUAS has to beat this to be worth its decoder.

Example:
    >>> import torch
    >>> from anomalib_uas.models.metauas.baseline import PromptDistanceModel
    >>> from anomalib_uas.models.components.backbones import build_encoder
    >>> model = PromptDistanceModel(build_encoder("efficientnet_lite0", pretrained=True))
    >>> model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)).anomaly_map.shape
    torch.Size([1, 64, 64])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

__all__ = ["PromptDistanceModel"]


class PromptDistanceModel(nn.Module):
    """Nearest-prompt-patch L2 distance on locally pooled multi-level features.

    Args:
        encoder: A five-level encoder (see :func:`~anomalib_uas.models.components.backbones.build_encoder`), with
            its ImageNet weights.
        levels: Encoder levels used (2 = stride 8, 3 = stride 16); all are resized to the first one's grid.
        pool: Side of the average-pooling window applied to each level.
        chunk: Query positions compared with the prompt bank at a time (bounds memory).
    """

    def __init__(self, encoder: nn.Module, levels: Sequence[int] = (2, 3), pool: int = 3, chunk: int = 4096) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.levels = tuple(levels)
        self.pool = pool
        self.chunk = chunk

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, concatenated patch features.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            ``[B, C, h, w]`` on the grid of the first level.
        """
        levels = self.encoder(images)
        maps = [F.avg_pool2d(levels[level], self.pool, stride=1, padding=self.pool // 2) for level in self.levels]
        size = maps[0].shape[-2:]
        return torch.cat(
            [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]], dim=1
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> InferenceBatch:
        """Score queries against prompts shared by the whole batch.

        Args:
            images: Normalised queries ``[B, 3, H, W]``.
            prompts: Normalised prompts ``[k, 3, H, W]``.

        Returns:
            ``anomaly_map`` ``[B, H, W]`` (feature distances) and ``pred_score`` ``[B]`` (the largest distance).
        """
        query = self.features(images)
        batch, channels, height, width = query.shape
        bank = self.features(prompts).permute(0, 2, 3, 1).reshape(-1, channels)
        positions = query.permute(0, 2, 3, 1).reshape(-1, channels)
        distances = torch.cat([torch.cdist(part, bank).amin(dim=1) for part in positions.split(self.chunk)])
        distance = distances.view(batch, 1, height, width)
        anomaly_map = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        return InferenceBatch(pred_score=distances.view(batch, -1).amax(dim=1), anomaly_map=anomaly_map)
