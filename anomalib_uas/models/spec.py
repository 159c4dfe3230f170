# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""What the pipeline, the registry and serving need to know of a model, declared once per model package.

Each model package has a ``spec.py`` with one :class:`ModelSpec`; :func:`anomalib_uas.models.get_spec` looks it up
by name. Code outside a model's folder asks the spec and never branches on model names.

A spec answers: which ``AnomalibModule`` class it is and whether it takes normal prompt images; how a weights
source named in ``params.yaml`` (``weights.<model>``) becomes local files (:attr:`ModelSpec.fetch`); how the model is
trained when that source is ``train`` (:attr:`ModelSpec.train`); which evaluation parameters it takes
(:attr:`ModelSpec.evaluation_kwargs`); what a served model needs once before requests
(:attr:`ModelSpec.prepare_serving`). :func:`anomalib_uas.models.loading.load_model` builds any model from its
files through its spec's class.

The torch models share one protocol: ``embed(images) -> (N, D)`` global image embeddings (the review's similarity
search uses them) and, for prompted models, ``set_prompts(images)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule
    from lightning.pytorch.loggers import Logger
    from torch import nn

    from anomalib_uas.params import EvaluateParams, Params

__all__ = ["ModelFiles", "ModelSpec"]


@dataclass(frozen=True)
class ModelFiles:
    """The files a weights source resolved to, and what the model needs besides them.

    Args:
        checkpoint: The model's checkpoint (official format).
        description: One line for reports: what the weights are and where they came from.
        clip_weights: The CLIP weights file, for CLIP models whose checkpoint holds no CLIP tower.
        kwargs: Architecture arguments the checkpoint needs to be built (e.g. ``clip_model``, ``image_size``).
        extra: More facts for ``status.json`` (training minutes, MLflow run id).
    """

    checkpoint: Path
    description: str
    clip_weights: Path | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One model as the pipeline, the registry and serving see it.

    Args:
        name: The model's name in ``params.yaml`` (``models``, ``weights.<name>``, ``train.<name>``).
        module_class: The ``AnomalibModule`` subclass; its ``from_official_checkpoint`` builds it from its files.
        takes_prompts: Whether the model scores a query against normal prompt images.
        uses_clip: Whether the model has a CLIP backbone (whose weights may be a separate file).
        fetch: ``(source, params, weights_dir, output) -> ModelFiles`` for any ``weights.<name>`` value but
            ``train``; a file it makes goes into ``output``. It raises
            :class:`~anomalib_uas.weights.WeightsNotFoundError` only where a missing file means the model is skipped
            (documented per model), and :class:`~anomalib_uas.weights.WeightsError` for a source that does not
            resolve to a usable file.
        train: ``(params, weights_dir, output_dir, logger) -> ModelFiles`` for ``weights.<name>: train``; it
            writes into ``output_dir``.
        evaluation_kwargs: The model arguments taken from the ``evaluate`` section (k-shot, prompt strategy, ...).
        official_files: Where the official files come from, for messages and READMEs.
        prompt_pool: The class argument that takes a list of normal images to draw or retrieve prompts from
            (``None`` for zero-shot models): the pipeline adds reviewers' feedback normals to it.
        optional: Whether a missing file makes the model skipped (with the files named) instead of failing the
            weights stage.
        prepare_serving: ``(torch model, category) -> None``: what a served torch model needs once before
            requests, after its prompts are set (the category's text features, cached text features); ``None``
            when it needs nothing.
    """

    name: str
    module_class: type[AnomalibModule]
    takes_prompts: bool
    uses_clip: bool
    fetch: Callable[[str, Params, Path, Path], ModelFiles]
    train: Callable[[Params, Path, Path, Logger | bool], ModelFiles]
    evaluation_kwargs: Callable[[EvaluateParams], dict[str, Any]]
    official_files: str
    prompt_pool: str | None = None
    optional: bool = False
    prepare_serving: Callable[[nn.Module, str], None] | None = None
