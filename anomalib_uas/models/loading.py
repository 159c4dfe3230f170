# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Build any model of the package from its checkpoint files, by name.

The pipeline (from a weights stage's ``status.json``) and the MLflow pyfunc (from a registered version's artifacts)
both build their models here, so that a registered model is the evaluated model.

Example:
    >>> from anomalib_uas.models.loading import load_model
    >>> module = load_model("metauas", "checkpoints/metauas/metauas.pth", image_size=256)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models import get_spec

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule

__all__ = ["load_model"]


def load_model(
    name: str,
    checkpoint: str | Path,
    clip_weights: str | Path | None = None,
    **kwargs: Any,
) -> AnomalibModule:
    """Build a model from its official-format checkpoint, in eval mode.

    Args:
        name: ``"metauas"``, ``"inctrl"`` or ``"faprompt"``.
        checkpoint: The model's checkpoint (official format: ``metauas.pth``, InCTRL's ``checkpoint.pyth`` or its
            trained parts, FAPrompt's ``epoch_N.pth``).
        clip_weights: Local CLIP weights file of the CLIP models; ``None`` for MetaUAS, or for an InCTRL file that
            holds its CLIP tower.
        **kwargs: Other arguments of the model's class (``image_size``, ``k_shot``, ``clip_model``, ...).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: For an unknown model name, or CLIP weights given to a model without a CLIP backbone.
    """
    spec = get_spec(name)
    if clip_weights is not None:
        if not spec.uses_clip:
            msg = f"{name} has no CLIP backbone: clip_weights must be None."
            raise ValueError(msg)
        kwargs["clip_weights"] = clip_weights
    return spec.module_class.from_official_checkpoint(checkpoint, **kwargs).eval()
