# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Key handling between official FAPrompt checkpoints and :class:`CompoundPromptLearner`.

The official files (``epoch_N.pth``) are ``{"prompt_learner": state_dict}``: the learned context tokens with
leading class dimensions (``ctx_pos [1, 1, 5, D]``, ``ctx_neg [1, 10, 2, D]``), the frozen token-embedding
buffers (``token_prefix_*``, ``token_suffix_*``), the token ids (``tokenized_prompts_*``, int32), the prior MLP
(``patch_meta_net.linear{1,2}``), the deep text prompts (``compound_prompts_text.{0..7}``) and eight projections
(``compound_prompt_projections.*``) that the official forward never uses. The CLIP weights are not in the file.

:func:`read_official` accepts that format, a bare prompt-learner state_dict, keys prefixed ``prompt_learner.``
and Lightning checkpoints of this package. :func:`to_official` writes the official format (the unused
projections as zeros, so that the official code loads the file with ``strict=True``).

Example:
    >>> from anomalib_uas.models.faprompt.checkpoint import read_official
    >>> state_dict = read_official("epoch_15.pth")  # doctest: +SKIP
    >>> state_dict["ctx_pos"].shape  # doctest: +SKIP
    torch.Size([1, 1, 5, 768])
"""

from __future__ import annotations

from pathlib import Path

import torch

from anomalib_uas.models.faprompt.prompt_learner import CompoundPromptLearner
from anomalib_uas.weights import WeightsError, WeightsNotFoundError

__all__ = ["from_official", "read_official", "to_official"]

_UNUSED_PREFIX = "compound_prompt_projections."
_TOKEN_KEYS = ("tokenized_prompts_pos", "tokenized_prompts_neg")
_LIGHTNING_PREFIX = "model.prompt_learner."
_OFFICIAL_PROJECTION_WIDTH = 896


def _describe(keys: list[str]) -> str:
    if any(k.startswith(("encoder.", "mask_head.")) for k in keys):
        return "This looks like a MetaUAS checkpoint: load it with MetaUAS.from_official_checkpoint()."
    if any(k.startswith(("adapter.", "diff_head")) for k in keys):
        return "This looks like an InCTRL checkpoint: load it with InCTRL.from_official_checkpoint()."
    if any(k.startswith(("visual.", "transformer.")) for k in keys):
        return "It holds CLIP weights: pass it as clip_weights and the FAPrompt epoch_N.pth file as path."
    return "Expected {'prompt_learner': {ctx_pos, ctx_neg, patch_meta_net.*, compound_prompts_text.*, ...}}."


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a FAPrompt prompt-learner checkpoint.

    Args:
        path: An official ``epoch_N.pth`` (``{"prompt_learner": ...}``), a bare prompt-learner state_dict, or a
            Lightning checkpoint of this package.

    Returns:
        The prompt-learner state_dict in official key names and shapes as stored (no prefix).

    Raises:
        WeightsNotFoundError: The file does not exist.
        WeightsError: The file cannot be read or holds no FAPrompt prompt learner.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"FAPrompt checkpoint {path} does not exist; pass the path of the epoch_N.pth file."
        raise WeightsNotFoundError(msg)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"Cannot read FAPrompt checkpoint {path}: {type(exc).__name__}: {exc}."
        raise WeightsError(msg) from exc
    if isinstance(content, dict) and isinstance(content.get("prompt_learner"), dict):
        content = content["prompt_learner"]
    elif isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        msg = f"{path} does not hold a FAPrompt prompt learner (found {type(content).__name__})."
        raise WeightsError(msg)
    if any(k.startswith(_LIGHTNING_PREFIX) for k in content):
        content = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in content.items() if k.startswith(_LIGHTNING_PREFIX)}
    content = {k.removeprefix("module.").removeprefix("prompt_learner."): v for k, v in content.items()}
    if "ctx_pos" not in content or "ctx_neg" not in content:
        msg = f"{path} is not a FAPrompt checkpoint. {_describe(list(content))}"
        raise WeightsError(msg)
    return content


def from_official(state_dict: dict[str, torch.Tensor], learner: CompoundPromptLearner) -> dict[str, torch.Tensor]:
    """Map an official prompt-learner state_dict onto the keys and shapes of ``learner``.

    The leading class dimensions of the official tensors are dropped, the unused projections are left out and
    the token ids are checked against the learner's prompts.

    Args:
        state_dict: Official state_dict (from :func:`read_official`).
        learner: The target prompt learner.

    Returns:
        A state_dict that ``learner.load_state_dict(..., strict=True)`` accepts.

    Raises:
        WeightsError: The tensors do not fit the learner (another CLIP width, other prompt lengths or words).
    """
    expected = learner.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(_UNUSED_PREFIX):
            continue
        if key in _TOKEN_KEYS:
            _check_tokens(key, tensor, learner)
            continue
        if key not in expected:
            msg = f"Unexpected key {key!r} in the FAPrompt checkpoint; it does not fit this prompt learner."
            raise WeightsError(msg)
        target = expected[key]
        if tensor.numel() != target.numel():
            msg = (
                f"{key} has shape {tuple(tensor.shape)} in the checkpoint but the prompt learner expects "
                f"{tuple(target.shape)} (plus leading class dimensions); the CLIP backbone or the prompt lengths "
                "differ from the checkpoint's."
            )
            raise WeightsError(msg)
        mapped[key] = tensor.reshape(target.shape).to(target.dtype)
    missing = sorted(set(expected) - set(mapped))
    if missing:
        msg = f"The FAPrompt checkpoint lacks {len(missing)} tensors of the prompt learner, e.g. {missing[:3]}."
        raise WeightsError(msg)
    return mapped


def _check_tokens(key: str, tensor: torch.Tensor, learner: CompoundPromptLearner) -> None:
    row = 0 if key.endswith("pos") else 1
    ours = learner.token_ids[row].to(torch.int64)
    theirs = tensor.to(torch.int64).reshape(-1, tensor.shape[-1])
    if theirs.shape[-1] != ours.shape[-1] or not bool((theirs == ours).all()):
        msg = (
            f"The checkpoint's {key} differ from this prompt learner's prompts {ours[: int(ours.argmax()) + 1]}; "
            "it was trained with other prompt words or lengths."
        )
        raise WeightsError(msg)


def to_official(learner: CompoundPromptLearner) -> dict[str, torch.Tensor]:
    """Write a prompt learner in the official ``prompt_learner`` state_dict format.

    Args:
        learner: The prompt learner.

    Returns:
        The official state_dict; save it as ``torch.save({"prompt_learner": ...}, "epoch_N.pth")``. The unused
        ``compound_prompt_projections`` are zeros.
    """
    width = learner.ctx_pos.shape[-1]
    prompts, tokens = learner.abnormal_prompts, learner.abnormal_tokens
    shapes = {
        "ctx_pos": (1, 1, learner.normal_tokens, width),
        "ctx_neg": (1, prompts, tokens, width),
        "token_prefix_pos": (1, 1, 1, width),
        "token_suffix_pos": (1, 1, -1, width),
        "token_prefix_neg": (1, prompts, 1, width),
        "token_suffix_neg": (1, prompts, -1, width),
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in learner.state_dict().items():
        shape = shapes.get(key)
        out[key] = (tensor.reshape(shape) if shape is not None else tensor).detach().clone().cpu()
    token_ids = learner.token_ids.to(torch.int32)
    out["tokenized_prompts_pos"] = token_ids[0].reshape(1, 1, -1).clone()
    out["tokenized_prompts_neg"] = token_ids[1].reshape(1, 1, -1).expand(1, prompts, -1).clone()
    for index in range(len(learner.compound_prompts_text)):
        out[f"{_UNUSED_PREFIX}{index}.weight"] = torch.zeros(_OFFICIAL_PROJECTION_WIDTH, width)
        out[f"{_UNUSED_PREFIX}{index}.bias"] = torch.zeros(_OFFICIAL_PROJECTION_WIDTH)
    return out
