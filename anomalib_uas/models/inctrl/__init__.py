# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL: few-shot generalist anomaly detection by in-context residual learning on CLIP."""

from anomalib_uas.models.inctrl.lightning_model import InCTRL
from anomalib_uas.models.inctrl.torch_model import InCTRLModel, InCTRLOutput

__all__ = ["InCTRL", "InCTRLModel", "InCTRLOutput"]
