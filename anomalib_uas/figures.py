# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Figures of an evaluation as PNG bytes: the image-level ROC and overlays of maps on the highest-scored defects.

The report embeds them in its HTML page; the evaluate stage logs them as MLflow run artifacts.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from anomalib_uas.data.images import read_image

__all__ = ["figures", "overlays", "roc_figure"]


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
            image = read_image(str(saved["image_path"][index])).permute(1, 2, 0).numpy()
            heat = saved["anomaly_map"][index].astype(np.float32)
            figure, axes = plt.subplots(1, 3, figsize=(6, 2.2))
            axes[0].imshow(image)
            axes[1].imshow(image)
            axes[1].imshow(heat, cmap="jet", alpha=0.5, extent=(0, image.shape[1], image.shape[0], 0))
            axes[2].imshow(saved["gt_mask"][index], cmap="gray")
            for axis, title in zip(
                axes, ("image", f"map (score {saved['pred_score'][index]:.3f})", "ground truth"), strict=True
            ):
                axis.set_title(title, fontsize=7)
                axis.axis("off")
            image_path = Path(str(saved["image_path"][index]))
            samples.append((path.parent.name, f"{image_path.parent.name}/{image_path.name}", _png(figure)))
    return samples


def figures(model: str, reports: Path, predictions: Path) -> dict[str, bytes]:
    """The report's figures of one evaluated model as PNG files, to be logged as run artifacts.

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
