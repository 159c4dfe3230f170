# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt: zero-shot anomaly segmentation with compound abnormality prompts and a data-dependent prior."""

from anomalib_uas.models.faprompt.lightning_model import FAPrompt
from anomalib_uas.models.faprompt.torch_model import FAPromptModel

__all__ = ["FAPrompt", "FAPromptModel"]
