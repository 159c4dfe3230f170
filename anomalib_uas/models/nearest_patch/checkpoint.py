# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Nearest-patch checkpoint files: the frozen encoder's weights and the architecture they belong to.

A checkpoint is ``{"architecture": {"backbone", "levels", "pool"}, "state_dict": <encoder tensors>}``, written by
:func:`save_checkpoint` and read by :func:`read_checkpoint` with ``weights_only=True``. Since nothing is trained, the
file only pins the ImageNet weights the model was evaluated with, so that a registered version serves them without
a download.

Example:
    >>> from anomalib_uas.models.nearest_patch.checkpoint import read_checkpoint
    >>> architecture, state_dict = read_checkpoint("checkpoints/nearest_patch/nearest_patch.pth")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomalib_uas.weights import WeightsError

__all__ = ["ARCHITECTURE_FIELDS", "read_checkpoint", "save_checkpoint"]

ARCHITECTURE_FIELDS = ("backbone", "levels", "pool")


def save_checkpoint(encoder: nn.Module, architecture: dict[str, Any], path: Path) -> Path:
    """Write an encoder's weights with the architecture they belong to.

    Args:
        encoder: The frozen encoder.
        architecture: ``backbone``, ``levels`` and ``pool``.
        path: The file to write.

    Returns:
        ``path``.
    """
    record = {key: architecture[key] for key in ARCHITECTURE_FIELDS}
    record["levels"] = [int(level) for level in record["levels"]]
    torch.save({"architecture": record, "state_dict": encoder.state_dict()}, path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a nearest-patch checkpoint (tensors and plain data only).

    Args:
        path: The file.

    Returns:
        The architecture and the encoder's state dict.

    Raises:
        WeightsError: The file is missing, unreadable, or not a nearest-patch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path} does not exist: run `uas weights nearest_patch` (weights.nearest_patch: imagenet)"
        raise WeightsError(msg)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"{path} is not a readable torch file ({type(exc).__name__}): write it again with `uas weights`"
        raise WeightsError(msg) from exc
    architecture = content.get("architecture") if isinstance(content, dict) else None
    if not isinstance(architecture, dict) or set(architecture) != set(ARCHITECTURE_FIELDS):
        msg = f"{path} is not a nearest-patch checkpoint (no architecture record of {', '.join(ARCHITECTURE_FIELDS)})"
        raise WeightsError(msg)
    return architecture, content["state_dict"]
