# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""open_clip models for the CLIP-based methods: loading with clear offline errors, and tiny test configs.

:func:`load_clip` builds an open_clip model from

* a local file: a state_dict in open_clip / OpenAI key names (read with ``weights_only=True``), or an OpenAI
  TorchScript release, which is loaded only after its sha256 matched the hash in one of the OpenAI download URLs
  that open_clip lists (loading TorchScript runs the code in the archive, so no other archive is ever loaded),
* an open_clip pretrained tag, fetched from the publisher's URL (with open_clip's own checksum where it has one)
  into the weights cache, or
* nothing (random initialisation, for tests).

Offline, a missing file raises :class:`~anomalib_uas.weights.WeightsNotFoundError` naming the file, where to get
it and how to pass it. Tiny configurations (``uas-tiny-*``) with the layer counts and patch geometry of the real
models but narrow widths are registered with open_clip so that tests run the real code paths without weights.

open_clip 3.x transformers are batch-first; :func:`is_batch_first` tells code that walks the blocks by hand.

Example:
    >>> from anomalib_uas.models.components.clip import load_clip
    >>> model = load_clip("uas-tiny-ViT-B-16-plus-240")
    >>> model.visual.image_size
    (240, 240)
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import open_clip
import torch
from torch import nn

from anomalib_uas.weights import WeightsError, load_state_dict, resolve_weights, sha256sum

logger = logging.getLogger(__name__)

__all__ = ["TINY_CONFIGS", "is_batch_first", "load_clip"]

_CONFIG_DIR = Path(__file__).with_name("clip_configs")
open_clip.add_model_config(_CONFIG_DIR)

TINY_CONFIGS = tuple(sorted(path.stem for path in _CONFIG_DIR.glob("*.json")))
_OPENAI_URL_HASH = re.compile(r"openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/")


def is_batch_first(transformer: nn.Module) -> bool:
    """Whether an open_clip transformer is batch-first (``[B, N, D]``, open_clip >= 2.26.1) or ``[N, B, D]``.

    Args:
        transformer: ``model.visual.transformer`` or ``model.transformer``.

    Returns:
        ``True`` for batch-first layout.
    """
    return bool(getattr(transformer, "batch_first", False))


@functools.cache
def openai_release_hashes() -> frozenset[str]:
    """The sha256 digests of the OpenAI CLIP releases, read from the download URLs open_clip lists.

    Returns:
        Lower-case hex digests.
    """
    urls = ((open_clip.get_pretrained_cfg(name, tag) or {}).get("url", "") for name, tag in open_clip.list_pretrained())
    return frozenset(match.group(1) for url in urls if (match := _OPENAI_URL_HASH.search(url)))


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(path)
    except WeightsError as exc:
        digest = sha256sum(path)
        if digest not in openai_release_hashes():
            msg = (
                f"{path} is not a state_dict readable with weights_only=True, nor an OpenAI CLIP release (its sha256 "
                f"{digest[:16]}... matches none), so it is not loaded: TorchScript archives run code on load. Save "
                "the weights as a state_dict (torch.save(model.state_dict(), path)) and pass that file."
            )
            raise WeightsError(msg) from exc
    # An OpenAI release verified by its published hash: its TorchScript state_dict holds the CLIP keys.
    return torch.jit.load(path, map_location="cpu").state_dict()


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    force_quick_gelu: bool = False,
) -> nn.Module:
    """Build an open_clip model, optionally with weights.

    Args:
        model_name: open_clip model name, e.g. ``"ViT-B-16-plus-240"`` or ``"uas-tiny-ViT-B-16-plus-240"``.
        pretrained: open_clip pretrained tag (``"laion400m_e32"``, ``"openai"``); ignored when ``weights`` is given.
        weights: Local file with the CLIP weights.
        force_quick_gelu: Use QuickGELU activations (the OpenAI models).

    Returns:
        The model in eval mode, parameters frozen.

    Raises:
        WeightsNotFoundError: The weights are neither given nor obtainable.
        WeightsError: The file does not fit the model.
    """
    if weights is None and pretrained is not None:
        config = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not config or not config.get("url"):
            msg = f"open_clip has no download address for {model_name} / {pretrained}; pass weights=<local file>."
            raise WeightsError(msg)
        weights = resolve_weights(config["url"])
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=force_quick_gelu)
    if weights is not None:
        state_dict = _state_dict_from(Path(weights))
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        state_dict = {k: v for k, v in state_dict.items() if k in model.state_dict() or k == "logit_scale"}
        missing, _ = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k != "logit_scale"]
        if missing:
            msg = (
                f"{weights} does not hold the weights of {model_name}: {len(missing)} tensors are missing "
                f"(e.g. {missing[:3]})."
            )
            raise WeightsError(msg)
        logger.info("Loaded %s weights from %s", model_name, weights)
    model.requires_grad_(False)
    return model.eval()
