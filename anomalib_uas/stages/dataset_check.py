# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The dataset checks an evaluation runs before anything is tested: every problem is one line naming the fix.

anomalib's MVTec AD datamodule lists every file with an image extension and reads it inside a data-loader worker,
where a bad file ends in a traceback half-way through a run. And with ``test/good`` empty it moves normal training
images into the test set, where they are also among the held-out normals that set the image threshold: the image
AUROC it reports is then measured on images that tuned the threshold. So :func:`check_dataset` refuses, per
category, before any model runs:

* a category without a ``test`` folder (a typo would otherwise let the datamodule start a download);
* an empty ``test/good`` or ``train/good``;
* a hidden file with an image extension (macOS AppleDouble ``._000.png`` files are metadata, not images);
* an image file that does not decode to its end (truncated or corrupt).

Example:
    >>> from anomalib_uas.stages.dataset_check import check_dataset
    >>> check_dataset(Path("data/dataset"), ["brick"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from anomalib_uas.data.images import IMAGE_EXTENSIONS, IMAGE_FORMATS
from anomalib_uas.stages import StageError

__all__ = ["check_dataset"]


def check_dataset(dataset: Path, categories: Sequence[str]) -> None:
    """Check every category's layout and image files before an evaluation starts.

    Args:
        dataset: The dataset folder (MVTec AD layout).
        categories: ``data.categories``.

    Raises:
        StageError: A missing category, an empty ``good`` folder, a hidden or undecodable image file.
    """
    absent = [category for category in categories if not (dataset / category / "test").is_dir()]
    if absent:
        present = (
            sorted(path.name for path in dataset.iterdir() if (path / "test").is_dir()) if dataset.is_dir() else []
        )
        msg = (
            f"data.categories {absent} are not in {dataset} (it has {present or 'nothing'}): fix data.categories or "
            "rerun the data stage (`dvc repro data`)"
        )
        raise StageError(msg)
    for category in categories:
        _check_category(dataset / category)


def _check_category(folder: Path) -> None:
    for split in ("train", "test"):
        good = folder / split / "good"
        if not any(_images(good)):
            msg = (
                f"{good} holds no image: anomalib would fill the test set with training normals, which also set "
                "the threshold. Add normal images there (for data.dataset 'folder': data.folder.normal_test_dir "
                "and normal_dir), then `dvc repro`"
            )
            raise StageError(msg)
    for path in _images(folder):
        if path.name.startswith("."):
            msg = (
                f"{path} is a hidden file (macOS '._' metadata?) among the images: delete it "
                f"(find {folder} -name '._*' -delete), then `dvc repro`"
            )
            raise StageError(msg)
        _check_decodes(path)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def _check_decodes(path: Path) -> None:
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = f"{path} is not a readable image ({exc}): replace or delete it, then `dvc repro`"
        raise StageError(msg) from exc
