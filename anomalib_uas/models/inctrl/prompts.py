# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL's text prompts: 7 normal and 4 anomaly states, each in 22 templates.

The zero-shot text prior of InCTRL is a WinCLIP-style prompt ensemble, but not anomalib's: InCTRL has 22
templates (including ``"a cropped photo of a {}."``, without anomalib's duplicate) and no ``"broken {}"`` state.
Prompts are listed state-major, ``[template.format(state) for state in states for template in templates]``,
which gives 154 normal and 88 anomaly prompts for an object name. For the ten CIFAR-10 classes and ``"animal"``
(semantic anomaly detection) there is a single prompt of each kind.

Example:
    >>> from anomalib_uas.models.inctrl.prompts import prompt_texts
    >>> normal, anomaly = prompt_texts("metal_nut")
    >>> len(normal), len(anomaly)
    (154, 88)
    >>> normal[1]
    'a cropped photo of a metal nut.'
"""

from __future__ import annotations

__all__ = ["ANOMALY_STATES", "NORMAL_STATES", "SEMANTIC_CLASSES", "TEMPLATES", "object_name", "prompt_texts"]

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALY_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)
SEMANTIC_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
    "animal",
)


def object_name(category: str) -> str:
    """The object name a category stands for in the prompts (underscores become spaces).

    Args:
        category: Category name, e.g. ``"metal_nut"``.

    Returns:
        The name used in the prompts, e.g. ``"metal nut"``.

    Raises:
        ValueError: For an empty name.
    """
    name = category.replace("_", " ").strip()
    if not name:
        msg = "The category name for InCTRL's text prompts is empty; pass category=<object name>, e.g. 'bottle'."
        raise ValueError(msg)
    return name


def prompt_texts(category: str) -> tuple[list[str], list[str]]:
    """The normal and anomaly prompts of a category.

    Args:
        category: Category name; underscores are replaced by spaces.

    Returns:
        The normal prompts (154, or 1 for a semantic class) and the anomaly prompts (88, or 1).
    """
    name = object_name(category)
    if name in SEMANTIC_CLASSES:
        return [f"a photo of {name} for anomaly detection."], [f"a photo without {name} for anomaly detection."]
    normal = [template.format(state.format(name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomaly = [template.format(state.format(name)) for state in ANOMALY_STATES for template in TEMPLATES]
    return normal, anomaly
