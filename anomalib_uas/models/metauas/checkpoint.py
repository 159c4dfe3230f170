# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Key mapping between the official MetaUAS checkpoints and :class:`MetaUASModel`.

The official files (``metauas-256.ckpt``, ``metauas-512.ckpt``) are plain state_dicts of the authors' module:
a lukemelas EfficientNet-b4 under ``encoder.`` (including the classification head, which forward never uses),
``alignment.<i>.alignment_layer.dimensionality_reduction``, an smp-fork UNet decoder whose SCSE modules sit
under ``attention<n>.attention`` and ``mask_head``. The same format is written by :func:`to_official` so that
checkpoints trained with this package load in the official code too.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from anomalib_uas.models.components.backbones import lukemelas_to_timm
from anomalib_uas.weights import WeightsError

__all__ = ["OFFICIAL_BACKBONE", "from_official", "to_official"]

OFFICIAL_BACKBONE = "tf_efficientnet_b4"

_OFFICIAL_ALIGNMENT = re.compile(r"^alignment\.(\d+)\.alignment_layer\.dimensionality_reduction\.")
_OFFICIAL_SCSE = re.compile(r"\.attention(\d)\.attention\.")
_OURS_ALIGNMENT = re.compile(r"^alignment\.(\d+)\.projection\.")
_OURS_SCSE = re.compile(r"\.attention(\d)\.(?=[cs]SE)")
_UNUSED_ENCODER_HEAD = ("conv_head.", "bn2.", "classifier.")
_TIMM_TO_LUKEMELAS_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0"}


def _describe(keys: list[str]) -> str:
    if any(k.startswith(("model.", "pre_processor.", "post_processor.")) for k in keys):
        return "This looks like a Lightning checkpoint of this package: load it with MetaUAS.load_from_checkpoint()."
    if any(k.startswith(("adapter.", "diff_head")) for k in keys):
        return "This looks like an InCTRL checkpoint: load it with InCTRL.from_official_checkpoint()."
    if any(k.startswith(("prompt_learner", "ctx")) for k in keys):
        return "This looks like a FAPrompt checkpoint: load it with FAPrompt.from_official_checkpoint()."
    return "It is not a MetaUAS state_dict (expected encoder.*, alignment.*, decoder.* and mask_head.* keys)."


def from_official(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official-format MetaUAS state_dict onto the keys of ``model`` (a ``MetaUASModel``).

    EfficientNet encoders in lukemelas names (the official files, and files written by :func:`to_official`) are
    renamed to timm names; other encoders are stored in timm names already.

    Args:
        state_dict: The official state_dict.
        model: The target model; its encoder blocks define the block layout.

    Returns:
        A state_dict for ``model`` without the prompt-bank buffers.

    Raises:
        WeightsError: The state_dict is not a MetaUAS checkpoint.
    """
    keys = list(state_dict)
    expected = ("encoder.", "alignment.", "decoder.", "mask_head.")
    if not keys or not all(k.startswith(expected) for k in keys) or not any(k.startswith("decoder.") for k in keys):
        msg = f"Not an official MetaUAS checkpoint. {_describe(keys)}"
        raise WeightsError(msg)
    encoder = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if any(k.startswith("_") for k in encoder):  # lukemelas EfficientNet names, as in the official files
        if not hasattr(model.encoder, "blocks"):
            msg = "This checkpoint has an EfficientNet encoder; build the model with an EfficientNet backbone."
            raise WeightsError(msg)
        try:
            encoder = lukemelas_to_timm(encoder, model.encoder.blocks)
        except KeyError as exc:
            msg = f"The encoder of this checkpoint does not fit the model's encoder: unexpected key {exc}."
            raise WeightsError(msg) from exc
    mapped = {f"encoder.{k}": v for k, v in encoder.items() if not k.startswith(_UNUSED_ENCODER_HEAD)}
    for key, tensor in state_dict.items():
        if key.startswith("encoder."):
            continue
        key = _OFFICIAL_ALIGNMENT.sub(r"alignment.\1.projection.", key)
        mapped[_OFFICIAL_SCSE.sub(r".attention\1.", key)] = tensor
    return mapped


def to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """Write a ``MetaUASModel`` state_dict in the official key format.

    EfficientNet encoders are written in lukemelas names, other encoders in timm names. The official code loads
    the files of the b4 layout; :meth:`MetaUAS.from_official_checkpoint` loads all of them.

    Args:
        model: The model to export.

    Returns:
        The state_dict in official key names (prompt bank left out).
    """
    out = {}
    flat = [f"blocks.{s}.{i}." for s, group in enumerate(model.encoder.blocks) for i in range(len(group))]
    for key, tensor in model.state_dict().items():
        if key.startswith("prompt_bank_"):
            continue
        if key.startswith("encoder.blocks.") and hasattr(model.encoder, "blocks"):
            out[_timm_block_to_lukemelas(key[len("encoder.") :], flat, model)] = tensor
            continue
        if key.startswith("encoder."):
            top, _, rest = key[len("encoder.") :].partition(".")
            if top in _TIMM_TO_LUKEMELAS_TOP:
                out[f"encoder.{_TIMM_TO_LUKEMELAS_TOP[top]}.{rest}"] = tensor
                continue
        key = _OURS_ALIGNMENT.sub(r"alignment.\1.alignment_layer.dimensionality_reduction.", key)
        out[_OURS_SCSE.sub(r".attention\1.attention.", key)] = tensor
    return out


_TIMM_TO_LUKEMELAS_EXPANDED = {
    "conv_pw": "_expand_conv",
    "bn1": "_bn0",
    "conv_dw": "_depthwise_conv",
    "bn2": "_bn1",
    "se.conv_reduce": "_se_reduce",
    "se.conv_expand": "_se_expand",
    "conv_pwl": "_project_conv",
    "bn3": "_bn2",
}
_TIMM_TO_LUKEMELAS_DS = {
    "conv_dw": "_depthwise_conv",
    "bn1": "_bn1",
    "se.conv_reduce": "_se_reduce",
    "se.conv_expand": "_se_expand",
    "conv_pw": "_project_conv",
    "bn2": "_bn2",
}


def _timm_block_to_lukemelas(key: str, flat: list[str], model: nn.Module) -> str:
    prefix = next(p for p in flat if key.startswith(p))
    stage, index = (int(x) for x in prefix.split(".")[1:3])
    block = model.encoder.blocks[stage][index]
    table = _TIMM_TO_LUKEMELAS_EXPANDED if hasattr(block, "conv_pwl") else _TIMM_TO_LUKEMELAS_DS
    rest = key[len(prefix) :]
    layer = next(name for name in table if rest.startswith(name + "."))
    return f"encoder._blocks.{flat.index(prefix)}.{table[layer]}{rest[len(layer) :]}"
