# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS: universal anomaly segmentation with one normal prompt image.

``MetaUAS`` (the anomalib module), ``MetaUASModel`` (the bare network, torch and timm only) and its eval-mode
output ``MetaUASOutput`` are imported on first use, so that ``anomalib_uas.models.metauas.torch_model`` loads
without anomalib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_uas.lazy import lazy_exports

if TYPE_CHECKING:
    from anomalib_uas.models.metauas.lightning_model import MetaUAS
    from anomalib_uas.models.metauas.torch_model import MetaUASModel, MetaUASOutput

__all__ = ["MetaUAS", "MetaUASModel", "MetaUASOutput"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "MetaUAS": "anomalib_uas.models.metauas.lightning_model",
        "MetaUASModel": "anomalib_uas.models.metauas.torch_model",
        "MetaUASOutput": "anomalib_uas.models.metauas.torch_model",
    },
)
