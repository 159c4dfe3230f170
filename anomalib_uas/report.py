# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The comparison report of the pipeline: models x categories x metrics and timings.

Reads what the evaluate stage wrote (``reports/<model>/metrics.json``, ``roc.csv``, ``predictions/<model>/``) and
writes ``reports/report.md`` and a self-contained ``reports/report.html`` (plots and sample overlays embedded as
base64 PNG, no external scripts or styles, so it opens offline).

Example:
    >>> from anomalib_uas.report import write_report
    >>> write_report(["metauas", "inctrl", "faprompt"])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from anomalib_uas.data.images import read_image
from anomalib_uas.evaluation import METRICS

__all__ = ["figures", "markdown_report", "write_report"]

COLUMNS = [*METRICS, "ms_per_image"]


def _load(model: str, reports: Path) -> dict[str, Any]:
    metrics = json.loads((reports / model / "metrics.json").read_text())
    result = {"model": model, "metrics": metrics}
    for name in ("skipped", "weights"):
        path = reports / model / f"{name}.json"
        if path.is_file():
            result[name] = json.loads(path.read_text())
    return result


def markdown_report(results: Sequence[dict[str, Any]]) -> str:
    """Format the comparison as Markdown.

    Args:
        results: One entry per model, as loaded from the reports folder.

    Returns:
        The Markdown text.
    """
    lines = ["# Inspection pipeline report", "", "| model | category | " + " | ".join(COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    notes = []
    for result in results:
        metrics = result["metrics"]
        if metrics.get("skipped"):
            lines.append(f"| {result['model']} | (skipped) |" + " |" * len(COLUMNS))
            notes.append(f"- **{result['model']}** skipped: {result['skipped']['reason']}")
            continue
        for category, row in {**metrics["categories"], "**mean**": metrics["mean"]}.items():
            values = " | ".join(f"{row[c]:.3f}" if c in row else "n/a" for c in COLUMNS)
            lines.append(f"| {result['model']} | {category} | {values} |")
        notes.append(f"- **{result['model']}** weights: {result['weights']['description']}")
    return "\n".join([*lines, "", "## Models", "", *notes, ""])


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _img(png: bytes) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _roc_figure(models: Sequence[str], reports: Path) -> bytes:
    figure, axis = plt.subplots(figsize=(5, 4))
    for model in models:
        with (reports / model / "roc.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        for category in sorted({row["category"] for row in rows}):
            points = [(float(r["fpr"]), float(r["tpr"])) for r in rows if r["category"] == category]
            axis.plot(*zip(*points, strict=True), label=f"{model} / {category}")
    axis.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC")
    axis.legend(fontsize=6)
    return _png(figure)


def _overlays(model: str, predictions: Path, per_category: int = 2) -> list[tuple[str, str, bytes]]:
    """The highest-scored defects of each category: ``(category, "<defect>/<file>", png)``."""
    samples = []
    for path in sorted(predictions.glob(f"{model}/*/predictions.npz")):
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


def figures(model: str, reports: Path = Path("reports"), predictions: Path = Path("predictions")) -> dict[str, bytes]:
    """The report's figures of one evaluated model as PNG files, to be logged as run artifacts.

    Args:
        model: An evaluated model.
        reports: The reports folder.
        predictions: The predictions folder.

    Returns:
        ``{"plots/roc.png": ..., "overlays/<category>-<defect>-<image>.png": ...}``: the image-level ROC per
        category and the highest-scored defects of each category with their map and ground truth.
    """
    files = {"plots/roc.png": _roc_figure([model], reports)}
    for category, image, png in _overlays(model, predictions):
        files[f"overlays/{category}-{image.removesuffix(Path(image).suffix).replace('/', '-')}.png"] = png
    return files


def write_report(
    models: Sequence[str],
    reports: Path = Path("reports"),
    predictions: Path = Path("predictions"),
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into the reports folder.

    Args:
        models: Models of the pipeline.
        reports: The reports folder.
        predictions: The predictions folder.

    Returns:
        Paths of the Markdown and HTML reports.
    """
    results = [_load(model, reports) for model in models]
    markdown = markdown_report(results)
    markdown_path = reports / "report.md"
    markdown_path.write_text(markdown)
    evaluated = [r["model"] for r in results if not r["metrics"].get("skipped")]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>anomalib-uas report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head><body>",
        "<h1>Inspection pipeline report</h1>",
        _html_table(results),
    ]
    if evaluated:
        parts.append(f"<h2>Image-level ROC</h2>{_img(_roc_figure(evaluated, reports))}")
    for model in evaluated:
        parts.append(f"<h2>{html.escape(model)}: highest-scored defects</h2>")
        for category, image, png in _overlays(model, predictions):
            caption = html.escape(f"{category}: {image}")
            parts.append(f"<figure>{_img(png)}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    html_path = reports / "report.html"
    html_path.write_text("\n".join(parts))
    return markdown_path, html_path


def _html_table(results: Sequence[dict[str, Any]]) -> str:
    rows = ["<table><tr><th>model</th><th>category</th>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>"]
    notes = []
    for result in results:
        model = html.escape(result["model"])
        metrics = result["metrics"]
        if metrics.get("skipped"):
            rows.append(f"<tr><td>{model}</td><td colspan='{len(COLUMNS) + 1}'>skipped</td></tr>")
            notes.append(f"<li><b>{model}</b> skipped: {html.escape(result['skipped']['reason'])}</li>")
            continue
        for category, row in {**metrics["categories"], "mean": metrics["mean"]}.items():
            cells = "".join(f"<td>{row[c]:.3f}</td>" if c in row else "<td>n/a</td>" for c in COLUMNS)
            rows.append(f"<tr><td>{model}</td><td>{html.escape(category)}</td>{cells}</tr>")
        notes.append(f"<li><b>{model}</b> weights: {html.escape(result['weights']['description'])}</li>")
    return "".join(rows) + "</table><ul>" + "".join(notes) + "</ul>"
