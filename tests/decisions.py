# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""A calibrated decision with given thresholds, for tests that register a model without running the pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np

from anomalib_uas.calibration import decide


def fixed_decision(image_threshold: float, pixel_threshold: float) -> dict[str, Any]:
    """The decision :func:`~anomalib_uas.calibration.decide` makes from one normal image with these values.

    Args:
        image_threshold: The normal image's score, which becomes the image threshold.
        pixel_threshold: The largest value of its map, which becomes the pixel threshold.

    Returns:
        The decision (thresholds, basis, version), not certified (one normal image).
    """
    normals = {
        "group": np.array(["held_out_normal"]),
        "pred_score": np.array([image_threshold]),
        "map_max": np.array([pixel_threshold]),
        "map_min": np.array([0.0]),
    }
    return decide(normals, target_fpr=0.05, confidence=0.95)
