# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The ``uas`` command line: the stages of the inspection pipeline, one subcommand each.

``dvc repro`` runs them in order through ``pipelines/``; each reads ``params.yaml`` and writes fixed paths:

* ``uas data``: build the evaluation dataset at ``data/dataset`` (``demo``, ``mvtec``, ``visa`` or ``folder``);
* ``uas train MODEL``: train or fetch the model's checkpoint into ``checkpoints/MODEL`` (or record why it is
  skipped);
* ``uas evaluate MODEL``: ``Engine.test`` on every category; ``reports/MODEL`` and ``predictions/MODEL``;
* ``uas report``: ``reports/report.md`` and ``reports/report.html``;
* ``uas review``: FiftyOne review datasets of every evaluation; ``uas review --launch DATASET`` serves the App;
* ``uas serve CATEGORY [--model MODEL]``: serve the category's ``champion`` (or ``champion-MODEL``) registered
  model over REST on its exported graph, with bounded requests (body, rows, megapixels, requests in flight).

Example:
    $ uas data && uas train metauas && uas evaluate metauas && uas report
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from anomalib_uas.models.loading import MODEL_NAMES
from anomalib_uas.serving import limits

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``uas``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="uas",
        description="Universal anomaly segmentation with anomalib: the stages of the inspection pipeline.",
        epilog="Run `dvc repro` to run all stages with caching; each stage reads params.yaml.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress messages.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("data", help="Build the evaluation dataset (params: data) at data/dataset.")
    train = commands.add_parser("train", help="Train or fetch a model's checkpoint into checkpoints/MODEL.")
    train.add_argument("model", choices=MODEL_NAMES)
    evaluate = commands.add_parser("evaluate", help="Engine.test of a model on every category; metrics and maps.")
    evaluate.add_argument("model", choices=MODEL_NAMES)
    commands.add_parser("report", help="Comparison table of all models (reports/report.md and report.html).")
    review = commands.add_parser("review", help="Build the FiftyOne review datasets; --launch serves the App.")
    review.add_argument("--launch", metavar="DATASET", help="Serve the App for this dataset (e.g. uas-metauas-brick).")
    review.add_argument("--view", default="false_positives", help="Saved view to open (%(default)s).")
    review.add_argument("--port", type=int, default=5151, help="App port (%(default)s).")
    serve = commands.add_parser("serve", help="Serve a category's champion model over REST (MLflow's scoring server).")
    serve.add_argument("category", help="Category whose registered model `anomalib-uas-<category>@champion` is served.")
    serve.add_argument("--host", default="127.0.0.1", help="Interface to listen on (%(default)s).")
    serve.add_argument("--port", type=int, default=5055, help="Port (%(default)s).")
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
        "--image-root", type=Path, help="Folder whose images requests may name by image_path (default: none may)."
    )
    return parser


def _serve(args: argparse.Namespace) -> None:
    import mlflow

    from anomalib_uas import tracking
    from anomalib_uas.serving import Limits
    from anomalib_uas.serving.http import serve

    mlflow.set_tracking_uri(tracking.tracking_uri())  # resolves models:/<name>@<alias>
    alias = "champion" if args.model is None else f"champion-{args.model}"
    uri = f"models:/{tracking.registered_name(args.category)}@{alias}"
    if args.image_root is not None and not args.image_root.is_dir():
        msg = f"--image-root {args.image_root} is not a folder; give the folder whose images requests may name."
        raise ValueError(msg)
    bounds = Limits(
        max_body_bytes=int(args.max_body_mb * 1_000_000),
        max_rows=args.max_rows,
        max_megapixels=args.max_megapixels,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
        image_root=args.image_root,
    )
    print(f"Serving {uri} on http://{args.host}:{args.port}/invocations")
    serve(uri, host=args.host, port=args.port, limits=bounds)


def _run(args: argparse.Namespace) -> None:
    from anomalib_uas import pipeline
    from anomalib_uas.evaluation import format_table

    if args.command == "serve":
        _serve(args)
        return
    if args.command == "review" and args.launch:
        from anomalib_uas.review import launch_review

        session = launch_review(args.launch, port=args.port, view=args.view)
        print(f"FiftyOne App: http://127.0.0.1:{args.port} (dataset {args.launch}, view {args.view}); Ctrl-C stops it")
        session.wait()
        return
    params = pipeline.load_params(args.params)
    if args.command == "data":
        print(f"Dataset ready at {pipeline.prepare_data(params)}")
    elif args.command == "train":
        status = pipeline.prepare_weights(args.model, params)
        detail = status.get("description") or status.get("reason")
        print(f"{args.model}: {status['status']}: {detail}")
    elif args.command == "evaluate":
        metrics = pipeline.evaluate(args.model, params)
        if metrics["skipped"]:
            print(f"{args.model}: skipped ({pipeline.read_status(args.model)['reason']})")
        else:
            rows = [{"category": name, **row} for name, row in metrics["categories"].items()]
            print(format_table(rows))
            print(f"Weights: {pipeline.read_status(args.model)['description']}")
    elif args.command == "review":
        for name, counts in pipeline.review(params).items():
            print(
                f"{name}: {counts['samples']} samples, {counts['FP']} false positives, {counts['FN']} false negatives"
            )
    else:
        import mlflow

        from anomalib_uas import tracking
        from anomalib_uas.report import write_report

        with tracking.stage_run("report", None, params):
            markdown, page = write_report(params["models"])
            mlflow.log_artifact(str(markdown), artifact_path="report")
            mlflow.log_artifact(str(page), artifact_path="report")
        print(markdown.read_text())
        print(f"Report: {markdown} and {page}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``uas``.

    Args:
        argv: Arguments; ``sys.argv[1:]`` by default.

    Returns:
        The exit code: 0 on success, 2 for bad input or an unusable weights file (the message says what to fix).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from anomalib_uas.weights import WeightsError

    try:
        _run(args)
    except (ValueError, FileNotFoundError, KeyError, WeightsError) as exc:
        print(f"uas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
