# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The nearest-patch network: the distance of each query patch to the closest patch of normal prompt images.

Patch features are the encoder levels of strides 8 and 16, each averaged over a 3x3 neighbourhood (the local
aggregation of PatchCore), the deeper level resized bilinearly onto the stride-8 grid, the two concatenated. The
prompts' patch features form a bank; every query patch is scored by its Euclidean distance to the nearest bank
entry. Nothing is trained: the encoder keeps its ImageNet weights.

Scores are relative distances ``d / (d + s)`` in ``[0, 1)``, where ``s`` is the mean norm of the prompts' patch
features: the order of the distances is kept (so are every ranking metric and every threshold's decision), the
scale no longer depends on the encoder's feature magnitude, and anomalib's metrics, which read values outside
``[0, 1]`` as logits, see the scores as they are. The map is resized bilinearly to the input size; the image score
is its largest patch value.

Distances are computed as ``|q|^2 - 2 q.b + |b|^2`` with one matrix product per image, which ONNX exports with a
dynamic batch; a query equal to a prompt scores about ``1e-3`` instead of 0 (float32 noise).

Example:
    >>> import torch
    >>> from anomalib_uas.models.nearest_patch.torch_model import NearestPatchModel
    >>> model = NearestPatchModel("efficientnet_lite0", pretrained=True)  # doctest: +SKIP
    >>> model.set_prompts(torch.zeros(1, 3, 64, 64))  # doctest: +SKIP
    >>> model(torch.zeros(2, 3, 64, 64)).anomaly_map.shape  # doctest: +SKIP
    torch.Size([2, 64, 64])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_uas.models.components.backbones import build_encoder

__all__ = ["NearestPatchModel"]


class NearestPatchModel(nn.Module):
    """Nearest-prompt-patch relative L2 distance on locally averaged multi-level encoder features.

    Args:
        backbone: timm name of a five-level encoder (:func:`~anomalib_uas.models.components.backbones.build_encoder`);
            ``efficientnet_lite{0,1,2}`` have offline ImageNet weights.
        pretrained: Load the encoder's ImageNet weights (a checkpoint loaded afterwards overwrites them).
        levels: Encoder levels used (2 = stride 8, 3 = stride 16); all are resized onto the first one's grid.
        pool: Side of the averaging window applied to each level.
    """

    def __init__(self, backbone: str, pretrained: bool = False, levels: Sequence[int] = (2, 3), pool: int = 3) -> None:
        super().__init__()
        if not levels or min(levels) < 0 or max(levels) > 4:
            msg = f"levels must name encoder levels 0-4 (2 = stride 8, 3 = stride 16), got {list(levels)}"
            raise ValueError(msg)
        if pool < 1 or pool % 2 == 0:
            msg = f"pool must be an odd window side (1, 3, 5, ...), got {pool}"
            raise ValueError(msg)
        self.encoder = build_encoder(backbone, pretrained=pretrained).eval().requires_grad_(False)
        self.levels = tuple(int(level) for level in levels)
        self.pool = pool
        self.register_buffer("prompt_bank", torch.empty(0))
        self.register_buffer("distance_scale", torch.ones(()))

    def train(self, mode: bool = True) -> NearestPatchModel:
        """Keep the frozen encoder in eval mode (its batch-norm statistics never change).

        Args:
            mode: Ignored for the encoder.

        Returns:
            The model.
        """
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def has_prompts(self) -> bool:
        """Whether the bank holds prompt patches.

        Returns:
            ``True`` once :meth:`set_prompts` ran (or a state dict with a bank was loaded).
        """
        return self.prompt_bank.numel() > 0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Locally averaged, concatenated patch features.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            ``[B, C, h, w]`` on the grid of the first level.
        """
        encoded = self.encoder(images)
        maps = [F.avg_pool2d(encoded[level], self.pool, stride=1, padding=self.pool // 2) for level in self.levels]
        size = maps[0].shape[-2:]
        resized = [F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in maps[1:]]
        return torch.cat([maps[0], *resized], dim=1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings: the spatial mean of the patch features.

        Args:
            images: Normalised images ``[N, 3, H, W]``.

        Returns:
            ``[N, C]`` embeddings.
        """
        return self.encode_images(images).mean(dim=(2, 3))

    @torch.no_grad()
    def set_prompts(self, images: torch.Tensor, batch_size: int = 16) -> None:
        """Encode normal prompt images once and keep all their patches as the bank.

        Args:
            images: Normalised prompt images ``[N, 3, H, W]``, of the size the queries will have.
            batch_size: Images encoded at a time.
        """
        chunks = [self.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        features = torch.cat(chunks)
        # Lightning tests under inference mode; a normal tensor keeps the bank usable by export.
        with torch.inference_mode(mode=False):
            self.prompt_bank = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).clone()
            self.distance_scale = self.prompt_bank.norm(dim=1).mean().clamp_min(1e-6).clone()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], *args: object, **kwargs: object) -> object:
        """Load weights, taking the prompt bank at the size it was saved with.

        Args:
            state_dict: Parameters and buffers.
            *args: Passed on.
            **kwargs: Passed on.

        Returns:
            The missing and unexpected keys.
        """
        if "prompt_bank" in state_dict:
            self.prompt_bank = torch.empty_like(state_dict["prompt_bank"])
        return super().load_state_dict(state_dict, *args, **kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score queries against the prompt bank.

        Args:
            images: Normalised queries ``[B, 3, H, W]``.

        Returns:
            ``anomaly_map`` ``[B, H, W]`` and ``pred_score`` ``[B]`` (its largest patch value): relative distances in
            ``[0, 1)``.

        Raises:
            RuntimeError: Without prompts.
        """
        if not self.has_prompts:
            msg = "the nearest-patch model has no prompt images: call set_prompts() first"
            raise RuntimeError(msg)
        query = self.encode_images(images)
        batch, _, height, width = query.shape
        patches = query.flatten(2).transpose(1, 2)  # [B, hw, C]
        bank = self.prompt_bank
        squared = (
            patches.pow(2).sum(-1, keepdim=True) - 2 * patches @ bank.T + bank.pow(2).sum(-1).unsqueeze(0).unsqueeze(0)
        )
        distance = squared.amin(dim=-1).clamp_min(0).sqrt().view(batch, 1, height, width)
        relative = distance / (distance + self.distance_scale)
        anomaly_map = F.interpolate(relative, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        return InferenceBatch(pred_score=relative.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
