# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""``status.json`` of a weights stage: whether a model is ready, its files and how to build it, or why it is skipped.

File paths in it are relative to its own folder (``checkpoints/<model>``), so the folder can be moved, pulled with
``dvc pull`` or copied to another machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models import get_spec
from anomalib_uas.stages import StageError

if TYPE_CHECKING:
    from anomalib_uas.params import Params

__all__ = ["STATUS_FILE", "Status", "model_kwargs", "read_status"]

STATUS_FILE = "status.json"


@dataclass(frozen=True)
class Status:
    """What the weights stage decided for a model.

    Args:
        folder: The weights stage's output folder.
        ready: Whether the model can be evaluated.
        reason: Why the model is skipped (which files are missing and how to supply them).
        description: What the weights are and where they came from.
        checkpoint: The checkpoint file's name in ``folder``.
        clip_weights: The CLIP weights file's name in ``folder``, for CLIP models that need one.
        kwargs: Architecture arguments the checkpoint is built with.
        extra: Training facts (minutes, MLflow run id).
    """

    folder: Path
    ready: bool
    reason: str = ""
    description: str = ""
    checkpoint: str = ""
    clip_weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint file."""
        return self.folder / self.checkpoint

    @property
    def clip_weights_path(self) -> Path | None:
        """The CLIP weights file, if the model needs one besides its checkpoint."""
        return None if self.clip_weights is None else self.folder / self.clip_weights

    def to_json(self) -> dict[str, Any]:
        """The content of ``status.json``.

        Returns:
            ``{"status": "ready", ...}`` or ``{"status": "skipped", "reason": ...}``.
        """
        if not self.ready:
            return {"status": "skipped", "reason": self.reason}
        return {
            "status": "ready",
            "description": self.description,
            "checkpoint": self.checkpoint,
            "clip_weights": self.clip_weights,
            "kwargs": self.kwargs,
            **self.extra,
        }


def read_status(folder: Path) -> Status:
    """Read a weights stage's ``status.json``.

    Args:
        folder: The weights stage's output folder (``checkpoints/<model>``).

    Returns:
        The status.

    Raises:
        StageError: The weights stage has not run (or its output is not a weights folder).
    """
    path = folder / STATUS_FILE
    if not path.is_file():
        msg = f"{path} is missing: run the weights stage first (`dvc repro weights@{folder.name}`)"
        raise StageError(msg)
    content = json.loads(path.read_text())
    if content["status"] != "ready":
        return Status(folder=folder, ready=False, reason=content["reason"])
    known = {"status", "description", "checkpoint", "clip_weights", "kwargs"}
    return Status(
        folder=folder,
        ready=True,
        description=content["description"],
        checkpoint=content["checkpoint"],
        clip_weights=content.get("clip_weights"),
        kwargs=content.get("kwargs", {}),
        extra={key: value for key, value in content.items() if key not in known},
    )


def model_kwargs(model: str, status: Status, params: Params) -> dict[str, Any]:
    """A model's class arguments besides its files, as evaluated and as registered.

    Args:
        model: Model name.
        status: Its weights stage's status (architecture arguments).
        params: Pipeline parameters (the ``evaluate`` section).

    Returns:
        Keyword arguments for :func:`~anomalib_uas.models.loading.load_model`.
    """
    return {**status.kwargs, **get_spec(model).evaluation_kwargs(params.evaluate)}
