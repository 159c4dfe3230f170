# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The comparison report of the pipeline: models x categories x metrics and timings.

Reads what the evaluate stages wrote (``reports/<model>/metrics.json`` and ``roc.csv``; ``predictions/<model>/`` with
``evaluation.json``, which names the weights or the reason the model was skipped) and
writes ``reports/report.md`` and a self-contained ``reports/report.html`` (plots and sample overlays embedded as
base64 PNG, no external scripts or styles, so it opens offline).

Example:
    >>> from anomalib_uas.report import render_report
    >>> markdown, page = render_report(["metauas"], Path("reports"), Path("predictions"))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_uas.figures import overlays, roc_figure
from anomalib_uas.params import METRICS

__all__ = ["markdown_report", "render_report"]

COLUMNS = [*METRICS, "false_alarm_rate", "miss_rate", "ms_per_image"]


def _load(model: str, reports: Path, predictions: Path) -> dict[str, Any]:
    return {
        "model": model,
        "metrics": json.loads((reports / model / "metrics.json").read_text()),
        **json.loads((predictions / model / "evaluation.json").read_text()),
    }


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
            notes.append(f"- **{result['model']}** skipped: {result['skipped']}")
            continue
        for category, row in {**metrics["categories"], "**mean**": metrics["mean"]}.items():
            values = " | ".join(f"{row[c]:.3f}" if c in row else "n/a" for c in COLUMNS)
            lines.append(f"| {result['model']} | {category} | {values} |")
        notes.append(f"- **{result['model']}** weights: {result['weights']}")
    return "\n".join([*lines, "", "## Models", "", *notes, "", *_alarm_table(results), ""])


ALARM_COLUMNS = (
    "threshold",
    "FP before",
    "FP now",
    "FN now",
    "feedback normal / hard",
    "feedback normals alarming",
    "hard cases missed",
)


def alarm_rows(results: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """Per evaluated model and category: the false positives at the image threshold, before and after the feedback.

    Args:
        results: One entry per model, as loaded from the reports folder.

    Returns:
        ``(model, category, cells)`` with the cells of :data:`ALARM_COLUMNS`.
    """
    rows = []
    for result in results:
        for category, found in result.get("thresholds", {}).items():
            marks = result.get("feedback", {}).get(category, {"normal": 0, "hard": 0})
            cells = [
                found["threshold_basis"],
                str(found.get("previous_test_FP", "n/a")),
                str(found["test_FP"]),
                str(found["test_FN"]),
                f"{marks['normal']} / {marks['hard']}",
                str(found["feedback_normal_alarms"]),
                str(found["feedback_hard_missed"]),
            ]
            rows.append((result["model"], category, cells))
    return rows


def _alarm_table(results: Sequence[dict[str, Any]]) -> list[str]:
    rows = alarm_rows(results)
    if not rows:
        return []
    lines = [
        "## False positives at the image threshold",
        "",
        "| model | category | " + " | ".join(ALARM_COLUMNS) + " |",
    ]
    lines.append("|---" * (len(ALARM_COLUMNS) + 2) + "|")
    lines += [f"| {model} | {category} | " + " | ".join(cells) + " |" for model, category, cells in rows]
    return lines


def _img(png: bytes) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def render_report(models: Sequence[str], reports: Path, predictions: Path) -> tuple[str, str]:
    """The comparison report as Markdown and as a self-contained HTML page.

    Args:
        models: Models of the pipeline.
        reports: The reports folder (``<model>/metrics.json``, ``<model>/roc.csv``).
        predictions: The predictions folder (``<model>/evaluation.json``, ``<model>/<category>/predictions.npz``).

    Returns:
        The Markdown text and the HTML page.
    """
    results = [_load(model, reports, predictions) for model in models]
    evaluated = [r["model"] for r in results if not r["metrics"].get("skipped")]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>anomalib-uas report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head><body>",
        "<h1>Inspection pipeline report</h1>",
        _html_table(results),
        _html_alarms(results),
    ]
    if evaluated:
        roc = roc_figure({model: reports / model / "roc.csv" for model in evaluated})
        parts.append(f"<h2>Image-level ROC</h2>{_img(roc)}")
    for model in evaluated:
        parts.append(f"<h2>{html.escape(model)}: highest-scored defects</h2>")
        for category, image, png in overlays(predictions / model):
            caption = html.escape(f"{category}: {image}")
            parts.append(f"<figure>{_img(png)}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    return markdown_report(results), "\n".join(parts)


def _html_table(results: Sequence[dict[str, Any]]) -> str:
    rows = ["<table><tr><th>model</th><th>category</th>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>"]
    notes = []
    for result in results:
        model = html.escape(result["model"])
        metrics = result["metrics"]
        if metrics.get("skipped"):
            rows.append(f"<tr><td>{model}</td><td colspan='{len(COLUMNS) + 1}'>skipped</td></tr>")
            notes.append(f"<li><b>{model}</b> skipped: {html.escape(result['skipped'])}</li>")
            continue
        for category, row in {**metrics["categories"], "mean": metrics["mean"]}.items():
            cells = "".join(f"<td>{row[c]:.3f}</td>" if c in row else "<td>n/a</td>" for c in COLUMNS)
            rows.append(f"<tr><td>{model}</td><td>{html.escape(category)}</td>{cells}</tr>")
        notes.append(f"<li><b>{model}</b> weights: {html.escape(result['weights'])}</li>")
    return "".join(rows) + "</table><ul>" + "".join(notes) + "</ul>"


def _html_alarms(results: Sequence[dict[str, Any]]) -> str:
    rows = alarm_rows(results)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("model", "category", *ALARM_COLUMNS))
    body = "".join(
        f"<tr><td>{html.escape(model)}</td><td>{html.escape(category)}</td>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        + "</tr>"
        for model, category, cells in rows
    )
    return f"<h2>False positives at the image threshold</h2><table><tr>{head}</tr>{body}</table>"
