# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Lightning behaviour shared by the models of the package.

Probability post-processing, the metrics, no validation data of their own, and the switch between inference
(one-, few- or zero-shot) and training runs.

Importing this module also corrects one message of anomalib's engine: ``Engine.predict`` without ``ckpt_path``
warns "Model weights will not be loaded", although it predicts with the weights the model instance holds (for these
models: the official or trained checkpoint loaded when they were built). :class:`PredictWeightsMessage` turns that
record into an accurate info line.

Example:
    >>> class MyModel(UniversalModelMixin, AnomalibModule):  # doctest: +SKIP
    ...     INFERENCE_LEARNING_TYPE = LearningType.FEW_SHOT
    ...     TRAINING_FLAG = "auxiliary_training"
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from anomalib import LearningType
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor

from anomalib_uas.models.components.processing import probability_post_processor, segmentation_evaluator

__all__ = ["PredictWeightsMessage", "UniversalModelMixin"]

ENGINE_LOGGER = "anomalib.engine.engine"


class PredictWeightsMessage(logging.Filter):
    """Rewrite anomalib's misleading "Model weights will not be loaded" warning of ``Engine.predict``."""

    WRONG = "ckpt_path is not provided. Model weights will not be loaded."
    RIGHT = "Engine.predict without ckpt_path: predicting with the weights the model instance holds."

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace the wrong message by the accurate one, at info level; pass every other record unchanged.

        Args:
            record: A record of anomalib's engine logger.

        Returns:
            Always ``True`` (nothing is dropped).
        """
        if record.msg == self.WRONG:
            record.msg, record.args = self.RIGHT, ()
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def _install_predict_weights_message() -> None:
    engine_logger = logging.getLogger(ENGINE_LOGGER)
    if not any(isinstance(existing, PredictWeightsMessage) for existing in engine_logger.filters):
        engine_logger.addFilter(PredictWeightsMessage())


_install_predict_weights_message()


class UniversalModelMixin:
    """Mixin for an ``AnomalibModule`` whose scores and maps are probabilities and that trains only when asked.

    A subclass names its learning type for inference (:attr:`INFERENCE_LEARNING_TYPE`) and the boolean attribute
    that turns a training run on (:attr:`TRAINING_FLAG`, e.g. ``meta_train``; ``None`` for a model that never trains).
    """

    INFERENCE_LEARNING_TYPE: ClassVar[LearningType]
    TRAINING_FLAG: ClassVar[str | None]

    @property
    def _trains(self) -> bool:
        return self.TRAINING_FLAG is not None and bool(getattr(self, self.TRAINING_FLAG))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's post-processor, starting from the probabilities' own ``[0, 1]`` scale.

        Validation data replaces the statistics with adaptive thresholds and min-max normalisation; without it
        (predicting on a folder) scores and maps stay raw with thresholds of 0.5.

        Returns:
            The post-processor.
        """
        return probability_post_processor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Threshold-free image and pixel metrics (pixel metrics only where masks exist).

        Returns:
            Evaluator with image AUROC, AUPR, F1Max and pixel AUROC, AUPR, F1Max, AUPRO.
        """
        return segmentation_evaluator()

    def val_dataloader(self) -> list:
        """No validation data of the model's own; the datamodule's is used when there is one.

        Returns:
            An empty list, so that ``Engine.predict`` works without a datamodule.
        """
        return []

    @property
    def learning_type(self) -> LearningType:
        """The inference learning type, or ``ONE_CLASS`` for a training run so that ``Engine.fit`` takes steps.

        Returns:
            The learning type.
        """
        return LearningType.ONE_CLASS if self._trains else self.INFERENCE_LEARNING_TYPE

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Trainer arguments: none for inference; a training run has no sanity validation.

        Returns:
            Keyword arguments merged into the Trainer.
        """
        return {"num_sanity_val_steps": 0} if self._trains else {}
