# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Package attributes imported on first use, so that importing one module does not import every model.

A DVC stage depends on exactly the modules it imports; packages that re-export their classes eagerly would make
every stage depend on every model (editing InCTRL would retrain MetaUAS). Packages re-export lazily instead.

Example:
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"MetaUAS": "anomalib_uas.models.metauas"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` functions that import each exported name from its module on first use.

    Args:
        package: The package's ``__name__`` (for error messages).
        exports: Exported name -> module that defines it.

    Returns:
        ``(__getattr__, __dir__)`` for the package's namespace.
    """

    def getattr_(name: str) -> Any:
        if name not in exports:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        return getattr(importlib.import_module(exports[name]), name)

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_
