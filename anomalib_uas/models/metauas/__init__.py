# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS: universal anomaly segmentation with one normal prompt image."""

from anomalib_uas.models.metauas.lightning_model import MetaUAS
from anomalib_uas.models.metauas.torch_model import MetaUASModel

__all__ = ["MetaUAS", "MetaUASModel"]
