# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS checkpoint files: the official key format, and self-describing checkpoints trained with this package.

The official files (``metauas-256.ckpt``, ``metauas-512.ckpt``) are plain state_dicts of the authors' module:
a lukemelas EfficientNet-b4 under ``encoder.`` (including the classification head, which forward never uses),
``alignment.<i>.alignment_layer.dimensionality_reduction``, an smp-fork UNet decoder whose SCSE modules sit
under ``attention<n>.attention`` and ``mask_head``. :func:`to_official` writes that key format.

Checkpoints trained with this package (:func:`save_checkpoint`) wrap such a state_dict with the architecture it was
trained with: ``{"state_dict": <official-format tensors>, "architecture": {"backbone", "fusion",
"decoder_channels", "image_size"}}``. :func:`read_checkpoint` reads both kinds (``weights_only=True``) and returns
the architecture too (the official b4 layout for the official files), so one call builds the right network
(:meth:`MetaUAS.from_checkpoint`). Files written before checkpoints carried their architecture still load with
:meth:`MetaUAS.from_official_checkpoint` and explicit ``backbone``, ``fusion`` and ``decoder_channels``.

Example:
    >>> from anomalib_uas.models.metauas.checkpoint import read_architecture
    >>> read_architecture("checkpoints/metauas/metauas.pth")["backbone"]  # doctest: +SKIP
    'efficientnet_lite0'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomalib_uas.models.components.backbones import lukemelas_to_timm
from anomalib_uas.weights import OFFICIAL_WEIGHTS, WeightsError, WeightsNotFoundError, known_source_of, resolve_weights

__all__ = [
    "OFFICIAL_ARCHITECTURE",
    "OFFICIAL_BACKBONE",
    "from_official",
    "read_architecture",
    "read_checkpoint",
    "recorded_architecture",
    "resolve_checkpoint",
    "save_checkpoint",
    "to_official",
]

OFFICIAL_BACKBONE = "tf_efficientnet_b4"
OFFICIAL_ARCHITECTURE: dict[str, Any] = {
    "backbone": OFFICIAL_BACKBONE,
    "fusion": "cat",
    "decoder_channels": [256, 128, 64, 64, 48],
    "image_size": None,
}
"""The architecture of the official files; ``image_size`` is 256 or 512 for the two published files."""

ARCHITECTURE_FIELDS = ("backbone", "fusion", "decoder_channels", "image_size")
_FUSIONS = ("cat", "add", "absdiff")
_OFFICIAL_SHAPES = {
    "encoder._conv_stem.weight": (48, 3, 3, 3),
    "encoder._blocks.31._project_conv.weight": (448, 2688, 1, 1),
    "decoder.blocks.0.conv1.0.weight": (256, 1216, 3, 3),
    "decoder.blocks.4.conv1.0.weight": (48, 64, 3, 3),
    "mask_head.weight": (1, 48, 1, 1),
}
_MISSING_HINT = (
    "The offline MetaUAS checkpoint is made by `uas weights metauas` (or `dvc repro`) at "
    "checkpoints/metauas/metauas.pth; the official ones are metauas-256 and metauas-512."
)

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


def _check_keys(keys: list[str], path: str | Path) -> None:
    expected = ("encoder.", "alignment.", "decoder.", "mask_head.")
    if not keys or not all(k.startswith(expected) for k in keys) or not any(k.startswith("decoder.") for k in keys):
        msg = f"{path} is not a MetaUAS checkpoint. {_describe(keys)}"
        raise WeightsError(msg)


def _check_architecture(architecture: Any, path: str | Path) -> dict[str, Any]:
    problem = f"{path} has a malformed MetaUAS architecture record ({architecture!r}); train it again."
    if not isinstance(architecture, dict) or set(architecture) != set(ARCHITECTURE_FIELDS):
        raise WeightsError(problem)
    channels, size = architecture["decoder_channels"], architecture["image_size"]
    valid = (
        isinstance(architecture["backbone"], str)
        and architecture["fusion"] in _FUSIONS
        and isinstance(channels, (list, tuple))
        and len(channels) == 5
        and all(isinstance(c, int) and c > 0 for c in channels)
        and (size is None or (isinstance(size, int) and size > 0 and size % 32 == 0))
    )
    if not valid:
        raise WeightsError(problem)
    return {**architecture, "decoder_channels": list(channels)}


def _is_official_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(key in state_dict and tuple(state_dict[key].shape) == shape for key, shape in _OFFICIAL_SHAPES.items())


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a MetaUAS checkpoint file (official or trained with this package) safely.

    Args:
        path: A local file.

    Returns:
        ``(state_dict, architecture)``: the official-format tensors, and the architecture record (``backbone``,
        ``fusion``, ``decoder_channels``, ``image_size``); for the official b4 layout :data:`OFFICIAL_ARCHITECTURE`
        with the training size of a known published file; ``None`` for other files without a record.

    Raises:
        WeightsNotFoundError: The file does not exist.
        WeightsError: The file is not a MetaUAS checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"MetaUAS checkpoint {path} does not exist. {_MISSING_HINT}"
        raise WeightsNotFoundError(msg)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for files that are not checkpoints
        msg = f"{path} is not a MetaUAS checkpoint: torch cannot read it ({type(exc).__name__}). {_MISSING_HINT}"
        raise WeightsError(msg) from exc
    architecture = None
    if isinstance(content, dict) and "architecture" in content:
        architecture = _check_architecture(content["architecture"], path)
        content = content.get("state_dict")
    elif isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        msg = f"{path} is not a MetaUAS checkpoint: it holds no state_dict of tensors. {_MISSING_HINT}"
        raise WeightsError(msg)
    _check_keys(list(content), path)
    if architecture is None and _is_official_layout(content):
        known = known_source_of(path)
        architecture = {**OFFICIAL_ARCHITECTURE, "image_size": known.image_size if known is not None else None}
    return content, architecture


def resolve_checkpoint(source: str | Path) -> Path:
    """Resolve a MetaUAS checkpoint like :func:`~anomalib_uas.weights.resolve_weights`, saying how to get a missing one.

    Args:
        source: A local file, a URL, or ``"metauas-256"`` / ``"metauas-512"``.

    Returns:
        The local file.

    Raises:
        WeightsNotFoundError: The file does not exist and cannot be fetched.
        WeightsError: A published file whose sha256 does not match.
    """
    try:
        return resolve_weights(str(source))
    except WeightsNotFoundError as exc:
        msg = f"{exc} {_MISSING_HINT}"
        raise WeightsNotFoundError(msg) from exc


def recorded_architecture(source: str | Path) -> dict[str, Any] | None:
    """The architecture recorded for a MetaUAS checkpoint, ``None`` for an official-format file without a record.

    Args:
        source: A local file, a URL, or ``"metauas-256"`` / ``"metauas-512"`` (known without reading the file).

    Returns:
        See :func:`read_checkpoint`.

    Raises:
        WeightsNotFoundError: The file does not exist and cannot be fetched.
        WeightsError: The file is not a MetaUAS checkpoint.
    """
    text = str(source)
    if text in OFFICIAL_WEIGHTS:
        return {**OFFICIAL_ARCHITECTURE, "image_size": OFFICIAL_WEIGHTS[text].image_size}
    return read_checkpoint(resolve_checkpoint(text))[1]


def read_architecture(source: str | Path) -> dict[str, Any]:
    """The architecture a MetaUAS checkpoint needs, read from the file: the check that a file is usable.

    Args:
        source: A local file, a URL, or ``"metauas-256"`` / ``"metauas-512"`` (resolved as for loading).

    Returns:
        ``{"backbone", "fusion", "decoder_channels", "image_size"}``; ``image_size`` is the training size, or
        ``None`` when unknown (an official-layout file that is not one of the published ones).

    Raises:
        WeightsNotFoundError: The file does not exist and cannot be fetched.
        WeightsError: The file is not a MetaUAS checkpoint, or one without an architecture record (written
            before checkpoints carried it: load it with :meth:`MetaUAS.from_official_checkpoint` and explicit
            ``backbone``, ``fusion`` and ``decoder_channels``, or train it again).
    """
    architecture = recorded_architecture(source)
    if architecture is None:
        msg = (
            f"{source} is a MetaUAS state_dict without an architecture record: load it with "
            "MetaUAS.from_official_checkpoint(path, backbone=..., fusion=..., decoder_channels=...) or train it again."
        )
        raise WeightsError(msg)
    return architecture


def save_checkpoint(model: nn.Module, path: str | Path, image_size: int) -> Path:
    """Write a self-describing checkpoint: the official-format state_dict and the architecture it needs.

    The file is written next to its destination first and then renamed, so a reader never sees half a file.

    Args:
        model: A ``MetaUASModel``.
        path: Output file.
        image_size: The size the model was trained at.

    Returns:
        ``path``.
    """
    path = Path(path)
    architecture = {
        "backbone": model.backbone,
        "fusion": model.alignment[0].fusion,
        "decoder_channels": [block.conv2[0].out_channels for block in model.decoder.blocks],
        "image_size": int(image_size),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    torch.save({"architecture": architecture, "state_dict": to_official(model)}, partial)
    partial.replace(path)
    return path


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
