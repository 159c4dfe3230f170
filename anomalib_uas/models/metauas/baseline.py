# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""A training-free one-shot baseline for MetaUAS: distance to the nearest prompt patch in encoder features.

Each query position at strides 8 and 16 is scored by ``1 - max cosine similarity`` to all positions of the prompt
images in the same encoder's features; the level maps are upsampled bilinearly to the input size and averaged. The
image score is the map's maximum. Meta-training MetaUAS has to beat this to be worth its decoder.

Example:
    >>> import torch
    >>> from anomalib_uas.models.metauas.baseline import PromptDistanceModel
    >>> from anomalib_uas.models.components.backbones import build_encoder
    >>> model = PromptDistanceModel(build_encoder("efficientnet_lite0"))
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
    """Nearest-prompt-patch cosine distance.

    Args:
        encoder: A five-level encoder (see :func:`~anomalib_uas.models.components.backbones.build_encoder`).
        levels: Encoder levels used (2 = stride 8, 3 = stride 16).
    """

    def __init__(self, encoder: nn.Module, levels: Sequence[int] = (2, 3)) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.levels = tuple(levels)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> InferenceBatch:
        """Score queries against prompts shared by the whole batch.

        Args:
            images: Normalised queries ``[B, 3, H, W]``.
            prompts: Normalised prompts ``[k, 3, H, W]``.

        Returns:
            ``anomaly_map`` ``[B, H, W]`` in ``[0, 2]`` and ``pred_score`` ``[B]``.
        """
        query_levels = self.encoder(images)
        prompt_levels = self.encoder(prompts)
        maps = []
        for level in self.levels:
            query = F.normalize(query_levels[level], dim=1)
            prompt = F.normalize(prompt_levels[level], dim=1)
            bank = prompt.permute(1, 0, 2, 3).flatten(1)  # [C, k*h*w]
            similarity = torch.einsum("bchw,cn->bhwn", query, bank).amax(dim=-1)
            distance = (1.0 - similarity).unsqueeze(1)
            maps.append(F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False))
        anomaly_map = torch.stack(maps).mean(dim=0).squeeze(1)
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
