# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The report of the pipeline: models x categories x metrics, the deployed decisions and what they guarantee.

Reads what the evaluate and calibrate stages wrote: ``reports/<model>/metrics.json`` and ``roc.csv``;
``predictions/<model>/evaluation.json`` (the weights) and per category ``predictions.npz`` and ``normals.npz``;
``calibration/<model>/calibration.json`` (thresholds from normal images only, their certified false-alarm bound,
the test rates with Clopper-Pearson intervals, the feedback, or the reason the model was skipped). Writes
``reports/report.md`` and a self-contained ``reports/report.html`` with, per model and category, a histogram of the
scores around the image threshold and thumbnails of the false positives and misses (PNG embedded as base64, no
external scripts or styles, so it opens offline).

Example:
    >>> from anomalib_uas.report import render_report
    >>> markdown, page = render_report(
    ...     ["metauas"], Path("reports"), Path("predictions"), Path("calibration")
    ... )  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from anomalib_uas.calibration import NORMAL_GROUPS
from anomalib_uas.figures import error_thumbnails, roc_figure, score_histogram
from anomalib_uas.params import METRICS

__all__ = ["Table", "decision_tables", "markdown_report", "render_report"]

RATES = ("false_alarm_rate", "miss_rate")
COLUMNS = [*METRICS, *RATES, "ms_per_image"]
THUMBNAILS = 6


class Table(NamedTuple):
    """A table of the report, rendered as Markdown and as HTML.

    Args:
        title: Its heading.
        note: A sentence under the heading that says how to read it.
        columns: Column names after ``model`` and ``category``.
        rows: Per model and category: model, category, then one cell per column.
    """

    title: str
    note: str
    columns: tuple[str, ...]
    rows: list[list[str]]


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _load(model: str, reports: Path, predictions: Path, calibration: Path) -> dict[str, Any]:
    return {
        "model": model,
        "metrics": _read(reports / model / "metrics.json"),
        "evaluation": _read(predictions / model / "evaluation.json"),
        "calibration": _read(calibration / model / "calibration.json"),
    }


def _calibrated(results: Sequence[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(model, category, calibration of the category)`` of every model that was not skipped."""
    for result in results:
        if not result["calibration"]["skipped"]:
            for category, found in result["calibration"]["categories"].items():
                yield result["model"], category, found


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.3g} %"


def _rate(events: int, trials: int, rate: float, interval: Sequence[float]) -> str:
    return f"{events} / {trials} = {_percent(rate)} [{_percent(interval[0])}, {_percent(interval[1])}]"


def _certified(image: dict[str, Any]) -> str:
    if image["certified"]:
        return "yes"
    return (
        f"no: needs {image['normals_needed']} normals, has {image['normals']}; "
        f"certifies {_percent(image['certified_fpr'])} now"
    )


def _decision_row(found: dict[str, Any]) -> list[str]:
    decision = found["decision"]
    basis = decision["threshold_basis"]
    image, used = basis["image"], basis["normals"]
    return [
        f"{image['normals']} ({used['held_out']} + {used['feedback']})",
        f"{decision['image_threshold']:.4g}",
        _percent(image["certified_fpr"]),
        f"{_percent(image['target_fpr'])} at {_percent(image['confidence'])} confidence",
        _certified(image),
        f"{decision['pixel_threshold']:.4g}",
        _percent(basis["pixel"]["certified_fpr"]),
        decision["threshold_version"],
    ]


def _test_row(found: dict[str, Any]) -> list[str]:
    test = found["test"]
    return [
        _rate(test["FP"], test["normal"], test["false_alarm_rate"], test["false_alarm_ci"]),
        _rate(test["FN"], test["defective"], test["miss_rate"], test["miss_ci"]),
        "yes" if test["within_bound"] else "no",
    ]


def _recalibration_row(found: dict[str, Any]) -> list[str]:
    previous, test, feedback = found["previous"] or {}, found["test"], found["feedback"]
    before = f"{previous['image_threshold']:.4g}" if previous else "n/a"
    return [
        f"{before} -> {found['decision']['image_threshold']:.4g}",
        f"{_percent(previous.get('false_alarm_rate'))} -> {_percent(test['false_alarm_rate'])}",
        f"{previous.get('FP', 'n/a')} -> {test['FP']}",
        f"{feedback['normal']} / {feedback['hard']}",
        str(feedback["normal_alarms"]),
        str(feedback["hard_missed"]),
    ]


def _f1_row(found: dict[str, Any]) -> list[str]:
    decision, f1 = found["decision"], found["f1"]
    return [
        f"{f1['image_threshold']:.4g}",
        f"{decision['image_threshold']:.4g}",
        f"{f1['pixel_threshold']:.4g}",
        f"{decision['pixel_threshold']:.4g}",
    ]


def decision_tables(results: Sequence[dict[str, Any]]) -> list[Table]:
    """The tables of the deployed decisions of every calibrated model and category.

    Args:
        results: One entry per model: ``model``, ``metrics``, ``evaluation`` and ``calibration`` (the JSON files).

    Returns:
        The decisions and their guarantee, the test rates, the recalibration by feedback and the F1-optimal
        thresholds (evaluation figures that use test labels); none when every model was skipped.
    """
    found = list(_calibrated(results))
    if not found:
        return []
    specs = [
        (
            "Deployed decision: thresholds from normal images only",
            "With the stated confidence, the false-alarm rate on new normal parts is at most the certified bound "
            "(an order statistic of the normals' scores; distribution-free if new normal parts score like them). "
            "The pixel bound is the probability that a new normal part shows any masked pixel.",
            (
                "normals (held-out + feedback)",
                "image threshold",
                "certified false-alarm bound",
                "target",
                "target certified",
                "pixel threshold",
                "certified pixel bound",
                "threshold version",
            ),
            _decision_row,
        ),
        (
            "Test rates at the deployed thresholds",
            "Test labels are used here only. Rates with their 95 % Clopper-Pearson interval; within bound: the "
            "interval's lower end does not exceed the certified false-alarm bound.",
            ("false alarms (95 % CI)", "misses (95 % CI)", "within bound"),
            _test_row,
        ),
        (
            "Recalibration with feedback",
            "Before: the previous calibration (n/a for the first). Feedback normals recalibrate the image threshold; "
            "the alarms and misses count feedback images at the deployed threshold.",
            (
                "image threshold before -> after",
                "test false-alarm rate before -> after",
                "test FP before -> after",
                "feedback normal / hard",
                "feedback normals alarming",
                "hard cases missed",
            ),
            _recalibration_row,
        ),
        (
            "Evaluation figures: F1-optimal thresholds (uses test labels)",
            "Chosen with the test set's labels and masks, so the test rates at them are optimistic; never "
            "deployed. The deployed thresholds are shown beside them.",
            (
                "F1 image threshold (uses test labels)",
                "deployed image threshold",
                "F1 pixel threshold (uses test labels)",
                "deployed pixel threshold",
            ),
            _f1_row,
        ),
    ]
    return [
        Table(title, note, columns, [[model, category, *row(entry)] for model, category, entry in found])
        for title, note, columns, row in specs
    ]


def _metric_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """``(category, values)`` of a calibrated model and its mean: metrics.json with the test rates of calibration."""
    metrics, calibrated = result["metrics"], result["calibration"]
    rows = []
    for category, values in metrics["categories"].items():
        test = calibrated["categories"].get(category, {}).get("test", {})
        rows.append((category, {**values, **{rate: test[rate] for rate in RATES if rate in test}}))
    rows.append(("mean", {**metrics["mean"], **{rate: calibrated["mean"][rate] for rate in RATES}}))
    return rows


def _value(row: dict[str, float], column: str) -> str:
    value = row.get(column)
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _markdown_table(table: Table) -> list[str]:
    return [
        f"## {table.title}",
        "",
        table.note,
        "",
        "| model | category | " + " | ".join(table.columns) + " |",
        "|---" * (len(table.columns) + 2) + "|",
        *("| " + " | ".join(row) + " |" for row in table.rows),
        "",
    ]


def markdown_report(results: Sequence[dict[str, Any]]) -> str:
    """Format the report as Markdown.

    Args:
        results: One entry per model: ``model``, ``metrics``, ``evaluation`` and ``calibration`` (the JSON files).

    Returns:
        The Markdown text.
    """
    lines = ["# Inspection pipeline report", "", "| model | category | " + " | ".join(COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    notes = []
    for result in results:
        skipped = result["calibration"]["skipped"]
        if skipped:
            lines.append(f"| {result['model']} | (skipped) |" + " |" * len(COLUMNS))
            notes.append(f"- **{result['model']}** skipped: {skipped}")
            continue
        for category, row in _metric_rows(result):
            values = " | ".join(_value(row, column) for column in COLUMNS)
            lines.append(f"| {result['model']} | {'**mean**' if category == 'mean' else category} | {values} |")
        notes.append(f"- **{result['model']}** weights: {result['evaluation']['weights']}")
    tables = [line for table in decision_tables(results) for line in _markdown_table(table)]
    return "\n".join([*lines, "", "## Models", "", *notes, "", *tables])


def _img(png: bytes, alt: str, kind: str) -> str:
    source = base64.b64encode(png).decode("ascii")
    return f"<img class='{kind}' alt='{html.escape(alt)}' src='data:image/png;base64,{source}'>"


def _html_metrics(results: Sequence[dict[str, Any]]) -> str:
    rows = ["<table><tr><th>model</th><th>category</th>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>"]
    notes = []
    for result in results:
        model = html.escape(result["model"])
        skipped = result["calibration"]["skipped"]
        if skipped:
            rows.append(f"<tr><td>{model}</td><td colspan='{len(COLUMNS) + 1}'>skipped</td></tr>")
            notes.append(f"<li><b>{model}</b> skipped: {html.escape(skipped)}</li>")
            continue
        for category, row in _metric_rows(result):
            cells = "".join(f"<td>{_value(row, column)}</td>" for column in COLUMNS)
            rows.append(f"<tr><td>{model}</td><td>{html.escape(category)}</td>{cells}</tr>")
        notes.append(f"<li><b>{model}</b> weights: {html.escape(result['evaluation']['weights'])}</li>")
    return "".join(rows) + "</table><ul>" + "".join(notes) + "</ul>"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in ("model", "category", *table.columns))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table.rows)
    return f"<h2>{html.escape(table.title)}</h2><p>{html.escape(table.note)}</p><table><tr>{head}</tr>{body}</table>"


def _html_category(model: str, category: str, found: dict[str, Any], folder: Path) -> str:
    """The score histogram and the error thumbnails of one model and category."""
    decision = found["decision"]
    low, high = decision["threshold_basis"]["heatmap_range"]
    saved = dict(np.load(folder / "predictions.npz"))
    normals = np.load(folder / "normals.npz")
    labels, scores = saved["gt_label"], saved["pred_score"]
    groups = {
        "calibration normals": normals["pred_score"][np.isin(normals["group"], NORMAL_GROUPS)],
        "test normals": scores[labels == 0],
        "test defects": scores[labels == 1],
    }
    name = f"{model} / {category}"
    histogram = score_histogram(groups, decision["image_threshold"], f"{name}: image scores")
    parts = [
        f"<section class='category'><h3>{html.escape(name)}</h3>",
        _img(histogram, f"{name}: score histogram", "histogram"),
        f"<p>Maps coloured on the fixed range [{low:.4g}, {high:.4g}]; white contour: the predicted mask at the "
        f"pixel threshold {decision['pixel_threshold']:.4g}.</p>",
    ]
    thumbnails = error_thumbnails(
        saved, decision["image_threshold"], decision["pixel_threshold"], (low, high), THUMBNAILS
    )
    for kind, total, images in thumbnails:
        shown = f", the {len(images)} clearest shown" if len(images) < total else ""
        parts.append(f"<h4>{kind.capitalize()}: {total}{shown}</h4>")
        if not images:
            parts.append(f"<p class='none' data-kind='{kind}'>none</p>")
        for image, score, png in images:
            caption = html.escape(f"{image} (score {score:.4g})")
            parts.append(
                f"<figure data-kind='{kind}'>{_img(png, f'{name}: {image}', 'thumbnail')}"
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</section>")
    return "".join(parts)


STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
    "figure{display:inline-block;margin:4px}figcaption{font-size:11px}"
)


def render_report(models: Sequence[str], reports: Path, predictions: Path, calibration: Path) -> tuple[str, str]:
    """The report as Markdown and as a self-contained HTML page.

    Args:
        models: Models of the pipeline.
        reports: The reports folder (``<model>/metrics.json``, ``<model>/roc.csv``).
        predictions: The predictions folder (``<model>/evaluation.json``, ``<model>/<category>/predictions.npz``
            and ``normals.npz``).
        calibration: The calibration folder (``<model>/calibration.json``).

    Returns:
        The Markdown text and the HTML page.
    """
    results = [_load(model, reports, predictions, calibration) for model in models]
    evaluated = [r["model"] for r in results if not r["calibration"]["skipped"]]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>anomalib-uas report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Inspection pipeline report</h1>",
        _html_metrics(results),
        *(_html_table(table) for table in decision_tables(results)),
    ]
    if evaluated:
        roc = roc_figure({model: reports / model / "roc.csv" for model in evaluated})
        parts.append(f"<h2>Image-level ROC</h2>{_img(roc, 'image-level ROC', 'roc')}")
    current = None
    for model, category, found in _calibrated(results):
        if model != current:
            parts.append(f"<h2>{html.escape(model)}: scores and errors at the deployed thresholds</h2>")
            current = model
        parts.append(_html_category(model, category, found, predictions / model / category))
    parts.append("</body></html>")
    return markdown_report(results), "\n".join(parts)
