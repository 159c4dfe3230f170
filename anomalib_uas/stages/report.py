# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``report``: models x categories x metrics and the deployed decisions, as Markdown and an offline HTML page.

It reads the evaluate and calibrate stages' outputs, writes ``report.md`` and ``report.html`` and logs both to an
MLflow run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import mlflow

from anomalib_uas import tracking
from anomalib_uas.params import load_params
from anomalib_uas.report import render_report
from anomalib_uas.stages import run_stage
from anomalib_uas.stages.outputs import replacing

__all__ = ["cli", "main"]


def main(params_file: Path, reports: Path, predictions: Path, calibration: Path, markdown: Path, page: Path) -> str:
    """Write the report.

    Args:
        params_file: ``params.yaml`` (``models``).
        reports: The reports folder (``<model>/metrics.json``, ``<model>/roc.csv``).
        predictions: The predictions folder (``<model>/evaluation.json``, ``<model>/<category>/predictions.npz``
            and ``normals.npz``).
        calibration: The calibration folder (``<model>/calibration.json``).
        markdown: The Markdown report to write.
        page: The HTML report to write.

    Returns:
        The Markdown text.
    """
    params = load_params(params_file)
    text, html = render_report(params.models, reports, predictions, calibration)
    with replacing(markdown, page) as (markdown_out, page_out):
        markdown_out.write_text(text)
        page_out.write_text(html)
    with tracking.stage_run("report", None, params.as_dict()):
        mlflow.log_artifact(str(markdown), artifact_path="report")
        mlflow.log_artifact(str(page), artifact_path="report")
    return text


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas report``: write the report.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas report", description="Report of every model and its decisions.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="Reports folder (%(default)s).")
    parser.add_argument("--predictions", type=Path, default=Path("predictions"), help="Predictions (%(default)s).")
    parser.add_argument("--calibration", type=Path, default=Path("calibration"), help="Calibration (%(default)s).")
    parser.add_argument("--markdown", type=Path, default=Path("reports/report.md"), help="Output (%(default)s).")
    parser.add_argument("--html", type=Path, default=Path("reports/report.html"), help="Output (%(default)s).")

    def run(args: argparse.Namespace) -> str:
        text = main(args.params, args.reports, args.predictions, args.calibration, args.markdown, args.html)
        return f"{text}\nReport: {args.markdown} and {args.html}"

    return run_stage("report", parser, run, argv)
