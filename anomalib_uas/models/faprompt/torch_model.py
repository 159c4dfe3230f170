# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt in pure PyTorch: frozen CLIP with V-V attention, compound abnormality prompts and an abnormality prior.

The image goes through CLIP's vision transformer. In the last 19 blocks a second, value-value path runs next to
the original one (DPAM): both take ``ln_1`` of the original-path tokens, the V-V path computes
``softmax(v vᵀ / √d) v`` with the block's own weights and skips the MLP. The image feature is the original-path
CLS token times the projection (without ``ln_post``); the patch features are ``ln_post`` of the final V-V tokens
times the projection.

Two passes compare the normalised patch features with text features at temperature 0.07:

1. the *static* pass with the normal prompt and the mean of the ten abnormal prompts (cached once in eval mode);
2. the *prior* pass: ten patch tokens of the image (the top-10 of pass 1 with ``"topk"``, the first ten in raster
   order with ``"first"``, as the released weights were trained) feed the prior MLP, its output shifts the
   abnormal tokens, and only the ten abnormal prompts are re-encoded per image.

The anomaly map is the mean of the two passes' abnormal probabilities (upsampled bilinearly), smoothed by a
Gaussian (sigma = 10 at 518 px, scaled with the size). The image score is
``0.5 * (p_text + (2 * max1 + max2) / 3)`` with ``p_text`` the image-level abnormal probability of the prior
prompts and ``max1``, ``max2`` the patch maxima of both passes. Every image of a batch is processed on its own
terms, so a batch of N equals N runs of one (the official code only works at batch 1).

Example:
    >>> import torch
    >>> from anomalib_uas.models.faprompt.torch_model import FAPromptModel
    >>> model = FAPromptModel("uas-tiny-ViT-L-14-336", image_size=70).eval()
    >>> output = model(torch.zeros(2, 3, 70, 70))
    >>> output.anomaly_map.shape, output.pred_score.shape
    (torch.Size([2, 70, 70]), torch.Size([2]))

Paper:
    Jiawen Zhu, Yew-Soon Ong, Chunhua Shen, Guansong Pang, "Fine-grained Abnormality Prompt Learning for
    Zero-shot Anomaly Detection", ICCV 2025.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_uas.models.components.clip import load_clip
from anomalib_uas.models.faprompt.prompt_learner import (
    CompoundPromptLearner,
    encode_prompts,
    linear,
    mlp,
    multi_head_attention,
)

__all__ = [
    "DAP_PATCH_SELECTIONS",
    "FAPromptLoss",
    "FAPromptModel",
    "FAPromptOutput",
    "anomaly_maps_and_scores",
    "gaussian_blur",
]

DAP_PATCH_SELECTIONS = ("topk", "first")
DUAL_PATH_BLOCKS = 19
TEMPERATURE = 0.07
REFERENCE_SIZE = 518


class FAPromptOutput(NamedTuple):
    """What one FAPrompt pass produces before maps and scores.

    Attributes:
        static_probs: Pass-1 probabilities ``[B, P, 2]`` (normal, abnormal) per patch.
        prior_probs: Pass-2 probabilities ``[B, P, 2]``.
        text_logits: Image-level logits ``[B, 2]`` with the prior prompts (already divided by the temperature).
        static_abnormal_features: The K static abnormal prompt features ``[K, E]``, not normalised.
        prior: The abnormality prior ``[B, D]``.
        prior_indices: The patch indices ``[B, M]`` that fed the prior.
    """

    static_probs: torch.Tensor
    prior_probs: torch.Tensor
    text_logits: torch.Tensor
    static_abnormal_features: torch.Tensor
    prior: torch.Tensor
    prior_indices: torch.Tensor


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_index(size: int, radius: int) -> torch.Tensor:
    index = torch.arange(-radius, size + radius) % (2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def gaussian_blur(maps: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian filter with half-sample symmetric borders (``scipy.ndimage.gaussian_filter`` defaults).

    Args:
        maps: ``[B, H, W]``.
        sigma: Standard deviation along H and along W, in pixels; 0 leaves that axis unchanged.

    Returns:
        The filtered maps ``[B, H, W]``.
    """
    out = maps.unsqueeze(1)
    for axis, axis_sigma in ((2, sigma[0]), (3, sigma[1])):
        if axis_sigma <= 0:
            continue
        kernel = _gaussian_kernel(axis_sigma).to(device=maps.device, dtype=maps.dtype)
        index = _symmetric_index(out.shape[axis], kernel.numel() // 2).to(maps.device)
        shape = (1, 1, -1, 1) if axis == 2 else (1, 1, 1, -1)
        out = F.conv2d(out.index_select(axis, index), kernel.view(shape))
    return out.squeeze(1)


def _upsample(probs: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def anomaly_maps_and_scores(
    output: FAPromptOutput,
    grid: tuple[int, int],
    size: tuple[int, int],
    sigma: float,
) -> dict[str, torch.Tensor]:
    """The official maps and scores of one batch.

    Args:
        output: Result of :meth:`FAPromptModel.compute`.
        grid: Patch grid ``(h, w)``.
        size: Output size ``(H, W)``.
        sigma: Gaussian sigma at 518 px; scaled by ``H / 518`` and ``W / 518``.

    Returns:
        ``anomaly_map`` ``[B, H, W]``, ``anomaly_map_prefilter``, ``pred_score``, ``p_text``, ``max1``, ``max2``.
    """
    static = _upsample(output.static_probs, grid, size)
    prior = _upsample(output.prior_probs, grid, size)
    prefilter = (static[:, 1] + 1 - static[:, 0] + prior[:, 1] + 1 - prior[:, 0]) / 4.0
    anomaly_map = gaussian_blur(prefilter, (sigma * size[0] / REFERENCE_SIZE, sigma * size[1] / REFERENCE_SIZE))
    p_text = output.text_logits.softmax(dim=-1)[:, 1]
    max1 = output.static_probs[..., 1].amax(dim=1)
    max2 = output.prior_probs[..., 1].amax(dim=1)
    return {
        "anomaly_map": anomaly_map,
        "anomaly_map_prefilter": prefilter,
        "pred_score": 0.5 * (p_text + (2 * max1 + max2) / 3),
        "p_text": p_text,
        "max1": max1,
        "max2": max2,
    }


def _clear_cache_after_load(model: FAPromptModel, module: nn.Module, incompatible_keys: object) -> None:
    del module, incompatible_keys
    model.clear_text_cache()


def _refresh_after_clip_load(model: FAPromptModel, module: nn.Module, incompatible_keys: object) -> None:
    del module, incompatible_keys
    model.refresh_clip()


class FAPromptModel(nn.Module):
    """FAPrompt: frozen CLIP (V-V attention in the last 19 vision blocks) plus the learned prompt learner.

    Args:
        clip_model: open_clip model name; ``"ViT-L-14-336"`` is the official backbone, ``"uas-tiny-ViT-L-14-336"``
            a tiny random one for tests.
        clip_pretrained: open_clip pretrained tag (``"openai"``), or ``None``; ignored when ``clip_weights`` is given.
        clip_weights: Local file with the CLIP weights (open_clip / OpenAI key names, or the OpenAI archive).
        image_size: Square input size, a multiple of the patch size (518 officially).
        dap_patch_selection: ``"topk"`` (the paper: the ten most abnormal patches of pass 1) or ``"first"`` (the
            first ten patches in raster order, what the released weights were trained with).
        sigma: Gaussian sigma of the anomaly map at 518 px, scaled with the image size; 0 disables the filter.

    Raises:
        ValueError: For an unknown patch selection, a negative sigma, or an image size that is not a multiple of the
            patch size or gives fewer patches than the prior reads.
    """

    def __init__(
        self,
        clip_model: str = "ViT-L-14-336",
        clip_pretrained: str | None = None,
        clip_weights: str | Path | None = None,
        image_size: int = REFERENCE_SIZE,
        dap_patch_selection: str = "topk",
        sigma: float = 10.0,
    ) -> None:
        super().__init__()
        if dap_patch_selection not in DAP_PATCH_SELECTIONS:
            msg = f"dap_patch_selection must be one of {DAP_PATCH_SELECTIONS}, got {dap_patch_selection!r}."
            raise ValueError(msg)
        if sigma < 0:
            msg = f"sigma must be >= 0 (0 disables the Gaussian filter), got {sigma}."
            raise ValueError(msg)
        self.clip = load_clip(clip_model, pretrained=clip_pretrained, weights=clip_weights, force_quick_gelu=True)
        patch = self.clip.visual.patch_size[0]
        if image_size < patch or image_size % patch:
            msg = f"image_size must be a positive multiple of the CLIP patch size {patch}, got {image_size}; use 518."
            raise ValueError(msg)
        self.grid = (image_size // patch, image_size // patch)
        feature_dim = self.clip.visual.output_dim
        self.prompt_learner = CompoundPromptLearner(self.clip.token_embedding, feature_dim=feature_dim)
        if self.grid[0] * self.grid[1] < self.prompt_learner.prior_tokens:
            msg = (
                f"image_size {image_size} gives {self.grid[0] * self.grid[1]} patches, fewer than the "
                f"{self.prompt_learner.prior_tokens} the prior reads; use at least {4 * patch}."
            )
            raise ValueError(msg)
        self.image_size = image_size
        self.dap_patch_selection = dap_patch_selection
        self.sigma = sigma
        self.register_buffer("vision_positional_embedding", self._interpolated_positional_embedding(), persistent=False)
        # Derived from the prompt learner: never saved, recomputed after every state_dict load.
        self.register_buffer("static_text_features", torch.empty(0), persistent=False)
        # A partial of a module-level function (not a closure) keeps the model picklable for torch export.
        self.prompt_learner.register_load_state_dict_post_hook(partial(_clear_cache_after_load, self))
        self.clip.register_load_state_dict_post_hook(partial(_refresh_after_clip_load, self))

    def _interpolated_positional_embedding(self) -> torch.Tensor:
        embedding = self.clip.visual.positional_embedding.detach().float()
        side = math.isqrt(embedding.shape[0] - 1)
        if (side, side) == self.grid:
            return embedding.clone()
        grid = embedding[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False)
        return torch.cat([embedding[:1], grid.flatten(2).transpose(1, 2)[0]])

    def refresh_clip(self) -> None:
        """Recompute what is derived from the CLIP weights (call after loading new CLIP weights in place)."""
        self.vision_positional_embedding = self._interpolated_positional_embedding().to(
            self.vision_positional_embedding.device
        )
        self.clear_text_cache()

    def clear_text_cache(self) -> None:
        """Forget the cached static text features (after the prompt learner changed)."""
        self.static_text_features = torch.empty(0, device=self.static_text_features.device)

    def train(self, mode: bool = True) -> FAPromptModel:
        """Switch train/eval mode; CLIP always stays in eval mode, training clears the text cache.

        Args:
            mode: Training mode of the prompt learner.

        Returns:
            This module.
        """
        super().train(mode)
        self.clip.eval()
        if mode:
            self.clear_text_cache()
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings: the CLIP image feature, for similarity search over images.

        Args:
            images: CLIP-normalised images ``[B, 3, S, S]`` with S = ``image_size``.

        Returns:
            ``[B, E]`` embeddings (unnormalised).
        """
        return self.encode_images(images)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the vision transformer with the dual (original and V-V) path in the last blocks.

        Args:
            images: CLIP-normalised images ``[B, 3, S, S]`` with S = ``image_size``.

        Returns:
            Image features ``[B, E]`` (original-path CLS, no ``ln_post``) and patch features ``[B, 1 + P, E]``
            (``ln_post`` of the final V-V tokens, CLS first), neither normalised.

        Raises:
            ValueError: For images of another size.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            msg = f"FAPrompt expects CLIP-normalised images [B, 3, H, W], got shape {tuple(images.shape)}."
            raise ValueError(msg)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            msg = (
                f"FAPrompt was built for {self.image_size}x{self.image_size} inputs, got "
                f"{tuple(images.shape[-2:])}; resize the images (the pre-processor does) or set image_size."
            )
            raise ValueError(msg)
        visual = self.clip.visual
        tokens = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.vision_positional_embedding.to(tokens.dtype)
        tokens = visual.ln_pre(tokens)
        blocks = visual.transformer.resblocks
        first_dual = len(blocks) - DUAL_PATH_BLOCKS
        value_path = None
        for index, block in enumerate(blocks):
            normed = block.ln_1(tokens)
            if index < first_dual:
                tokens = tokens + block.ls_1(multi_head_attention(block.attn, normed))
            else:
                # After the last block only the CLS token of the original path is used.
                queries = 1 if index == len(blocks) - 1 else None
                original, value_value = self._dual_attention(block.attn, normed, queries)
                value_path = (tokens if value_path is None else value_path) + block.ls_1(value_value)
                tokens = tokens[:, : original.shape[1]] + block.ls_1(original)
            tokens = tokens + block.ls_2(mlp(block, block.ln_2(tokens)))
        image_features = tokens[:, 0] @ visual.proj
        patch_features = visual.ln_post(value_path) @ visual.proj
        return image_features, patch_features

    @staticmethod
    def _dual_attention(
        attention: nn.MultiheadAttention,
        tokens: torch.Tensor,
        queries: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, width = tokens.shape
        heads = attention.num_heads
        qkv = linear(tokens, attention.in_proj_weight, attention.in_proj_bias)
        query, key, value = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        original = F.scaled_dot_product_attention(query[:, :, :queries], key, value)
        value_value = F.scaled_dot_product_attention(value, value, value)

        def project(out: torch.Tensor) -> torch.Tensor:
            out = out.transpose(1, 2).reshape(batch, -1, width)
            return linear(out, attention.out_proj.weight, attention.out_proj.bias)

        return project(original), project(value_value)

    def encode_static_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the prompts without prior.

        Returns:
            ``[2, E]`` (the normal feature and the mean of the abnormal features) and the K abnormal features
            ``[K, E]``, none normalised.
        """
        learner = self.prompt_learner
        normal = encode_prompts(self.clip, learner.normal_prompt(), learner.normal_eot, learner.deep_prompts)
        abnormal = encode_prompts(
            self.clip, learner.abnormal_prompt_embeddings(), learner.abnormal_eot, learner.deep_prompts
        )
        return torch.cat([normal, abnormal.mean(dim=0, keepdim=True)]), abnormal

    def cached_static_text(self) -> torch.Tensor:
        """The static text features, computed once in eval mode and kept in a (non-persistent) buffer.

        Returns:
            ``[2, E]``, not normalised.
        """
        if self.static_text_features.numel():
            return self.static_text_features
        features, _ = self.encode_static_text()
        if not torch.compiler.is_compiling():
            with torch.inference_mode(mode=False):
                self.static_text_features = features.detach().clone()
        return features

    def select_prior_patches(self, static_probs: torch.Tensor) -> torch.Tensor:
        """Indices of the patches that feed the prior.

        Args:
            static_probs: Pass-1 probabilities ``[B, P, 2]``.

        Returns:
            ``[B, M]``: the most abnormal patches in descending order (``"topk"``) or ``0 .. M-1`` (``"first"``).
        """
        count = self.prompt_learner.prior_tokens
        if self.dap_patch_selection == "topk":
            return static_probs[..., 1].topk(count, dim=1).indices
        first = torch.arange(count, device=static_probs.device)
        return first.unsqueeze(0).expand(static_probs.shape[0], -1)

    def compute(self, images: torch.Tensor) -> FAPromptOutput:
        """Both passes on a batch; differentiable with respect to the prompt learner.

        Args:
            images: CLIP-normalised images ``[B, 3, S, S]``.

        Returns:
            The per-patch probabilities of both passes, the image logits and what the losses need.
        """
        image_features, patch_features = self.encode_images(images)
        image_features = F.normalize(image_features, dim=-1)
        patches = F.normalize(patch_features, dim=-1)[:, 1:]
        if self.training:
            static_text, static_abnormal = self.encode_static_text()
        else:
            static_text, static_abnormal = self.cached_static_text(), patches.new_empty(0, patches.shape[-1])
        static_probs = (patches @ F.normalize(static_text, dim=-1).T / TEMPERATURE).softmax(dim=-1)

        indices = self.select_prior_patches(static_probs.detach())
        selected = patches.gather(1, indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        learner = self.prompt_learner
        prior = learner.prior(selected)
        abnormal = encode_prompts(
            self.clip, learner.abnormal_prompt_embeddings(prior), learner.abnormal_eot, learner.deep_prompts
        )
        abnormal = abnormal.view(images.shape[0], learner.abnormal_prompts, -1).mean(dim=1)
        prior_text = F.normalize(torch.stack([static_text[0].expand_as(abnormal), abnormal], dim=1), dim=-1)
        prior_probs = (patches @ prior_text.transpose(1, 2) / TEMPERATURE).softmax(dim=-1)
        text_logits = (image_features.unsqueeze(1) @ prior_text.transpose(1, 2)).squeeze(1) / TEMPERATURE
        return FAPromptOutput(static_probs, prior_probs, text_logits, static_abnormal, prior, indices)

    def forward(self, images: torch.Tensor) -> FAPromptOutput | InferenceBatch:
        """Segment anomalies.

        Args:
            images: CLIP-normalised images ``[B, 3, S, S]``.

        Returns:
            In training mode the :class:`FAPromptOutput`; in eval mode an ``InferenceBatch`` with the smoothed
            ``anomaly_map`` ``[B, S, S]`` and ``pred_score`` ``[B]``, both in [0, 1].
        """
        if self.training:
            return self.compute(images)
        with torch.no_grad():
            output = self.compute(images)
        results = anomaly_maps_and_scores(output, self.grid, tuple(images.shape[-2:]), self.sigma)
        return InferenceBatch(pred_score=results["pred_score"], anomaly_map=results["anomaly_map"])


class FAPromptLoss(nn.Module):
    """The official training objective on auxiliary data with masks.

    ``L = [focal + dice(abnormal, mask) + dice(normal, 1 - mask)](static map)
    + 0.5 * [same](prior map) + CE(image logits, label) + binary_focal(image score, label)
    + 0.1 * Σ_{k<m} |cos(t_a^k, t_a^m)| + Σ_{normal images} mean(prior²)``.
    As in the official code the binary focal loss takes the image score (a probability) as a logit, and the
    prior term is a sum over the normal images of the batch.

    Args:
        grid: Patch grid ``(h, w)`` of the probabilities.
    """

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid

    @staticmethod
    def focal(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
        """Multi-class focal loss on probabilities with a smoothed one-hot target (AnomalyCLIP's).

        Args:
            probs: ``[B, C, H, W]`` probabilities.
            target: ``[B, H, W]`` class indices.
            gamma: Focusing parameter.
            smooth: One-hot smoothing and log offset.

        Returns:
            The mean loss.
        """
        classes = probs.shape[1]
        one_hot = F.one_hot(target.long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
        one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
        pt = (one_hot * probs).sum(dim=1) + smooth
        return (-((1 - pt) ** gamma) * pt.log()).mean()

    @staticmethod
    def dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary dice loss with smoothing 1, averaged over the batch.

        Args:
            probs: ``[B, H, W]``.
            target: ``[B, H, W]``.

        Returns:
            The loss.
        """
        probs, target = probs.flatten(1), target.flatten(1)
        dice = (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
        return 1 - dice.mean()

    def local(self, probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Focal and dice losses of one pass.

        Args:
            probs: Per-patch probabilities ``[B, P, 2]``.
            masks: Binary masks ``[B, H, W]``.

        Returns:
            The loss.
        """
        maps = _upsample(probs, self.grid, tuple(masks.shape[-2:]))
        return self.focal(maps, masks) + self.dice(maps[:, 1], masks) + self.dice(maps[:, 0], 1 - masks)

    @staticmethod
    def orthogonality(features: torch.Tensor) -> torch.Tensor:
        """Sum of the absolute cosine similarities over all pairs of abnormal prompt features.

        Args:
            features: ``[K, E]``.

        Returns:
            The loss.
        """
        normed = F.normalize(features, dim=-1)
        cosine = normed @ normed.T
        pairs = torch.triu_indices(*cosine.shape, offset=1, device=cosine.device)
        return cosine[pairs[0], pairs[1]].abs().sum()

    def forward(self, output: FAPromptOutput, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """All loss terms and their weighted sum.

        Args:
            output: Training output of :class:`FAPromptModel`.
            labels: Image labels ``[B]`` (1 = anomalous).
            masks: Ground-truth masks ``[B, H, W]`` at the input size; values above 0.5 count as anomalous.

        Returns:
            ``loss`` and the terms ``local_static``, ``local_prior``, ``global_ce``, ``global_focal``,
            ``orthogonality``, ``prior``.
        """
        masks = (masks > 0.5).to(output.static_probs.dtype)
        labels = labels.long()
        score = 0.5 * (
            output.text_logits.softmax(dim=-1)[:, 1]
            + (2 * output.static_probs[..., 1].amax(dim=1) + output.prior_probs[..., 1].amax(dim=1)) / 3
        )
        bce = F.binary_cross_entropy_with_logits(score, labels.to(score.dtype), reduction="none")
        normal = labels == 0
        terms = {
            "local_static": self.local(output.static_probs, masks),
            "local_prior": self.local(output.prior_probs, masks),
            "global_ce": F.cross_entropy(output.text_logits, labels),
            "global_focal": ((1 - torch.exp(-bce)) ** 2 * bce).mean(),
            "orthogonality": self.orthogonality(output.static_abnormal_features),
            "prior": (output.prior[normal] ** 2).mean(dim=1).sum(),
        }
        terms["loss"] = (
            terms["local_static"]
            + 0.5 * terms["local_prior"]
            + terms["global_ce"]
            + terms["global_focal"]
            + 0.1 * terms["orthogonality"]
            + terms["prior"]
        )
        return terms
