# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The nearest-patch model: a training-free one-shot baseline, the feature distance to the closest prompt patch.

``NearestPatch`` (the anomalib module) and ``NearestPatchModel`` (the bare network) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_uas.lazy import lazy_exports

if TYPE_CHECKING:
    from anomalib_uas.models.nearest_patch.lightning_model import NearestPatch
    from anomalib_uas.models.nearest_patch.torch_model import NearestPatchModel

__all__ = ["NearestPatch", "NearestPatchModel"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "NearestPatch": "anomalib_uas.models.nearest_patch.lightning_model",
        "NearestPatchModel": "anomalib_uas.models.nearest_patch.torch_model",
    },
)
