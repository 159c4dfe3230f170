# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The ``uas`` command line: the stages of the inspection pipeline, the review App and the REST server.

``dvc repro`` runs the stages through ``pipelines/`` with the paths of ``dvc.yaml``; ``uas`` runs the same stage
modules (:mod:`anomalib_uas.stages`) with the default paths:

* ``uas data``: build the evaluation dataset at ``data/dataset`` (``demo``, ``mvtec``, ``visa`` or ``folder``);
* ``uas weights MODEL``: train or fetch the model's checkpoint into ``checkpoints/MODEL`` (or record why it is
  skipped);
* ``uas evaluate MODEL``: ``Engine.test`` on every category; ``reports/MODEL`` and ``predictions/MODEL``;
* ``uas calibrate MODEL``: the deployed thresholds from normal images only, with their certified false-alarm bound
  (``calibration/MODEL``);
* ``uas register MODEL``: register each calibrated category in MLflow and move the champion aliases
  (``registered/MODEL``);
* ``uas report``: ``reports/report.md`` and ``reports/report.html`` (metrics, deployed decisions, error thumbnails);
* ``uas review``: FiftyOne review datasets of every evaluation, updated in place (``--rebuild`` starts clean);
  ``uas review --launch DATASET [--timeout S]`` serves the App and leaves no process behind;
* ``uas feedback``: export the images reviewers marked ``feedback:normal`` / ``feedback:hard`` to ``data/feedback``;
* ``uas predict FOLDER --category C``: score a folder with the category's champion (CSV, masks, heatmaps, an
  offline contact sheet; ``--review`` adds the results to FiftyOne);
* ``uas serve CATEGORY [--model MODEL]``: serve the category's ``champion`` (or ``champion-MODEL``) registered
  model over REST on its exported graph, with bounded requests (body, rows, megapixels, requests in flight).

Each stage takes ``--help`` for its own options. Every command that fails ends in one line on stderr, never a
traceback, and its exit code says which kind of failure it was:

* 2: bad input (parameters, files, weights, a missing model or database); the line names the fix;
* 1: an unexpected failure; the line says what happened and names the log file that holds the traceback,
  ``logs/uas-<command>-<UTC time>-<pid>.log`` under the working directory (under the temp folder where that cannot
  be written);
* 130: interrupted (Ctrl-C).

Example:
    $ uas data && uas weights metauas && uas evaluate metauas && uas calibrate metauas && uas register metauas
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from anomalib_uas.params import MODEL_NAMES
from anomalib_uas.serving import limits
from anomalib_uas.stages import StageError, guarded

__all__ = ["build_parser", "main"]

STAGES = {
    "data": "Build the evaluation dataset (params: data) at data/dataset.",
    "weights": "Train or fetch a model's checkpoint into checkpoints/MODEL.",
    "evaluate": "Engine.test of a model on every category; metrics, curves and predictions.",
    "calibrate": "Thresholds of a model from normal images only, with their certified false-alarm bound.",
    "register": "Register a model's calibrated categories in MLflow (champion aliases).",
    "report": "Comparison of all models and their deployed decisions (reports/report.md and report.html).",
    "review": "Build the FiftyOne review datasets (--launch DATASET serves the App).",
    "feedback": "Export the images reviewers marked feedback:normal / feedback:hard to data/feedback.",
}
# Failures of bad input: one line and exit code 2, never a traceback (other failures: see stages.guarded).
INPUT_ERRORS = (ValueError, FileNotFoundError, KeyError, StageError)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``uas``.

    Returns:
        The parser; a stage's own arguments are parsed by the stage.
    """
    parser = argparse.ArgumentParser(
        prog="uas",
        description="Universal anomaly segmentation with anomalib: the stages of the inspection pipeline.",
        epilog="Run `dvc repro` to run all stages with caching; `uas STAGE --help` lists a stage's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGES.items():
        commands.add_parser(name, help=text)  # dispatched to the stage module before parsing (see main)
    predict = commands.add_parser("predict", help="Score a folder of images with a category's registered champion.")
    predict.add_argument("folder", type=Path, help="Folder of images (searched recursively).")
    predict.add_argument("--category", required=True, help="Category whose registered model scores the images.")
    predict.add_argument("--model", choices=MODEL_NAMES, help="Use this model's best version (alias champion-<model>).")
    predict.add_argument("--checkpoint", help="A logged model instead: models:/ or runs:/ URI, or MLflow model folder.")
    predict.add_argument("--output", type=Path, help="Output folder (predict/<category>/<folder name>).")
    predict.add_argument("--review", action="store_true", help="Add the results to the FiftyOne dataset uas-predict-C.")
    predict.add_argument(
        "--max-megapixels",
        type=float,
        default=limits.DEFAULT_MAX_MEGAPIXELS,
        help="Larger images are skipped with their reason in the table (%(default)s).",
    )
    serve = commands.add_parser("serve", help="Serve a category's champion model over REST (MLflow's scoring server).")
    serve.add_argument("category", help="Category whose registered model `anomalib-uas-<category>@champion` is served.")
    serve.add_argument("--host", default="127.0.0.1", help="Interface to listen on (%(default)s).")
    serve.add_argument("--port", type=int, default=5055, help="Port, 1 to 65535 (%(default)s).")
    serve.add_argument("--model", choices=MODEL_NAMES, help="Serve this model's best version (alias champion-<model>).")
    serve.add_argument(
        "--max-body-mb", type=float, default=limits.DEFAULT_MAX_BODY_MB, help="Larger bodies get 413 (%(default)s)."
    )
    serve.add_argument(
        "--max-rows", type=int, default=limits.DEFAULT_MAX_ROWS, help="More rows per request get 413 (%(default)s)."
    )
    serve.add_argument(
        "--max-megapixels",
        type=float,
        default=limits.DEFAULT_MAX_MEGAPIXELS,
        help="More megapixels per request (all images) get 413 (%(default)s).",
    )
    serve.add_argument(
        "--max-in-flight",
        type=int,
        default=limits.DEFAULT_MAX_IN_FLIGHT,
        help="Requests handled at once; more get 503 with Retry-After (%(default)s).",
    )
    serve.add_argument(
        "--timeout", type=float, default=limits.DEFAULT_TIMEOUT_S, help="Seconds per request, then 504 (%(default)s)."
    )
    serve.add_argument(
        "--body-grace",
        type=float,
        default=limits.DEFAULT_BODY_GRACE_S,
        help="Seconds a request body may take before --min-body-rate applies (%(default)s).",
    )
    serve.add_argument(
        "--min-body-rate",
        type=float,
        default=limits.DEFAULT_MIN_BODY_KB_PER_S,
        help="kB/s a request body must keep arriving at after --body-grace, or 408 (%(default)s).",
    )
    serve.add_argument(
        "--image-root", type=Path, help="Folder whose images requests may name by image_path (default: none may)."
    )
    return parser


def _serve_limits(args: argparse.Namespace) -> limits.Limits:
    """Check ``uas serve``'s port and build the request bounds of its options.

    Args:
        args: The parsed ``uas serve`` options.

    Returns:
        The bounds.

    Raises:
        ValueError: A port outside 1-65535, a bound that is not a finite positive number, or an image root that
            is not a folder.
    """
    if not 1 <= args.port <= 65535:
        msg = f"--port must be 1 to 65535, got {args.port}."
        raise ValueError(msg)
    bounds = {
        "--max-body-mb": args.max_body_mb,
        "--max-rows": args.max_rows,
        "--max-megapixels": args.max_megapixels,
        "--max-in-flight": args.max_in_flight,
        "--timeout": args.timeout,
        "--body-grace": args.body_grace,
        "--min-body-rate": args.min_body_rate,
    }
    for option, value in bounds.items():
        if not (math.isfinite(value) and value > 0):
            msg = f"{option} must be a finite number above 0, got {value}."
            raise ValueError(msg)
    if args.image_root is not None and not args.image_root.is_dir():
        msg = f"--image-root {args.image_root} is not a folder; give the folder whose images requests may name."
        raise ValueError(msg)
    return limits.Limits(
        max_body_bytes=int(args.max_body_mb * 1_000_000),
        max_rows=args.max_rows,
        max_megapixels=args.max_megapixels,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
        image_root=args.image_root,
        body_grace_s=args.body_grace,
        min_body_rate=args.min_body_rate * 1000,
    )


def _serve(args: argparse.Namespace) -> int:
    bounds = _serve_limits(args)  # bad options fail before the slow imports
    import mlflow

    from anomalib_uas import registry, tracking
    from anomalib_uas.serving.http import serve

    mlflow.set_tracking_uri(tracking.tracking_uri())  # resolves models:/<name>@<alias>
    alias = "champion" if args.model is None else f"champion-{args.model}"
    name = registry.registered_name(args.category)
    if registry.version_of(name, alias) is None:
        print(
            f"uas serve: error: no registered model {name}@{alias} in {tracking.tracking_uri()}: run `dvc repro` "
            f"(it registers every evaluated model of data.categories) or choose another category or --model",
            file=sys.stderr,
        )
        return 2
    uri = f"models:/{name}@{alias}"
    print(f"Serving {uri} on http://{args.host}:{args.port}/invocations")
    serve(uri, host=args.host, port=args.port, limits=bounds)
    return 0


def _predict(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.max_megapixels) and args.max_megapixels > 0):
        msg = f"--max-megapixels must be a finite number above 0, got {args.max_megapixels}."
        raise ValueError(msg)
    from anomalib_uas.predict import predict_folder

    if args.review:
        from anomalib_uas.database import connect_database

        connect_database()  # before scoring: a database that does not come up fails now, not after the work
    result = predict_folder(
        args.folder, args.category, args.model, args.checkpoint, args.output, args.review, args.max_megapixels
    )
    print(f"{result.images} images scored with {result.model_uri}: {result.flagged} flagged, {result.errors} errors")
    print(f"Table: {result.csv}; contact sheet: {result.html}")
    return 0


def _launch(argv: Sequence[str]) -> int:
    from anomalib_uas.database import connect_database
    from anomalib_uas.review import serve_review

    parser = argparse.ArgumentParser(prog="uas review --launch", description="Serve the FiftyOne App.")
    parser.add_argument("--launch", metavar="DATASET", required=True, help="Dataset, e.g. uas-metauas-brick.")
    parser.add_argument("--view", default="false_positives", help="Saved view to open (%(default)s).")
    parser.add_argument("--port", type=int, default=5151, help="App port (%(default)s).")
    parser.add_argument("--timeout", type=float, help="Stop the App after this many seconds.")
    args = parser.parse_args(argv)
    connect_database()
    print(f"FiftyOne App: http://127.0.0.1:{args.port} (dataset {args.launch}, view {args.view}); Ctrl-C stops it")
    serve_review(args.launch, port=args.port, view=args.view, timeout=args.timeout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``uas``.

    Args:
        argv: Arguments; ``sys.argv[1:]`` by default.

    Returns:
        The exit code: 0 on success, 2 for bad input (the message says what to fix), 1 for an unexpected failure
        (the message names the log file with the traceback), 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        command, rest = argv[0], argv[1:]
        if command == "review" and any(a == "--launch" or a.startswith("--launch=") for a in rest):
            return _guarded(command, lambda: _launch(rest))
        # The stage handles its own failures; this catches those of its import (a broken install, Ctrl-C).
        return guarded(command, lambda: importlib.import_module(f"anomalib_uas.stages.{command}").cli(rest), ())
    args = build_parser().parse_args(argv)
    return _guarded(args.command, lambda: (_predict if args.command == "predict" else _serve)(args))


def _guarded(command: str, run: Callable[[], int]) -> int:
    """Run a command that is not a stage: bad input is one line and exit code 2, other failures as in a stage."""
    from anomalib_uas.weights import WeightsError

    return guarded(command, run, (*INPUT_ERRORS, WeightsError))


if __name__ == "__main__":
    sys.exit(main())
