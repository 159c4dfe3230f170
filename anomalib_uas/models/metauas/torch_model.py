# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS in pure PyTorch: frozen encoder, prompt-to-query feature alignment, UNet decoder and mask head.

A query image and one or more normal prompt images of the same object are encoded by a frozen hierarchical
encoder. On the three deepest levels every query position attends over the prompt positions (soft alignment:
one shared 1x1 projection for queries and keys, the raw prompt feature as value, a softmax without scaling) and
the aligned prompt feature is fused with the query feature. A UNet decoder turns the fused levels into a change
logit map at input resolution; its sigmoid is the anomaly map and its maximum the image score.

Prompt features live in a *prompt bank* of buffers, computed once and saved with the model. With ``retrieval``
off every query uses the whole bank (k prompts); with it on, each query takes the ``k_shot`` bank entries whose
global last-level features (:meth:`MetaUASModel.embed`) are closest in cosine similarity, and
``last_prompt_index`` tells which entries each query of the last forward used. Several prompts are combined by
averaging their aligned features (the official multi-prompt path raises a NameError).

Example:
    >>> import torch
    >>> from anomalib_uas.models.metauas.torch_model import MetaUASModel
    >>> model = MetaUASModel(backbone="efficientnet_lite0", pretrained_backbone=False).eval()
    >>> model.set_prompts(torch.zeros(1, 3, 64, 64))
    >>> model(torch.zeros(2, 3, 64, 64)).anomaly_map.shape
    torch.Size([2, 64, 64])

The module needs torch and timm only (no anomalib, no Lightning): a process that serves or benchmarks the bare
network does not pay for their imports.

Paper:
    Bin-Bin Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning", NeurIPS 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_uas.models.components.backbones import EfficientNetStages, build_encoder
from anomalib_uas.models.metauas.inference import FullResolutionTail, UpsampledConvActivation, inference_copy

__all__ = ["ALIGNED_LEVELS", "FeatureAlignment", "MetaUASModel", "MetaUASOutput", "UNetDecoder"]

ALIGNED_LEVELS = 3
ATTENTION_ROWS = 1024  # query positions aligned at a time
OFFICIAL_DECODER_CHANNELS = (256, 128, 64, 64, 48)
ALIGNMENTS = ("soft", "hard")
FUSIONS = ("cat", "add", "absdiff")


class FeatureAlignment(nn.Module):
    """Align prompt features to a query feature map and fuse them.

    Args:
        channels: Channels of this level.
        alignment: ``"soft"`` (attention-weighted prompt features) or ``"hard"`` (the arg-max prompt position).
        fusion: ``"cat"`` (query and aligned prompt stacked), ``"add"`` or ``"absdiff"``.
    """

    def __init__(self, channels: int, alignment: str = "soft", fusion: str = "cat") -> None:
        super().__init__()
        self.projection = nn.Conv2d(channels, channels // 2, kernel_size=1)
        self.alignment = alignment
        self.fusion = fusion

    def align(self, query: torch.Tensor, prompts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Align the selected prompts to each query and average them.

        Args:
            query: Query features ``[B, C, h, w]``.
            prompts: Prompt bank features ``[N, C, h, w]``.
            index: Bank entries used by each query, ``[B, k]``.

        Returns:
            Aligned prompt features ``[B, C, h, w]``, the mean over the k prompts.
        """
        batch, channels, height, width = query.shape
        queries = _tokens(self.projection(query)).unsqueeze(1)  # [B, 1, hw_query, C/2]
        keys = _tokens(self.projection(prompts))[index]  # [B, k, hw_prompt, C/2]
        values = _tokens(prompts)[index]  # [B, k, hw_prompt, C]
        # Query positions in chunks: every row of the attention is independent, and at 512 px the full matrix of
        # the stride-8 level would take 4096 x 4096 floats per prompt (twice, with its softmax).
        aligned = torch.cat([self._attend(chunk, keys, values) for chunk in queries.split(ATTENTION_ROWS, dim=2)], 2)
        return aligned.mean(dim=1).view(batch, height, width, channels).permute(0, 3, 1, 2)

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        logits = queries @ keys.transpose(-1, -2)  # [B, k, rows, hw_prompt]
        if self.alignment == "soft":
            return logits.softmax(dim=-1) @ values  # [B, k, rows, C]
        best = logits.argmax(dim=-1).unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])
        return values.gather(2, best)

    def forward(self, query: torch.Tensor, prompts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Fuse the query with its aligned prompts.

        Args:
            query: Query features ``[B, C, h, w]``.
            prompts: Prompt bank features ``[N, C, h, w]``.
            index: Bank entries used by each query, ``[B, k]``.

        Returns:
            ``[B, 2C, h, w]`` for ``"cat"``, ``[B, C, h, w]`` otherwise.
        """
        aligned = self.align(query, prompts, index)
        if self.fusion == "cat":
            return torch.cat([query, aligned], dim=1)
        if self.fusion == "add":
            return query + aligned
        return (query - aligned).abs()


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` as ``[N, hw, C]`` (a view of channels-last features, a copy of contiguous ones)."""
    return features.permute(0, 2, 3, 1).flatten(1, 2)


class SCSE(nn.Module):
    """Concurrent channel and spatial squeeze-and-excitation: ``x * cSE(x) + x * sSE(x)``.

    Args:
        channels: Input channels.
        reduction: Channel reduction of the channel gate.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Gate the features.

        Args:
            features: ``[B, C, H, W]``.

        Returns:
            Gated features of the same shape.
        """
        # x * cSE + x * sSE with one full-size temporary instead of three
        return (features * self.cSE(features)).addcmul_(features, self.sSE(features))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip, then two conv-BN-ReLU layers.

    With a skip, SCSE gates the concatenation and the output; a block without a skip has no SCSE at all, as in
    the decoder the official checkpoints were trained with.

    Args:
        in_channels: Channels coming from the previous block.
        skip_channels: Channels of the skip connection, 0 for none.
        out_channels: Output channels.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        gated = skip_channels > 0
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.attention1 = SCSE(in_channels + skip_channels) if gated else nn.Identity()
        self.conv1 = _conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)
        self.attention2 = SCSE(out_channels) if gated else nn.Identity()

    def forward(self, features: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Decode one level.

        Args:
            features: ``[B, in_channels, h, w]``.
            skip: ``[B, skip_channels, 2h, 2w]`` or ``None``.

        Returns:
            ``[B, out_channels, 2h, 2w]``.
        """
        features = self.upsample(features)
        if skip is not None:
            features = self.attention1(torch.cat([features, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(features)))


class UNetDecoder(nn.Module):
    """UNet decoder over five encoder levels whose deepest ``ALIGNED_LEVELS`` levels carry fused prompt features.

    Args:
        encoder_channels: Channels of the five encoder levels, shallowest first.
        decoder_channels: Output channels of the five decoder blocks.
        fusion_factor: 2 when fusion concatenates query and prompt features, else 1.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int], fusion_factor: int) -> None:
        super().__init__()
        if len(encoder_channels) != 5 or len(decoder_channels) != 5:
            msg = "The UNet decoder needs five encoder levels and five decoder blocks"
            raise ValueError(msg)
        skips = [*reversed(encoder_channels[:-1]), 0]
        skips = [c * fusion_factor if i < ALIGNED_LEVELS - 1 else c for i, c in enumerate(skips)]
        inputs = [encoder_channels[-1] * fusion_factor, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(inputs, skips, decoder_channels, strict=True)
        )

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode the levels.

        Args:
            levels: Five (fused) feature maps, shallowest first.

        Returns:
            Decoder features at input resolution.
        """
        features = levels[-1]
        skips = list(reversed(levels[:-1]))
        for index, block in enumerate(self.blocks):
            features = block(features, skips[index] if index < len(skips) else None)
        return features


class MetaUASOutput(NamedTuple):
    """An eval-mode forward pass; ``_asdict()`` gives the fields anomalib's batches take.

    Attributes:
        pred_score: Image anomaly score, the maximum of the map, ``[B]``.
        anomaly_map: Sigmoid change map at input resolution, ``[B, H, W]``.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor


class MetaUASModel(nn.Module):
    """The MetaUAS network with a prompt bank.

    Args:
        backbone: Encoder name (see :func:`~anomalib_uas.models.components.backbones.build_encoder`).
        pretrained_backbone: Load the encoder's ImageNet weights.
        alignment: ``"soft"`` (the paper) or ``"hard"``.
        fusion: ``"cat"`` (the paper), ``"add"`` or ``"absdiff"``.
        decoder_channels: Output channels of the five decoder blocks.
        k_shot: Prompts used per query.
        retrieval: Pick each query's ``k_shot`` prompts from the bank by cosine similarity of global
            last-level features; without it the whole bank is used.
        train_encoder: Let gradients reach the encoder (its batch-norm statistics stay frozen). By default the
            encoder is frozen, as in the paper.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained_backbone: bool = True,
        alignment: str = "soft",
        fusion: str = "cat",
        decoder_channels: Sequence[int] = OFFICIAL_DECODER_CHANNELS,
        k_shot: int = 1,
        retrieval: bool = False,
        train_encoder: bool = False,
    ) -> None:
        super().__init__()
        if alignment not in ALIGNMENTS or fusion not in FUSIONS:
            msg = f"alignment must be one of {ALIGNMENTS} and fusion one of {FUSIONS}, got {alignment!r}, {fusion!r}"
            raise ValueError(msg)
        if k_shot < 1:
            msg = f"k_shot must be at least 1, got {k_shot}"
            raise ValueError(msg)
        self.backbone = backbone
        self.encoder = build_encoder(backbone, pretrained=pretrained_backbone).eval()
        self.encoder.requires_grad_(train_encoder)
        self.train_encoder = train_encoder
        channels = self.encoder.out_channels
        self.alignment = nn.ModuleList(
            FeatureAlignment(c, alignment, fusion) for c in reversed(channels[-ALIGNED_LEVELS:])
        )
        self.decoder = UNetDecoder(channels, decoder_channels, 2 if fusion == "cat" else 1)
        self.mask_head = nn.Conv2d(decoder_channels[-1], 1, kernel_size=1)
        self.k_shot = k_shot
        self.retrieval = retrieval
        self.last_prompt_index: torch.Tensor | None = None
        for level in range(ALIGNED_LEVELS):
            self.register_buffer(f"prompt_bank_{level}", torch.empty(0))
        self._inference: tuple[nn.Module, nn.Module, nn.Module] | None = None
        self.register_load_state_dict_post_hook(MetaUASModel._drop_inference_copy)

    def train(self, mode: bool = True) -> MetaUASModel:
        """Switch train/eval mode; the encoder always stays in eval mode (frozen batch-norm statistics).

        Args:
            mode: Training mode for the alignment, decoder and head.

        Returns:
            This module.
        """
        super().train(mode)
        self.encoder.eval()
        self._inference = None
        return self

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> MetaUASModel:
        super()._apply(fn, recurse)
        self._inference = None  # .to(), .double() and the like: the copy is rebuilt from the converted weights
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a saved prompt bank has its own number of prompts and size: take its shape before loading it
        for level in range(ALIGNED_LEVELS):
            saved = state_dict.get(f"{prefix}prompt_bank_{level}")
            current = getattr(self, f"prompt_bank_{level}")
            if saved is not None and saved.shape != current.shape:
                setattr(self, f"prompt_bank_{level}", current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deep-copy state without the inference copies, which are rebuilt at the next eval-mode call.

        Returns:
            The module's state.
        """
        return {**super().__getstate__(), "_inference": None}

    def _drop_inference_copy(self, incompatible_keys: object) -> None:
        del incompatible_keys
        self._inference = None

    def network(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The encoder, decoder and mask head that run: inference copies where no gradient is needed.

        The inference copies (:func:`~anomalib_uas.models.metauas.inference.inference_copy`) have the batch norms
        of EfficientNet encoders and of the decoder folded into the convolutions and channels-last weights, and the
        last decoder block upsamples inside its first convolution
        (:class:`~anomalib_uas.models.metauas.inference.UpsampledConvActivation`) and runs together with the mask head,
        in row strips at large sizes (:class:`~anomalib_uas.models.metauas.inference.FullResolutionTail`; the
        returned head is then ``nn.Identity``); they give the same outputs up to float rounding, faster. In eval mode
        all three are copies. In training mode the decoder and head are the
        modules themselves, and so is the encoder when it is trained (``train_encoder``); a frozen encoder runs as its
        copy (the frozen encoder's plain modules took over 40 % of a meta-training step). ``torch.export`` (ONNX) and
        ``torch.compile`` trace the modules themselves. The copies are built at the first call and rebuilt after
        ``train()``/``eval()``, ``load_state_dict`` and device or dtype moves; weights changed in place by other means
        need ``train()`` or ``eval()`` again. ``state_dict`` and saved checkpoints hold only the original modules.

        Returns:
            ``(encoder, decoder, mask_head)``.
        """
        if torch.compiler.is_compiling() or (self.training and self.train_encoder):
            return self.encoder, self.decoder, self.mask_head  # export and compile trace the modules themselves
        if self._inference is None:
            encoder = inference_copy(self.encoder, fold=isinstance(self.encoder, EfficientNetStages))
            if self.training:
                self._inference = (encoder, self.decoder, self.mask_head)
            else:
                decoder = inference_copy(self.decoder)
                last = decoder.blocks[-1]  # no skip and no gates: upsampling, two conv-activations
                upsampled = UpsampledConvActivation(last.conv1[0])
                decoder.blocks[-1] = FullResolutionTail(upsampled, last.conv2[0], inference_copy(self.mask_head))
                self._inference = (encoder, decoder, nn.Identity())
        return self._inference

    @property
    def prompt_bank(self) -> list[torch.Tensor]:
        """Prompt features of the aligned levels, deepest first, each ``[N, C, h, w]``.

        Returns:
            The three bank tensors.

        Raises:
            RuntimeError: When no prompts were set.
        """
        bank = [getattr(self, f"prompt_bank_{level}") for level in range(ALIGNED_LEVELS)]
        if bank[0].numel() == 0:
            msg = "MetaUAS has no prompt images: call set_prompts() or pass prompt images to forward()."
            raise RuntimeError(msg)
        return bank

    @property
    def has_prompts(self) -> bool:
        """Whether the prompt bank holds features.

        Returns:
            ``True`` once :meth:`set_prompts` ran (or a checkpoint with a bank was loaded).
        """
        return self.prompt_bank_0.numel() > 0

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder (without gradients unless ``train_encoder``).

        Args:
            images: Normalised images ``[B, 3, H, W]``, H and W multiples of 32.

        Returns:
            Five feature maps, shallowest first.
        """
        encoder = self.network()[0]
        if encoder is not self.encoder:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            return encoder(images)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings: the spatial mean of the deepest encoder level (also used by retrieval).

        Args:
            images: Normalised images ``[N, 3, H, W]``.

        Returns:
            ``[N, D]`` embeddings (``D`` = channels of the deepest level).
        """
        return self.encode_images(images)[-1].mean(dim=(2, 3))

    @torch.no_grad()
    def set_prompts(self, images: torch.Tensor, batch_size: int = 16) -> None:
        """Encode normal prompt images once and keep their aligned-level features as buffers.

        Args:
            images: Normalised prompt images ``[N, 3, H, W]``; without retrieval N must equal ``k_shot``.
            batch_size: Images encoded at a time.

        Raises:
            ValueError: When the number of images does not fit ``k_shot``.
        """
        count = images.shape[0]
        if (not self.retrieval and count != self.k_shot) or count < self.k_shot:
            msg = f"Got {count} prompt images for k_shot={self.k_shot} (retrieval={self.retrieval})."
            raise ValueError(msg)
        chunks = [self.encode_images(images[i : i + batch_size])[-ALIGNED_LEVELS:] for i in range(0, count, batch_size)]
        # Lightning validates under inference mode; a normal tensor keeps the bank usable by export and autograd.
        with torch.inference_mode(mode=False):
            for level in range(ALIGNED_LEVELS):
                stacked = torch.cat([chunk[ALIGNED_LEVELS - 1 - level] for chunk in chunks])
                setattr(self, f"prompt_bank_{level}", stacked.clone(memory_format=torch.contiguous_format))

    def select_prompts(self, deepest_query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Choose the bank entries each query aligns to.

        Args:
            deepest_query: Query features of the deepest level ``[B, C, h, w]``.
            bank: Bank features of the deepest level ``[N, C, h, w]``.

        Returns:
            Indices ``[B, k]``.
        """
        batch = deepest_query.shape[0]
        if not self.retrieval:
            return torch.arange(bank.shape[0], device=bank.device).expand(batch, -1)
        query_embedding = F.normalize(deepest_query.mean(dim=(2, 3)), dim=1)
        bank_embedding = F.normalize(bank.mean(dim=(2, 3)), dim=1)
        return (query_embedding @ bank_embedding.T).topk(self.k_shot, dim=1).indices

    def segment(
        self,
        query_levels: Sequence[torch.Tensor],
        bank: Sequence[torch.Tensor],
        index: torch.Tensor,
    ) -> torch.Tensor:
        """Predict change logits from query features and prompt-bank features.

        Args:
            query_levels: The five query feature maps, shallowest first.
            bank: Prompt features of the aligned levels, deepest first, each ``[N, C, h, w]``.
            index: Bank entries of each query ``[B, k]``.

        Returns:
            Logits ``[B, 1, H, W]``.
        """
        levels = list(query_levels)
        for offset, (align, prompts) in enumerate(zip(self.alignment, bank, strict=True)):
            level = len(levels) - 1 - offset
            levels[level] = align(levels[level], prompts, index)
        _, decoder, mask_head = self.network()
        return mask_head(decoder(levels))

    def forward(self, images: torch.Tensor, prompt_images: torch.Tensor | None = None) -> torch.Tensor | MetaUASOutput:
        """Segment anomalies.

        Args:
            images: Normalised query images ``[B, 3, H, W]``.
            prompt_images: Optional normalised prompts for each query, ``[B, 3, H, W]`` (one each) or
                ``[B, k, 3, H, W]``. When given, they are used instead of the prompt bank.

        Returns:
            In training mode the logits ``[B, 1, H, W]``; in eval mode a :class:`MetaUASOutput` with the sigmoid
            ``anomaly_map`` ``[B, H, W]`` and ``pred_score`` (its maximum) ``[B]``.
        """
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            logits = self._logits(images, prompt_images)
        if self.training:
            return logits
        anomaly_map = logits.sigmoid().squeeze(1)
        return MetaUASOutput(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)

    def _logits(self, images: torch.Tensor, prompt_images: torch.Tensor | None) -> torch.Tensor:
        if prompt_images is None:
            query_levels = self.encode_images(images)
            bank = self.prompt_bank
            index = self.select_prompts(query_levels[-1], bank[0])
            self.last_prompt_index = index
        else:
            if prompt_images.dim() == 4:
                prompt_images = prompt_images.unsqueeze(1)
            batch, shots = prompt_images.shape[:2]
            # One encoder call for queries and prompts: the frozen encoder treats every image on its own.
            levels = self.encode_images(torch.cat([images, prompt_images.flatten(0, 1)]))
            query_levels = [level[:batch] for level in levels]
            bank = [levels[-1 - level][batch:] for level in range(ALIGNED_LEVELS)]
            index = torch.arange(batch * shots, device=images.device).view(batch, shots)
            self.last_prompt_index = None
        return self.segment(query_levels, bank, index)
