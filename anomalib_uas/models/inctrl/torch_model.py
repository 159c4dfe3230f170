# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL in pure PyTorch: in-context residuals between a query and k normal prompt images on a frozen CLIP.

A frozen open_clip ViT (``ViT-B-16-plus-240``, GELU) encodes the query and the k normal prompt images. Three
residuals are combined:

* **patch level**: the raw residual stream after blocks 7, 9 and 11 (1-based, no ``ln_post``, no projection);
  for every query patch and layer, ``0.5 * (1 - max cos)`` against all k x 225 prompt patches of that layer,
  averaged over the layers, gives the 15 x 15 residual map ``M``; its maximum is ``fg_score``;
* **image level**: ``mean_k adapter(prompt tokens) - adapter(query token)`` scored by ``diff_head_ref``;
* **text prior**: ``softmax(100 * cos(query token, [normal, anomaly] text features))[anomaly]`` with InCTRL's own
  prompt ensemble (:mod:`~anomalib_uas.models.inctrl.prompts`).

The holistic map ``text_score + img_ref_score + M`` goes through ``diff_head``; the image score is
``(hl_score + fg_score) / 2``. The anomaly map (our addition; the paper scores images only) is ``M`` upsampled
bilinearly to the input size.

Every sample is scored on its own, so a batch of N gives the outputs of N runs of one (the official code mixes
layers and samples when the batch is larger than one). Prompt features and the text features of a category are
computed once and kept in buffers; text features are also cached per category name, and the causal text tower
runs only up to the longest prompt's end token. The patch residual is one batched matrix product, and the last
vision block is evaluated for the class token only (its other tokens are never used).

Example:
    >>> import torch
    >>> from anomalib_uas.models.inctrl.torch_model import InCTRLModel
    >>> model = InCTRLModel("uas-tiny-ViT-B-16-plus-240").eval()
    >>> model.set_prompts(torch.randn(2, 3, 240, 240))
    >>> model.set_category("bottle")
    >>> output = model(torch.randn(3, 3, 240, 240))
    >>> output.pred_score.shape, output.anomaly_map.shape
    (torch.Size([3]), torch.Size([3, 240, 240]))

Paper:
    Jiawen Zhu and Guansong Pang, "Toward Generalist Anomaly Detection via In-context Residual Learning with
    Few-shot Sample Prompts", CVPR 2024.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from anomalib_uas.models.components.clip import is_batch_first, load_clip
from anomalib_uas.models.inctrl.prompts import object_name, prompt_texts

__all__ = ["FEATURE_LAYERS", "TEXT_LOGIT_SCALE", "Adapter", "InCTRLModel", "InCTRLOutput", "ResidualHead"]

FEATURE_LAYERS = (7, 9, 11)
TEXT_LOGIT_SCALE = 100.0


class InCTRLOutput(NamedTuple):
    """Every score of an InCTRL forward pass, per sample.

    Attributes:
        final_score: Image anomaly score ``(hl_score + fg_score) / 2``, ``[B]``.
        img_ref_score: Image-level residual score, ``[B]``.
        text_score: Zero-shot text prior, ``[B]``.
        fg_score: Maximum of the patch residual map, ``[B]``.
        hl_score: Holistic head score, ``[B]``.
        patch_ref_map: Patch residual map ``M`` in raster order, ``[B, P]``.
        holistic_map: ``text_score + img_ref_score + M``, ``[B, P]``.
    """

    final_score: torch.Tensor
    img_ref_score: torch.Tensor
    text_score: torch.Tensor
    fg_score: torch.Tensor
    hl_score: torch.Tensor
    patch_ref_map: torch.Tensor
    holistic_map: torch.Tensor


class Adapter(nn.Module):
    """Bottleneck adapter on the image tokens: Linear-ReLU-Linear-ReLU without biases.

    Args:
        dim: Token dimension (640 for ViT-B-16-plus-240).
        reduction: Bottleneck reduction factor.
    """

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Adapt tokens.

        Args:
            tokens: ``[..., dim]``.

        Returns:
            Adapted tokens of the same shape.
        """
        return self.fc(tokens)


class ResidualHead(nn.Module):
    """Scoring head, the official ``TransformerBasicHead``: three linear layers with ReLU and batch norm, a sigmoid.

    ``bn1`` is part of the official state_dict but never applied; it is kept so that official checkpoints load
    strictly.

    Args:
        dim_in: Input features.
    """

    def __init__(self, dim_in: int) -> None:
        super().__init__()
        self.projection1 = nn.Linear(dim_in, 128)
        self.projection2 = nn.Linear(128, 64)
        self.projection3 = nn.Linear(64, 1)
        self.bn1 = nn.BatchNorm1d(dim_in)
        self.bn2 = nn.BatchNorm1d(128)
        self.bn3 = nn.BatchNorm1d(64)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Score the features.

        Args:
            features: ``[B, dim_in]``.

        Returns:
            Probabilities ``[B, 1]``.
        """
        hidden = self.bn2(F.relu(self.projection1(features)))
        hidden = self.bn3(F.relu(self.projection2(hidden)))
        return torch.sigmoid(self.projection3(hidden))


def _as_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy that is a normal tensor even when computed under ``torch.inference_mode``.

    Lightning validates, tests and predicts in inference mode; buffers filled there would otherwise be inference
    tensors, which later training steps and ``torch.export`` (ONNX) cannot use.

    Args:
        tensor: The tensor.

    Returns:
        A detached normal copy.
    """
    with torch.inference_mode(False):
        return tensor.detach().clone()


@functools.cache
def _tokenizer(model_name: str) -> Callable[[list[str]], torch.Tensor]:
    return open_clip.get_tokenizer(model_name)


class InCTRLModel(DynamicBufferMixin, nn.Module):
    """InCTRL on an open_clip ViT with class-token pooling.

    Args:
        clip_model: open_clip model name: ``"ViT-B-16-plus-240"`` (the official backbone) or a configuration of
            the same family such as ``"uas-tiny-ViT-B-16-plus-240"`` for tests.
        clip_pretrained: open_clip pretrained tag of the CLIP weights (``"laion400m_e32"``), ``None`` for none.
        clip_weights: Local file with the CLIP weights; takes precedence over ``clip_pretrained``.
        feature_layers: 1-based blocks whose raw residual stream gives the patch features; all before the last
            block.

    Raises:
        ValueError: For a CLIP model without class-token pooling or for feature layers out of range.
    """

    def __init__(
        self,
        clip_model: str = "ViT-B-16-plus-240",
        clip_pretrained: str | None = None,
        clip_weights: str | Path | None = None,
        feature_layers: Sequence[int] = FEATURE_LAYERS,
    ) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.clip = load_clip(clip_model, pretrained=clip_pretrained, weights=clip_weights)
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        if (
            getattr(visual, "attn_pool", None) is not None
            or getattr(visual, "pool_type", "tok") != "tok"
            or visual.proj is None
            or not isinstance(blocks[-1], ResidualAttentionBlock)
        ):
            msg = f"{clip_model} is not a CLIP ViT with class-token pooling and a projection; InCTRL needs one."
            raise ValueError(msg)
        layers = tuple(int(layer) for layer in feature_layers)
        if not layers or any(not 1 <= layer < len(blocks) for layer in layers):
            msg = f"feature_layers must be 1-based blocks before the last of {len(blocks)}, got {layers}."
            raise ValueError(msg)
        self.feature_layers = layers
        self.image_size = tuple(visual.image_size)
        self.grid_size = tuple(visual.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        embed_dim = visual.output_dim
        self.adapter = Adapter(embed_dim)
        self.diff_head = ResidualHead(self.num_patches)
        self.diff_head_ref = ResidualHead(embed_dim)
        self.register_buffer("prompt_patches", torch.empty(0))
        self.register_buffer("prompt_tokens", torch.empty(0))
        self.register_buffer("text_features", torch.empty(0))
        self.category: str | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> InCTRLModel:
        """Set the training mode of the heads; the frozen CLIP always stays in eval mode.

        Args:
            mode: Training mode.

        Returns:
            The model.
        """
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def has_prompts(self) -> bool:
        """Whether prompt features are set.

        Returns:
            ``True`` once :meth:`set_prompts` ran (or a checkpoint restored them).
        """
        return self.prompt_tokens.numel() > 0

    @property
    def k_shot(self) -> int:
        """Number of prompt images behind the cached prompt features.

        Returns:
            k, or 0 without prompts.
        """
        return self.prompt_tokens.shape[0] if self.has_prompts else 0

    def clear_text_cache(self) -> None:
        """Forget the cached text features of every category (after the CLIP weights changed)."""
        self._text_cache.clear()
        self.category = None

    def _check_images(self, images: torch.Tensor, name: str) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.image_size:
            height, width = self.image_size
            msg = (
                f"InCTRL {name} must be [N, 3, {height}, {width}] normalised images, got {list(images.shape)}. Use "
                f"the model's pre-processor (resize the short side to {height}, centre-crop, CLIP mean and std)."
            )
            raise ValueError(msg)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings: the CLIP image token, for similarity search over images.

        Args:
            images: Normalised images ``[N, 3, H, W]`` at the CLIP input size.

        Returns:
            ``[N, D]`` embeddings (unnormalised).
        """
        return self.encode_images(images)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images with the frozen CLIP vision tower.

        The patch features are the raw residual stream after the feature layers. The token is the class token
        after the last block, ``ln_post`` and the projection; the last block is evaluated for the class token
        only, since no other token of it is used.

        Args:
            images: Normalised images ``[N, 3, H, W]`` at the CLIP input size.

        Returns:
            Tokens ``[N, D]`` (unnormalised) and patch features ``[N, L, P, W]`` (class token dropped).
        """
        self._check_images(images, "images")
        visual = self.clip.visual
        batch_first = is_batch_first(visual.transformer)
        hidden = visual._embeds(images)
        if not batch_first:
            hidden = hidden.transpose(0, 1)
        blocks = visual.transformer.resblocks
        taps = []
        for index, block in enumerate(blocks[:-1], start=1):
            hidden = block(hidden)
            if index in self.feature_layers:
                taps.append(hidden if batch_first else hidden.transpose(0, 1))
        last = blocks[-1]
        normed = last.ln_1(hidden)
        query = normed[:, :1] if batch_first else normed[:1]
        cls = hidden[:, :1] if batch_first else hidden[:1]
        cls = cls + last.ls_1(last.attn(query, normed, normed, need_weights=False)[0])
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        cls = cls[:, 0] if batch_first else cls[0]
        tokens = visual.ln_post(cls) @ visual.proj
        patches = torch.stack([tap[:, 1:] for tap in taps], dim=1)
        return tokens, patches

    @torch.no_grad()
    def set_prompts(self, images: torch.Tensor) -> None:
        """Encode k normal prompt images once and keep their features in the buffers.

        Args:
            images: Normalised prompt images ``[k, 3, H, W]``.
        """
        tokens, patches = self.encode_images(images)
        layers = patches.shape[1]
        self.prompt_tokens = _as_buffer(tokens)
        self.prompt_patches = _as_buffer(
            F.normalize(patches, dim=-1).transpose(0, 1).reshape(layers, -1, patches.shape[-1])
        )

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode tokenised prompts with the frozen CLIP text tower (unnormalised embeddings).

        The text transformer is causal and pools the end-of-text token (the largest id of each row), so the
        padding after the longest prompt's end-of-text token cannot change the result: the context is cut there.
        This is about 4x faster than the full 77-token context for InCTRL's prompts and equal up to float
        rounding. Text towers without a causal mask or argmax pooling use open_clip's ``encode_text``.

        Args:
            tokens: Token ids ``[N, context_length]``.

        Returns:
            ``[N, D]`` text embeddings.
        """
        clip = self.clip
        if getattr(clip, "attn_mask", None) is None or getattr(clip, "text_pool_type", None) != "argmax":
            return clip.encode_text(tokens)
        end = tokens.argmax(dim=-1)
        length = int(end.max()) + 1
        cast_dtype = clip.transformer.get_cast_dtype()
        hidden = clip.token_embedding(tokens[:, :length]).to(cast_dtype)
        hidden = hidden + clip.positional_embedding[:length].to(cast_dtype)
        hidden = clip.transformer(hidden, attn_mask=clip.attn_mask[:length, :length])
        pooled = clip.ln_final(hidden)[torch.arange(len(tokens), device=tokens.device), end]
        projection = clip.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    @torch.no_grad()
    def compute_text_features(self, category: str) -> torch.Tensor:
        """Encode the prompt ensemble of a category (no cache).

        Each prompt embedding is L2-normalised, the normal and the anomaly embeddings are averaged and the means
        normalised again.

        Args:
            category: Category name; underscores become spaces.

        Returns:
            ``[2, D]``: the normal and the anomaly text feature.
        """
        normal, anomaly = prompt_texts(category)
        device = self.clip.visual.proj.device
        tokens = _tokenizer(self.clip_model)(normal + anomaly).to(device)
        embeddings = F.normalize(self.encode_text(tokens), dim=-1)
        means = [embeddings[: len(normal)].mean(dim=0), embeddings[len(normal) :].mean(dim=0)]
        return F.normalize(torch.stack(means), dim=-1)

    def text_features_for(self, category: str) -> torch.Tensor:
        """Text features of a category, computed once per object name.

        Args:
            category: Category name.

        Returns:
            ``[2, D]`` normal and anomaly text features.
        """
        key = object_name(category)
        if key not in self._text_cache:
            self._text_cache[key] = _as_buffer(self.compute_text_features(category))
        return self._text_cache[key].to(self.clip.visual.proj.device)

    def set_category(self, category: str) -> None:
        """Use the text features of ``category`` for calls without explicit categories.

        Args:
            category: Category (object) name, e.g. ``"bottle"`` or ``"metal_nut"``.
        """
        self.text_features = _as_buffer(self.text_features_for(category))
        self.category = category

    def remember_text_features(self, category: str) -> None:
        """Record the text features in the buffer as those of ``category`` (after a checkpoint restored them).

        Args:
            category: The category the buffer was computed for.
        """
        if self.text_features.numel():
            self._text_cache[object_name(category)] = self.text_features.detach().clone()
            self.category = category

    def _text_features(self, categories: str | Sequence[str] | None, batch: int) -> torch.Tensor:
        if categories is None:
            if not self.text_features.numel():
                msg = "InCTRL has no text features: call set_category(<object name>) or pass categories."
                raise RuntimeError(msg)
            return self.text_features
        if isinstance(categories, str):
            return self.text_features_for(categories)
        if len(categories) != batch:
            msg = f"Got {len(categories)} categories for {batch} images; give one per image or a single name."
            raise ValueError(msg)
        return torch.stack([self.text_features_for(category) for category in categories])

    def _prompt_features(self, prompt_images: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt_images is None:
            if not self.has_prompts:
                msg = "InCTRL has no prompt features: call set_prompts(<k normal images>) or pass prompt_images."
                raise RuntimeError(msg)
            return self.prompt_tokens, self.prompt_patches
        if prompt_images.dim() == 4:
            tokens, patches = self.encode_images(prompt_images)
            layers = patches.shape[1]
            return tokens, F.normalize(patches, dim=-1).transpose(0, 1).reshape(layers, -1, patches.shape[-1])
        if prompt_images.dim() != 5 or prompt_images.shape[0] != batch:
            msg = (
                f"prompt_images must be [k, 3, H, W] (shared) or [B, k, 3, H, W] with B = {batch} (per image), "
                f"got {list(prompt_images.shape)}."
            )
            raise ValueError(msg)
        shots = prompt_images.shape[1]
        tokens, patches = self.encode_images(prompt_images.flatten(0, 1))
        _, layers, num_patches, width = patches.shape
        patches = F.normalize(patches, dim=-1).view(batch, shots, layers, num_patches, width).transpose(1, 2)
        return tokens.view(batch, shots, -1), patches.reshape(batch, layers, shots * num_patches, width)

    @staticmethod
    def patch_residual(query_patches: torch.Tensor, prompt_patches: torch.Tensor) -> torch.Tensor:
        """Patch-level in-context residual map.

        Args:
            query_patches: Query patch features ``[B, L, P, W]`` (any norm).
            prompt_patches: L2-normalised prompt patch features, ``[L, K, W]`` shared or ``[B, L, K, W]``.

        Returns:
            ``M`` ``[B, P]``: per patch the mean over layers of ``0.5 * (1 - max cos)`` over the K prompt patches.
        """
        similarity = F.normalize(query_patches, dim=-1) @ prompt_patches.transpose(-1, -2)
        return (0.5 * (1.0 - similarity.amax(dim=-1))).mean(dim=1)

    def score(
        self,
        images: torch.Tensor,
        prompt_images: torch.Tensor | None = None,
        categories: str | Sequence[str] | None = None,
    ) -> InCTRLOutput:
        """Compute every InCTRL score; gradients flow into the adapter and the heads only.

        Args:
            images: Normalised query images ``[B, 3, H, W]``.
            prompt_images: ``None`` for the cached prompt features (:meth:`set_prompts`), ``[k, 3, H, W]`` for
                prompts shared by all queries, or ``[B, k, 3, H, W]`` for prompts per query.
            categories: ``None`` for the text features set by :meth:`set_category`, one name for all queries, or
                one name per query.

        Returns:
            The scores.
        """
        batch = images.shape[0]
        tokens, patches = self.encode_images(images)
        prompt_tokens, prompt_patches = self._prompt_features(prompt_images, batch)
        with torch.no_grad():
            patch_ref_map = self.patch_residual(patches, prompt_patches)
            text_features = self._text_features(categories, batch)
            cosine = F.normalize(tokens, dim=-1).unsqueeze(1) @ text_features.transpose(-1, -2)
            text_score = (TEXT_LOGIT_SCALE * cosine.squeeze(1)).softmax(dim=-1)[:, 1]
        token_ref = self.adapter(prompt_tokens).mean(dim=-2) - self.adapter(tokens)
        img_ref_score = self.diff_head_ref(token_ref).squeeze(1)
        holistic_map = text_score.unsqueeze(1) + img_ref_score.unsqueeze(1) + patch_ref_map
        hl_score = self.diff_head(holistic_map).squeeze(1)
        fg_score = patch_ref_map.amax(dim=1)
        return InCTRLOutput(
            final_score=(hl_score + fg_score) / 2,
            img_ref_score=img_ref_score,
            text_score=text_score,
            fg_score=fg_score,
            hl_score=hl_score,
            patch_ref_map=patch_ref_map,
            holistic_map=holistic_map,
        )

    def anomaly_map(self, patch_ref_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Upsample the patch residual map to an image size (bilinear).

        Args:
            patch_ref_map: ``[B, P]``.
            size: Output ``(height, width)``.

        Returns:
            ``[B, height, width]`` in ``[0, 1]``.
        """
        grid = patch_ref_map.view(-1, 1, *self.grid_size)
        return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)

    def forward(
        self,
        images: torch.Tensor,
        prompt_images: torch.Tensor | None = None,
        categories: str | Sequence[str] | None = None,
    ) -> InCTRLOutput | InferenceBatch:
        """Score query images.

        Args:
            images: Normalised query images ``[B, 3, H, W]``.
            prompt_images: See :meth:`score`.
            categories: See :meth:`score`.

        Returns:
            In training mode every score (:class:`InCTRLOutput`); in eval mode an ``InferenceBatch`` with
            ``pred_score`` (the final score) and ``anomaly_map`` (the upsampled patch residual map).
        """
        if self.training:
            return self.score(images, prompt_images, categories)
        with torch.no_grad():
            output = self.score(images, prompt_images, categories)
            anomaly_map = self.anomaly_map(output.patch_ref_map, images.shape[-2:])
        return InferenceBatch(pred_score=output.final_score, anomaly_map=anomaly_map)
