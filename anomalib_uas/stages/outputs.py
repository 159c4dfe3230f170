# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Replace a stage's outputs only when the stage succeeded.

``dvc.yaml`` declares every output ``persist: true``, so DVC does not delete it before the command runs; the stage
writes into staging paths beside the outputs and :func:`replacing` moves them into place once everything succeeded.
On any failure the staging paths are removed and the previous outputs stay as they were.

Example:
    >>> with replacing(Path("checkpoints/metauas")) as (staging,):  # doctest: +SKIP
    ...     staging.mkdir()
    ...     (staging / "status.json").write_text("{}")
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["replacing", "write_json"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _staging(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{suffix}"


def _check_written(targets: tuple[Path, ...], staging: tuple[Path, ...]) -> None:
    missing = [str(target) for target, path in zip(targets, staging, strict=True) if not path.exists()]
    if missing:
        msg = f"the stage wrote none of {', '.join(missing)}"
        raise RuntimeError(msg)


@contextmanager
def replacing(*targets: Path) -> Iterator[tuple[Path, ...]]:
    """Staging paths for outputs, moved over the outputs when the block succeeds.

    Args:
        *targets: The output files or folders.

    Yields:
        One staging path per target (not created: write a file there, or make the folder).

    Raises:
        RuntimeError: The block did not write one of the staging paths.
    """
    staging = tuple(_staging(target, "staging") for target in targets)
    for path in staging:
        _remove(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        _check_written(targets, staging)
    except BaseException:
        for path in staging:
            _remove(path)
        raise
    for target, path in zip(targets, staging, strict=True):
        previous = _staging(target, "previous")
        _remove(previous)
        if target.exists() or target.is_symlink():
            target.rename(previous)
        path.rename(target)
        _remove(previous)


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON the way every stage does: sorted keys, indented, LF line end (stable hashes for DVC).

    Args:
        path: Output file; its folder is created.
        content: The data.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
