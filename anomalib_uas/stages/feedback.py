# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``feedback``: export the images reviewers marked in FiftyOne into versioned per-category folders.

A reviewer tags a false positive ``feedback:normal`` and a missed defect ``feedback:hard`` (in the App or through
the API, see :mod:`anomalib_uas.feedback`). This stage writes ``<output>/<category>/{normal,hard}`` and a provenance
record per image; the evaluate stages read it. Its input is the FiftyOne database, which DVC cannot hash, so the
stage runs on every ``dvc repro`` (``always_changed``); its output is deterministic, so nothing downstream reruns
unless the marks changed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from anomalib_uas.database import connect_database
from anomalib_uas.params import load_params
from anomalib_uas.stages import run_stage

__all__ = ["cli", "main"]


def main(params_file: Path, output: Path) -> dict[str, dict[str, int]]:
    """Export the feedback of every category of ``data.categories``.

    Marks are read from this pipeline's review datasets (``uas-<model>-<category>``) and from the ``uas predict
    --review`` datasets of its categories; other datasets in the same database are not this pipeline's.

    Args:
        params_file: ``params.yaml``.
        output: The feedback folder (``data/feedback``).

    Returns:
        Per category, the number of exported normal and hard images.
    """
    from anomalib_uas.feedback import export_feedback
    from anomalib_uas.review import dataset_name, fo, predict_dataset_name

    params = load_params(params_file)
    connect_database()
    categories = params.data.categories
    names = [dataset_name(model, category) for model in params.models for category in categories]
    names += [predict_dataset_name(category) for category in categories]
    return export_feedback(output, datasets=[name for name in names if fo.dataset_exists(name)], categories=categories)


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas feedback``: export the reviewers' marks.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas feedback", description="Export the reviewers' feedback images.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--output", type=Path, default=Path("data/feedback"), help="Output folder (%(default)s).")

    def run(args: argparse.Namespace) -> str:
        counts = main(args.params, args.output)
        return "\n".join(f"{c}: {n['normal']} normal, {n['hard']} hard" for c, n in counts.items()) or "no feedback"

    return run_stage("feedback", parser, run, argv)
