# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Curves and thresholds from saved predictions.

ROC and PR points as CSV for ``dvc plots``; F1-optimal thresholds (evaluation figures: they use test labels, so
nothing deployed uses them); the false-alarm and miss rates a threshold gives on a test set.

Example:
    >>> import numpy as np
    >>> f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    0.8
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from anomalib_uas.params import METRICS

__all__ = ["error_rates", "f1_threshold", "thresholds", "write_curves"]


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest F1 (a score at or above it is anomalous).

    Args:
        labels: 0 normal, 1 anomalous.
        scores: Raw scores, higher is more anomalous.

    Returns:
        The threshold; 0.5 when the labels hold one class only.
    """
    if len(np.unique(labels)) < 2:
        return 0.5
    precision, recall, cuts = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(cuts[int(np.argmax(f1[:-1]))])


def error_rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """False alarms and misses of a threshold (a score above it is anomalous).

    Args:
        labels: 0 normal, 1 anomalous.
        scores: Raw scores.
        threshold: The image threshold.

    Returns:
        ``FP``, ``FN`` (counts), ``false_alarm_rate`` (FP over normal images) and ``miss_rate`` (FN over anomalous
        images); a rate is NaN without images of its class.
    """
    labels, alarms = np.asarray(labels).astype(bool), np.asarray(scores) > threshold
    false_alarms, misses = int((alarms & ~labels).sum()), int((~alarms & labels).sum())
    normal, anomalous = int((~labels).sum()), int(labels.sum())
    return {
        "FP": false_alarms,
        "FN": misses,
        "false_alarm_rate": false_alarms / normal if normal else float("nan"),
        "miss_rate": misses / anomalous if anomalous else float("nan"),
    }


def thresholds(saved: Any, max_pixels: int = 200_000) -> dict[str, float]:
    """F1-optimal image and pixel thresholds on the raw scores and maps of one category's predictions.

    Args:
        saved: The category's ``predictions.npz`` (``gt_label``, ``pred_score``, ``anomaly_map``, ``gt_mask``).
        max_pixels: Pixels used for the pixel threshold at most (evenly strided).

    Returns:
        ``{"image_threshold": ..., "pixel_threshold": ...}``.
    """
    image = f1_threshold(saved["gt_label"], saved["pred_score"])
    maps = saved["anomaly_map"].astype(np.float32).ravel()
    masks = saved["gt_mask"].ravel()
    step = max(1, maps.size // max_pixels)
    return {"image_threshold": image, "pixel_threshold": f1_threshold(masks[::step], maps[::step])}


def write_curves(
    folder: Path,
    categories: Sequence[str],
    scores: Sequence[np.ndarray] = (),
    labels: Sequence[np.ndarray] = (),
    rows: Sequence[dict[str, Any]] = (),
) -> None:
    """Write ``roc.csv``, ``pr.csv`` and ``per_category.csv`` (LF line ends, stable for DVC).

    Args:
        folder: Output folder.
        categories: Categories, in the order of ``scores`` and ``labels``.
        scores: Image scores per category (none for a skipped model: the files hold only their headers).
        labels: Image labels per category.
        rows: Metric rows per category, for the bar chart.
    """
    roc_rows, pr_rows = [], []
    for category, score, label in zip(categories, scores, labels, strict=False):
        if len(np.unique(label)) < 2:
            continue
        fpr, tpr, _ = roc_curve(label, score, drop_intermediate=True)
        roc_rows += [
            {"category": category, "fpr": f"{a:.6f}", "tpr": f"{b:.6f}"} for a, b in zip(fpr, tpr, strict=True)
        ]
        precision, recall, _ = precision_recall_curve(label, score, drop_intermediate=True)
        pr_rows += [
            {"category": category, "recall": f"{r:.6f}", "precision": f"{p:.6f}"}
            for p, r in zip(precision, recall, strict=True)
        ]
    bars = [{"category": row["category"], **{c: f"{row[c]:.6f}" for c in METRICS if c in row}} for row in rows]
    folder.mkdir(parents=True, exist_ok=True)
    for name, fields, content in (
        ("roc.csv", ["category", "fpr", "tpr"], roc_rows),
        ("pr.csv", ["category", "recall", "precision"], pr_rows),
        ("per_category.csv", ["category", *METRICS], bars),
    ):
        with (folder / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(content)
