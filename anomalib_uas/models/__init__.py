# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""anomalib models of the package, and the lookup of each model's spec by name.

Each model is a direct ``AnomalibModule`` subclass usable by dotted path (``anomalib_uas.models.MetaUAS``); classes
are imported on first use. :func:`get_spec` returns what the pipeline, the registry and serving need to know of a
model (:class:`~anomalib_uas.models.spec.ModelSpec`), imported from the model's own ``spec.py``: code outside a
model's folder looks models up here and never branches on their names.

Example:
    >>> from anomalib_uas.models import get_spec
    >>> get_spec("metauas").takes_prompts  # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from anomalib_uas.lazy import lazy_exports
from anomalib_uas.params import MODEL_NAMES

if TYPE_CHECKING:
    from anomalib_uas.models.faprompt import FAPrompt
    from anomalib_uas.models.inctrl import InCTRL
    from anomalib_uas.models.metauas import MetaUAS
    from anomalib_uas.models.nearest_patch import NearestPatch
    from anomalib_uas.models.spec import ModelSpec

__all__ = ["MODEL_NAMES", "FAPrompt", "InCTRL", "MetaUAS", "NearestPatch", "get_spec"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "FAPrompt": "anomalib_uas.models.faprompt",
        "InCTRL": "anomalib_uas.models.inctrl",
        "MetaUAS": "anomalib_uas.models.metauas",
        "NearestPatch": "anomalib_uas.models.nearest_patch",
    },
)


def get_spec(name: str) -> ModelSpec:
    """The spec of a model, from ``anomalib_uas/models/<name>/spec.py``.

    Args:
        name: One of :data:`~anomalib_uas.params.MODEL_NAMES`.

    Returns:
        The model's spec.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in MODEL_NAMES:
        msg = f"unknown model {name!r}: anomalib-uas has {', '.join(MODEL_NAMES)}"
        raise ValueError(msg)
    return importlib.import_module(f"anomalib_uas.models.{name}.spec").SPEC
