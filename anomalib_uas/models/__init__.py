# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""anomalib models of the package; each is a direct ``AnomalibModule`` subclass usable by dotted path."""

from anomalib_uas.models.faprompt import FAPrompt
from anomalib_uas.models.inctrl import InCTRL
from anomalib_uas.models.metauas import MetaUAS

__all__ = ["FAPrompt", "InCTRL", "MetaUAS"]
