# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""What an evaluation reads besides the model: the test split, the normal images for thresholds, the prompt pool.

Reviewers' feedback (``data/feedback/<category>/{normal,hard}``, written by the ``feedback`` stage) changes all
three: feedback images are held out of the test split (they are scored and reported separately), feedback normals
join the normal images that calibrate the thresholds and the pool prompts are drawn or retrieved from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from anomalib_uas.data.images import list_images

__all__ = ["Feedback", "held_out_normals", "prompt_pool", "read_feedback", "test_split"]


@dataclass(frozen=True)
class Feedback:
    """A category's feedback images.

    Args:
        normal: Images reviewers marked normal (typically false positives).
        hard: Defects reviewers marked as missed.
    """

    normal: list[str]
    hard: list[str]

    def digests(self) -> set[str]:
        """The sha256 of every feedback image, to find the same images in the test split.

        Returns:
            Hex digests.
        """
        return {_sha256(Path(path)) for path in [*self.normal, *self.hard]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_feedback(folder: Path, category: str) -> Feedback:
    """The feedback images of a category (none when the folder has none).

    Args:
        folder: The feedback folder (``data/feedback``).
        category: The category.

    Returns:
        Sorted image paths per kind.
    """
    kinds = {}
    for kind in ("normal", "hard"):
        path = folder / category / kind
        kinds[kind] = [str(image) for image in list_images(path)] if path.is_dir() else []
    return Feedback(**kinds)


def held_out_normals(dataset: Path, category: str, prompts: list[str], feedback: Feedback) -> dict[str, list[str]]:
    """The normal images outside the test split that were not prompts, which calibrate the thresholds.

    Args:
        dataset: The dataset folder.
        category: The category.
        prompts: The prompt images the model used.
        feedback: The category's feedback.

    Returns:
        ``held_out_normal`` (``train/good``) and ``feedback_normal`` image paths, prompts left out.
    """
    used = {str(Path(path).resolve()) for path in prompts}
    train = [str(path) for path in list_images(dataset / category / "train" / "good")]
    return {
        "held_out_normal": [path for path in train if str(Path(path).resolve()) not in used],
        "feedback_normal": [path for path in feedback.normal if str(Path(path).resolve()) not in used],
    }


def prompt_pool(dataset: Path, category: str, source: str | None, feedback: Feedback) -> list[str] | None:
    """The normal images prompts are drawn or retrieved from, when feedback adds to them.

    Args:
        dataset: The dataset folder.
        category: The category.
        source: The model's own prompt source (a folder of normal images), or ``None`` for ``train/good``.
        feedback: The category's feedback.

    Returns:
        The pool with the feedback normals, or ``None`` without feedback normals (the model's own default).
    """
    if not feedback.normal:
        return None
    base = Path(source) if source else dataset / category / "train" / "good"
    return [*(str(path) for path in list_images(base)), *feedback.normal]


def test_split(dataset: Path, categories: list[str], feedback: dict[str, Feedback], folder: Path) -> Path:
    """An MVTec-layout view of the dataset without the feedback images in any test split.

    Categories without feedback are linked whole; the files of the others are hard-linked (copied across file
    systems) one by one, except the test images whose content equals a feedback image.

    Args:
        dataset: The dataset folder.
        categories: The categories.
        feedback: Per category, its feedback.
        folder: An empty folder for the view (links only).

    Returns:
        ``folder``, or ``dataset`` itself when there is no feedback at all.
    """
    if not any(f.normal or f.hard for f in feedback.values()):
        return dataset
    for category in categories:
        source, target = (dataset / category).resolve(), folder / category
        digests = feedback[category].digests()
        if not digests:
            target.symlink_to(source, target_is_directory=True)
            continue
        for image in sorted(source.rglob("*")):  # anomalib keeps only files that resolve inside the root: no links
            if image.is_file() and not (image.relative_to(source).parts[0] == "test" and _sha256(image) in digests):
                copy = target / image.relative_to(source)
                copy.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(image, copy)
                except OSError:  # another file system
                    shutil.copy2(image, copy)
    return folder
