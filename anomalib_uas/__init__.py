# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Universal (one-, few- and zero-shot) anomaly segmentation models for anomalib 2.x.

Example:
    >>> from anomalib_uas import MetaUAS
    >>> model = MetaUAS.from_official_checkpoint("metauas-256")  # doctest: +SKIP
"""

from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
from anomalib_uas.weights import WeightsError, WeightsNotFoundError, resolve_weights

__all__ = ["FAPrompt", "InCTRL", "MetaUAS", "WeightsError", "WeightsNotFoundError", "resolve_weights"]
__version__ = "0.1.0"
