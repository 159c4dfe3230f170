# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Key handling between the official InCTRL checkpoints and :class:`InCTRLModel`.

The official files (``checkpoints/{2,4,8}/checkpoint.pyth``) are plain state_dicts of the authors' whole
``InCTRL`` module: the frozen CLIP in open_clip key names at the top level (``visual.*``, ``transformer.*``,
``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``, ``text_projection``; no ``logit_scale``) and
the trained parts ``adapter.*``, ``diff_head.*`` and ``diff_head_ref.*``. :class:`InCTRLModel` keeps the same
names for the trained parts and holds the CLIP under ``clip.``. Files of the trained parts only, files saved from a
``DistributedDataParallel`` module (``module.`` prefix) and Lightning checkpoints of this package load as well.
:func:`to_official` writes the official format.

Example:
    >>> from anomalib_uas.models.inctrl.checkpoint import split_official
    >>> from anomalib_uas.weights import load_state_dict
    >>> parts = split_official(load_state_dict("checkpoint.pyth"))  # doctest: +SKIP
    >>> parts.clip is not None  # doctest: +SKIP
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from anomalib_uas.models.inctrl.torch_model import InCTRLModel
from anomalib_uas.weights import WeightsError, load_state_dict, resolve_weights

__all__ = ["TRAINED_PREFIXES", "OfficialParts", "load_official", "read_official", "split_official", "to_official"]

TRAINED_PREFIXES = ("adapter.", "diff_head.", "diff_head_ref.")
_LIGHTNING_PREFIX = "model."
_CLIP_MARKER = "visual.conv1.weight"
_CLIP_KEYS_NOT_IN_FILES = ("logit_scale",)


class OfficialParts(NamedTuple):
    """An official-format state_dict split into its parts.

    Attributes:
        trained: The ``adapter.*``, ``diff_head.*`` and ``diff_head_ref.*`` tensors.
        clip: The CLIP tensors in open_clip key names, or ``None`` when the file holds none.
    """

    trained: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor] | None


def _describe(keys: list[str]) -> str:
    if any(k.startswith(("encoder.", "mask_head.")) for k in keys):
        return "This looks like a MetaUAS checkpoint: load it with MetaUAS.from_official_checkpoint()."
    if any(k.startswith(("prompt_learner", "ctx")) for k in keys):
        return "This looks like a FAPrompt checkpoint: load it with FAPrompt.from_official_checkpoint()."
    if any(k.startswith("visual.") for k in keys):
        return "It holds CLIP weights only: pass it as clip_weights and give the trained InCTRL file as weights."
    return "Expected adapter.*, diff_head.* and diff_head_ref.* keys (the official checkpoint.pyth files)."


def read_official(source: str | Path) -> dict[str, torch.Tensor]:
    """Read an InCTRL checkpoint file safely (``weights_only``) and return its state_dict.

    Besides plain state_dicts and Lightning checkpoints (``"state_dict"``), the official loader's
    ``{"model_state": ...}`` wrapping is accepted.

    Args:
        source: Local path or URL of the file.

    Returns:
        The state_dict.

    Raises:
        WeightsError: The file is not a readable checkpoint of tensors.
    """
    path = resolve_weights(source)
    try:
        return load_state_dict(path)
    except WeightsError:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable: load_state_dict's error already says so
            content = None
        state = content.get("model_state") if isinstance(content, dict) else None
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        raise


def split_official(state_dict: dict[str, torch.Tensor]) -> OfficialParts:
    """Split an official-format InCTRL state_dict into the trained parts and the CLIP tower.

    Args:
        state_dict: An official checkpoint, a file of the trained parts, or a Lightning checkpoint's state_dict.

    Returns:
        The parts.

    Raises:
        WeightsError: The state_dict holds no InCTRL adapter and heads.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if not any(k.startswith(TRAINED_PREFIXES) for k in state_dict) and any(
        k.startswith(_LIGHTNING_PREFIX) for k in state_dict
    ):
        state_dict = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_LIGHTNING_PREFIX)}
        state_dict = {k.removeprefix("clip."): v for k, v in state_dict.items()}
    trained = {k: v for k, v in state_dict.items() if k.startswith(TRAINED_PREFIXES)}
    if not trained:
        msg = f"Not an InCTRL checkpoint. {_describe(list(state_dict))}"
        raise WeightsError(msg)
    clip = None
    if _CLIP_MARKER in state_dict:
        clip = {k: v for k, v in state_dict.items() if not k.startswith(TRAINED_PREFIXES)}
    return OfficialParts(trained=trained, clip=clip)


def _load(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str, ignore_missing: tuple) -> None:
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        msg = f"The {what} of this checkpoint do not fit the model: {detail}"
        raise WeightsError(msg) from exc
    missing = [k for k in missing if k not in ignore_missing]
    unexpected = [k for k in unexpected if k != "attn_mask"]
    if missing or unexpected:
        msg = (
            f"The {what} of this checkpoint do not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )
        raise WeightsError(msg)


def load_official(model: InCTRLModel, parts: OfficialParts, load_clip: bool = True) -> None:
    """Load split official weights into a model.

    Args:
        model: The target model.
        parts: What :func:`split_official` returned.
        load_clip: Also load the CLIP tower when the file holds one.

    Raises:
        WeightsError: The tensors do not fit the model (another CLIP size, missing head keys, ...).
    """
    trained_keys = {k for k in model.state_dict() if k.startswith(TRAINED_PREFIXES)}
    missing = sorted(trained_keys - set(parts.trained))
    if missing:
        msg = f"The checkpoint lacks {len(missing)} trained InCTRL tensors (e.g. {missing[:3]})."
        raise WeightsError(msg)
    trained = {k: parts.trained[k] for k in trained_keys}
    for prefix in TRAINED_PREFIXES:
        name = prefix.rstrip(".")
        own = {k[len(prefix) :]: v for k, v in trained.items() if k.startswith(prefix)}
        _load(getattr(model, name), own, f"{name} weights", ())
    if load_clip and parts.clip is not None:
        _load(model.clip, parts.clip, "CLIP weights", _CLIP_KEYS_NOT_IN_FILES)
        model.clear_text_cache()


def to_official(model: InCTRLModel, include_clip: bool = True) -> dict[str, torch.Tensor]:
    """Write a model's weights in the official key format.

    Args:
        model: The model.
        include_clip: Include the frozen CLIP tower (the official files do); without it the result holds only the
            trained parts (about 1.3 MB for ViT-B-16-plus-240).

    Returns:
        The state_dict.
    """
    out = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    if include_clip:
        clip = model.clip.state_dict()
        out.update({k: v.detach().clone() for k, v in clip.items() if k not in _CLIP_KEYS_NOT_IN_FILES})
    return out
