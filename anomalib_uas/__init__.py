# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Universal (one-, few- and zero-shot) anomaly segmentation models for anomalib 2.x.

The models and the weights resolver are imported on first use (see :mod:`anomalib_uas.lazy`).

Example:
    >>> from anomalib_uas import MetaUAS
    >>> model = MetaUAS.from_official_checkpoint("metauas-256")  # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from anomalib_uas.lazy import lazy_exports

if TYPE_CHECKING:
    from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
    from anomalib_uas.weights import WeightsError, WeightsNotFoundError, resolve_weights

__all__ = ["FAPrompt", "InCTRL", "MetaUAS", "WeightsError", "WeightsNotFoundError", "resolve_weights"]
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "FAPrompt": "anomalib_uas.models.faprompt",
        "InCTRL": "anomalib_uas.models.inctrl",
        "MetaUAS": "anomalib_uas.models.metauas",
        "WeightsError": "anomalib_uas.weights",
        "WeightsNotFoundError": "anomalib_uas.weights",
        "resolve_weights": "anomalib_uas.weights",
    },
)
