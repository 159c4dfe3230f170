# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The ``uas`` command line.

Subcommands:

* ``uas data``: generate the offline demo dataset (MVTec AD layout, synthesized defects with masks);
* ``uas evaluate``: evaluate MetaUAS on categories of a dataset through ``Engine.test``, print a metrics table
  and say which weights were used (generating the demo dataset first when it is the default and missing).

Example:
    $ uas data --root datasets/demo
    $ uas evaluate --root datasets/demo --output results/metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

DEFAULT_ROOT = Path("datasets/demo")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``uas``.

    Returns:
        The parser.
    """
    from anomalib_uas.data import DEMO_CATEGORIES

    parser = argparse.ArgumentParser(prog="uas", description="Universal anomaly segmentation with anomalib.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="Generate the offline demo dataset (MVTec AD layout).")
    data.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Output folder (default: %(default)s).")
    data.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES), help="Categories to generate.")
    data.add_argument("--image-size", type=int, default=256, help="Image side in pixels (default: %(default)s).")
    data.add_argument("--seed", type=int, default=0, help="Seed of the generator (default: %(default)s).")

    evaluate = commands.add_parser("evaluate", help="Evaluate MetaUAS on an MVTec-layout dataset with Engine.test.")
    evaluate.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Dataset root (default: %(default)s).")
    evaluate.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES), help="Categories to evaluate.")
    evaluate.add_argument("--image-size", type=int, default=256, help="Model input size, a multiple of 32.")
    evaluate.add_argument("--k-shot", type=int, default=1, help="Prompt images per query (default: %(default)s).")
    evaluate.add_argument(
        "--prompt-strategy", choices=["random", "retrieval"], default="random", help="How prompts are chosen."
    )
    evaluate.add_argument("--seed", type=int, default=0, help="Seed of the prompt choice (default: %(default)s).")
    evaluate.add_argument("--results-dir", type=Path, default=Path("results"), help="Engine output folder.")
    evaluate.add_argument("--output", type=Path, default=None, help="Write the metrics rows to this JSON file.")
    return parser


def _data(args: argparse.Namespace) -> None:
    from anomalib_uas.data import generate_demo_dataset

    root = generate_demo_dataset(args.root, categories=args.categories, image_size=args.image_size, seed=args.seed)
    print(f"Demo dataset with categories {', '.join(args.categories)} in {root}")


def _evaluate(args: argparse.Namespace) -> None:
    from anomalib_uas.data import DEMO_CATEGORIES, generate_demo_dataset
    from anomalib_uas.evaluation import best_offline_metauas_weights, evaluate_metauas, format_table

    if args.root == DEFAULT_ROOT and set(args.categories) <= set(DEMO_CATEGORIES):
        generate_demo_dataset(args.root, categories=list(DEMO_CATEGORIES))
    weights = best_offline_metauas_weights(args.image_size)
    print(f"Weights: {weights.description}")
    rows = evaluate_metauas(
        args.root,
        args.categories,
        weights=weights,
        image_size=args.image_size,
        k_shot=args.k_shot,
        prompt_strategy=args.prompt_strategy,
        seed=args.seed,
        output_dir=args.results_dir,
    )
    print(format_table(rows))
    print(f"Weights: {weights.description}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``uas``.

    Args:
        argv: Arguments; ``sys.argv[1:]`` by default.

    Returns:
        The exit code: 0 on success, 2 for bad input (the message says what to fix).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        {"data": _data, "evaluate": _evaluate}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"uas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
