# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Normal prompt images for the models that compare a query with them (MetaUAS, InCTRL, the nearest-patch model).

The prompts of a run come, in this order, from :meth:`PromptedModelMixin.set_prompts` (fixed by the caller), from
``few_shot_source`` (a folder or a list of normal images), or from the datamodule's normal training images. With the
``random`` strategy ``k_shot`` of them are drawn with the model's seed (never from the shuffled train loader); a
strategy that retrieves prompts per query keeps them all. They are encoded once, before validation, test or predict,
by the torch model's ``set_prompts`` into buffers that Lightning checkpoints save.

Example:
    >>> class MyModel(PromptedModelMixin, UniversalModelMixin, AnomalibModule):  # doctest: +SKIP
    ...     def setup(self, stage=None):
    ...         self.collect_prompts()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from anomalib_uas.data.images import list_images, read_image
from anomalib_uas.models.components.references import seeded_choice

__all__ = ["PromptedModelMixin"]


class PromptedModelMixin:
    """Prompt collection and encoding for an ``AnomalibModule`` whose ``model`` scores queries against prompts.

    The module sets ``k_shot``, ``seed`` and ``few_shot_source`` (and optionally ``prompt_strategy``) and calls
    :meth:`init_prompts` in ``__init__`` and :meth:`collect_prompts` in ``setup``. Its torch ``model`` has
    ``set_prompts(images)`` for normalised images and a ``has_prompts`` property.
    """

    k_shot: int
    seed: int
    few_shot_source: str | Sequence[str] | None
    model: torch.nn.Module
    pre_processor: torch.nn.Module | None
    device: torch.device

    def init_prompts(self) -> None:
        """Start without prompts (call from ``__init__``)."""
        self._prompt_images: torch.Tensor | None = None
        self.prompt_paths: list[str] = []
        self._prompts_fixed = False

    @property
    def draws_prompts(self) -> bool:
        """Whether ``k_shot`` prompts are drawn for the whole run (``random``) rather than kept for retrieval.

        Returns:
            ``True`` unless the module's ``prompt_strategy`` retrieves prompts per query.
        """
        return getattr(self, "prompt_strategy", "random") == "random"

    def set_prompts(self, images: torch.Tensor | str | Path | Sequence[str | Path]) -> None:
        """Encode these normal prompt images now and keep them for every later forward, test or predict.

        Use it outside Engine, or to override the datamodule's prompts: once set, ``setup`` no longer draws prompts.

        Args:
            images: Images in ``[0, 1]``, ``[N, 3, H, W]`` or ``[3, H, W]`` (the pre-processor resizes and
                normalises them), or a folder, an image file or a list of image files.
        """
        if isinstance(images, torch.Tensor):
            batch = list(images.unsqueeze(0) if images.dim() == 3 else images)
            paths: list[str] = []
        else:
            files = list_images(images)
            batch = [read_image(path) for path in files]
            paths = [str(path) for path in files]
        self.model.set_prompts(self._transformed(batch).to(self.device))
        self.prompt_paths = paths
        self._prompt_images = None
        self._prompts_fixed = True

    def collect_prompts(self) -> None:
        """Choose the prompt images of this run, unless :meth:`set_prompts` fixed them (call from ``setup``).

        Raises:
            ValueError: Fewer normal images than ``k_shot``.
        """
        if self._prompts_fixed:
            return
        images = self.source_prompts() if self.few_shot_source is not None else self._datamodule_prompts()
        if images is not None:
            self._prompt_images = images

    def source_prompts(self) -> torch.Tensor:
        """The prompt images of ``few_shot_source`` (a model with other source formats extends this).

        Returns:
            The pre-processed prompt images; ``prompt_paths`` names them.

        Raises:
            ValueError: Fewer images than ``k_shot``.
        """
        paths = list_images(self.few_shot_source)
        if self.draws_prompts:
            paths = [paths[i] for i in seeded_choice(len(paths), self.k_shot, self.seed)]
        self._check_count(len(paths))
        self.prompt_paths = [str(path) for path in paths]
        return self._transformed([read_image(path) for path in paths])

    def _datamodule(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        return getattr(trainer, "datamodule", None)

    def _datamodule_prompts(self) -> torch.Tensor | None:
        train_data = getattr(self._datamodule(), "train_data", None)
        if train_data is None:
            return None
        normal = [i for i, label in enumerate(train_data.samples.label_index) if int(label) == 0]
        if self.draws_prompts:
            normal = [normal[i] for i in seeded_choice(len(normal), self.k_shot, self.seed)]
        self._check_count(len(normal))
        self.prompt_paths = [str(train_data.samples.image_path.iloc[i]) for i in normal]
        return self._transformed([train_data[i].image for i in normal])

    def encode_prompts(self) -> None:
        """Encode the collected prompt images, or check that the model already holds prompts.

        Raises:
            RuntimeError: No prompt images anywhere.
        """
        if self._prompt_images is not None:
            self.model.set_prompts(self._prompt_images.to(self.device))
            self._prompt_images = None
        elif not self.model.has_prompts:
            msg = (
                f"{type(self).__name__} has no prompt images. Give a datamodule with normal training images, set "
                "few_shot_source to a folder or list of normal images (or another source its docstring names), or "
                "load a checkpoint that holds prompts."
            )
            raise RuntimeError(msg)

    def on_validation_start(self) -> None:
        """Encode the prompt images before validation."""
        self.encode_prompts()

    def on_test_start(self) -> None:
        """Encode the prompt images before testing."""
        self.encode_prompts()

    def on_predict_start(self) -> None:
        """Encode the prompt images before prediction."""
        self.encode_prompts()

    def _check_count(self, count: int) -> None:
        if count < self.k_shot:
            msg = f"{type(self).__name__} needs at least k_shot={self.k_shot} normal prompt images, found {count}."
            raise ValueError(msg)

    def _transformed(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        transform = self.pre_processor.transform if self.pre_processor is not None else None
        return torch.stack([transform(image) if transform is not None else image for image in images])
