# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Post-processing and evaluation shared by the models, whose scores and maps are probabilities in ``[0, 1]``.

Example:
    >>> from anomalib_uas.models.components.processing import probability_post_processor, segmentation_evaluator
    >>> float(probability_post_processor().image_threshold)
    0.5
    >>> len(segmentation_evaluator().test_metrics)
    7
"""

from __future__ import annotations

from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max
from anomalib.post_processing import PostProcessor

__all__ = ["probability_post_processor", "segmentation_evaluator"]


def probability_post_processor() -> PostProcessor:
    """Anomalib's post-processor, starting from the probabilities' own scale.

    Validation data replaces the statistics with adaptive thresholds and min-max normalisation. Without validation
    data (predicting on a folder), scores and maps stay the raw probabilities and both thresholds are 0.5.

    Returns:
        The post-processor.
    """
    post_processor = PostProcessor()
    for name in ("image", "pixel"):
        getattr(post_processor, f"_{name}_threshold").fill_(0.5)
        getattr(post_processor, f"{name}_min").fill_(0.0)
        getattr(post_processor, f"{name}_max").fill_(1.0)
    return post_processor


def segmentation_evaluator() -> Evaluator:
    """Threshold-free image and pixel metrics (pixel metrics are skipped when a dataset has no masks).

    Returns:
        Evaluator with image AUROC, AUPR, F1Max and pixel AUROC, AUPR, F1Max, AUPRO.
    """
    image = [metric(fields=["pred_score", "gt_label"], prefix="image_") for metric in (AUROC, AUPR, F1Max)]
    pixel = [
        metric(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False)
        for metric in (AUROC, AUPR, F1Max, AUPRO)
    ]
    return Evaluator(test_metrics=image + pixel)
