# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The stages of the inspection pipeline, one module each, run by ``dvc repro`` (``dvc.yaml``) and by ``uas``.

Each stage module has a ``main`` that receives its input and output paths (``dvc.yaml`` declares every path once
and passes it on the command line) and a ``cli`` that parses them. Every stage reads and checks ``params.yaml``
first, checks its inputs, writes into a staging folder and replaces its outputs only on success
(:mod:`anomalib_uas.stages.outputs`): on any failure the previous outputs are intact.

Data flows one way, each stage reading only what the stage before it wrote: ``data`` -> ``weights@<model>`` ->
``evaluate@<model>`` -> ``report`` and ``review``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from anomalib_uas.params import ParamsError
from anomalib_uas.weights import WeightsError

__all__ = ["StageError", "run_stage"]


class StageError(RuntimeError):
    """A stage cannot run on its inputs; the message is one line naming the problem and the fix."""


def run_stage(
    stage: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], str], argv: Sequence[str] | None
) -> int:
    """Parse a stage's arguments, run it, and turn expected failures into one line and exit code 2.

    Args:
        stage: The stage's name, for messages.
        parser: The stage's argument parser (``--verbose`` is added).
        run: Runs the stage and returns what to print on success.
        argv: Arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        0 on success, 2 for bad parameters, inputs or weights (the message says what to fix).
    """
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress messages.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        message = run(args)
    except (ParamsError, StageError, WeightsError, ValueError, FileNotFoundError) as exc:
        text = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"uas {stage}: error: {text}", file=sys.stderr)
        return 2
    print(message)
    return 0
