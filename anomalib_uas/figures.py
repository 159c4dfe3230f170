# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Figures of an evaluation as PNG bytes: the image-level ROC, maps on images, score histograms and error thumbnails.

The evaluate stage logs the ROC and the overlays of the highest-scored defects (:func:`figures`) as MLflow run
artifacts; the report embeds the ROC, and per category the histogram of the scores around the deployed image
threshold (:func:`score_histogram`) and thumbnails of the false positives and misses (:func:`error_thumbnails`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from anomalib_uas.data.images import read_image

__all__ = ["Thumbnails", "error_thumbnails", "figures", "overlays", "roc_figure", "score_histogram"]


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def roc_figure(curves: dict[str, Path]) -> bytes:
    """The image-level ROC of every category of one or more models.

    Args:
        curves: Model name -> its ``roc.csv``.

    Returns:
        The PNG.
    """
    figure, axis = plt.subplots(figsize=(5, 4))
    for model, roc in curves.items():
        with roc.open() as handle:
            rows = list(csv.DictReader(handle))
        for category in sorted({row["category"] for row in rows}):
            points = [(float(r["fpr"]), float(r["tpr"])) for r in rows if r["category"] == category]
            axis.plot(*zip(*points, strict=True), label=f"{model} / {category}")
    axis.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC")
    axis.legend(fontsize=6)
    return _png(figure)


def _map_panels(
    saved: Mapping[str, np.ndarray],
    index: int,
    title: str,
    heatmap_range: Sequence[float] | None = None,
    pixel_threshold: float | None = None,
    size: tuple[float, float] = (6, 2.2),
) -> bytes:
    """Image, its anomaly map over it and the ground truth of one saved prediction.

    Args:
        saved: A category's predictions (``predictions.npz``).
        index: The image's index in them.
        title: Title of the map panel.
        heatmap_range: ``(vmin, vmax)`` of the map's colours; each map's own range when ``None``.
        pixel_threshold: Draw the predicted mask (map values above it) as a white contour.
        size: Figure size in inches.

    Returns:
        The PNG.
    """
    image = read_image(str(saved["image_path"][index])).permute(1, 2, 0).numpy()
    heat = saved["anomaly_map"][index].astype(np.float32)
    height, width = image.shape[:2]
    low, high = heatmap_range if heatmap_range is not None else (None, None)
    figure, axes = plt.subplots(1, 3, figsize=size)
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(heat, cmap="jet", alpha=0.5, vmin=low, vmax=high, extent=(0, width, height, 0))
    if pixel_threshold is not None and heat.min() < pixel_threshold < heat.max():
        rows, columns = heat.shape
        xs = (np.arange(columns) + 0.5) * width / columns
        ys = (np.arange(rows) + 0.5) * height / rows
        axes[1].contour(xs, ys, heat, levels=[pixel_threshold], colors="white", linewidths=0.8)
        axes[1].set(xlim=(0, width), ylim=(height, 0))
    axes[2].imshow(saved["gt_mask"][index], cmap="gray", vmin=0, vmax=1)
    for axis, text in zip(axes, ("image", title, "ground truth"), strict=True):
        axis.set_title(text, fontsize=7)
        axis.axis("off")
    return _png(figure)


def _name(saved: Mapping[str, np.ndarray], index: int) -> str:
    """``<defect>/<file>`` of a saved prediction's image."""
    path = Path(str(saved["image_path"][index]))
    return f"{path.parent.name}/{path.name}"


def overlays(predictions: Path, per_category: int = 2) -> list[tuple[str, str, bytes]]:
    """Image, map and ground truth of the highest-scored defects of each category.

    Args:
        predictions: A model's predictions folder (``<category>/predictions.npz``).
        per_category: Defects per category.

    Returns:
        ``(category, "<defect>/<file>", png)`` per defect.
    """
    samples = []
    for path in sorted(predictions.glob("*/predictions.npz")):
        saved = np.load(path)
        anomalous = np.flatnonzero(saved["gt_label"] == 1)
        chosen = anomalous[np.argsort(-saved["pred_score"][anomalous])][:per_category]
        for index in chosen:
            title = f"map (score {saved['pred_score'][index]:.3f})"
            samples.append((path.parent.name, _name(saved, index), _map_panels(saved, index, title)))
    return samples


def figures(model: str, reports: Path, predictions: Path) -> dict[str, bytes]:
    """The evaluation's figures of one evaluated model as PNG files, to be logged as run artifacts.

    Args:
        model: An evaluated model.
        reports: Its reports folder (``roc.csv``).
        predictions: Its predictions folder.

    Returns:
        ``{"plots/roc.png": ..., "overlays/<category>-<defect>-<image>.png": ...}``: the image-level ROC per
        category and the highest-scored defects of each category with their map and ground truth.
    """
    files = {"plots/roc.png": roc_figure({model: reports / "roc.csv"})}
    for category, image, png in overlays(predictions):
        files[f"overlays/{category}-{image.removesuffix(Path(image).suffix).replace('/', '-')}.png"] = png
    return files


def score_histogram(groups: Mapping[str, np.ndarray], image_threshold: float, title: str) -> bytes:
    """Histograms of image scores of several groups on common bins, with the image threshold as a vertical line.

    Each group's bars add up to one, so that a few test images compare with many normals.

    Args:
        groups: Legend label -> the group's raw image scores (the label gets the count appended).
        image_threshold: The deployed image threshold (a score above it alarms).
        title: The figure's title.

    Returns:
        The PNG.
    """
    scores = {label: np.asarray(values, dtype=np.float64).ravel() for label, values in groups.items()}
    bins = np.histogram_bin_edges(np.concatenate([*scores.values(), [image_threshold]]), bins=30)
    figure, axis = plt.subplots(figsize=(4.2, 2.2))
    for label, values in scores.items():
        share = np.full(len(values), 1.0 / max(len(values), 1))
        axis.hist(values, bins=bins, weights=share, histtype="stepfilled", alpha=0.45, label=f"{label} ({len(values)})")
    axis.axvline(image_threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {image_threshold:.4g}")
    axis.set(xlabel="image score", ylabel="share of the group", title=title)
    axis.title.set_fontsize(8)
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)


class Thumbnails(NamedTuple):
    """Thumbnails of one kind of error of a category.

    Args:
        kind: ``"false positives"`` or ``"misses"``.
        total: Test images of that kind.
        images: ``("<defect>/<file>", score, png)`` of at most ``limit`` of them, the clearest errors first.
    """

    kind: str
    total: int
    images: list[tuple[str, float, bytes]]


def error_thumbnails(
    saved: Mapping[str, np.ndarray],
    image_threshold: float,
    pixel_threshold: float,
    heatmap_range: Sequence[float],
    limit: int = 6,
) -> list[Thumbnails]:
    """Image, map and ground truth of the false positives and the misses of a category at the deployed thresholds.

    A false positive is a test normal scored above ``image_threshold`` (highest scores first); a miss is a test
    defect scored at or below it (lowest scores first). The maps share one colour range and show the predicted
    mask (map values above ``pixel_threshold``) as a white contour.

    Args:
        saved: The category's predictions (``predictions.npz``: image_path, gt_label, pred_score, anomaly_map,
            gt_mask).
        image_threshold: The deployed image threshold.
        pixel_threshold: The deployed pixel threshold.
        heatmap_range: ``(vmin, vmax)`` of the map colours.
        limit: Thumbnails per kind.

    Returns:
        The false positives and the misses.
    """
    labels, scores = np.asarray(saved["gt_label"]), np.asarray(saved["pred_score"], dtype=np.float64)
    false_positives = np.flatnonzero((labels == 0) & (scores > image_threshold))
    misses = np.flatnonzero((labels == 1) & (scores <= image_threshold))
    found = []
    for kind, indices in (
        ("false positives", false_positives[np.argsort(-scores[false_positives], kind="stable")]),
        ("misses", misses[np.argsort(scores[misses], kind="stable")]),
    ):
        images = []
        for index in indices[:limit]:
            heat = np.asarray(saved["anomaly_map"][index], dtype=np.float32)
            title = f"score {scores[index]:.4g}, {np.mean(heat > pixel_threshold):.0%} masked"
            png = _map_panels(saved, index, title, heatmap_range, pixel_threshold, size=(4.2, 1.6))
            images.append((_name(saved, index), float(scores[index]), png))
        found.append(Thumbnails(kind, len(indices), images))
    return found
