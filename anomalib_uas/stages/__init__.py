# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The stages of the inspection pipeline, one module each, run by ``dvc repro`` (``dvc.yaml``) and by ``uas``.

Each stage module has a ``main`` that receives its input and output paths (``dvc.yaml`` declares every path once
and passes it on the command line) and a ``cli`` that parses them. Every stage reads and checks ``params.yaml``
first, checks its inputs, writes into a staging folder and replaces its outputs only on success
(:mod:`anomalib_uas.stages.outputs`): on any failure the previous outputs are intact.

Data flows one way, each stage reading only what the stages before it wrote: ``data`` -> ``weights@<model>`` ->
``evaluate@<model>`` (scores) -> ``calibrate@<model>`` (thresholds from normal images only) -> ``register@<model>``
(MLflow), and ``report`` and ``review`` on the evaluations and calibrations.

A stage, and every other ``uas`` command, ends in one line on stderr when it fails (:func:`guarded`): exit code 2
for bad input (the line names the fix), 1 for an unexpected failure (the line names the log file that holds the
traceback, under ``logs/`` of the working directory), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from anomalib_uas.params import ParamsError
from anomalib_uas.weights import WeightsError

__all__ = ["EXIT_FAILURE", "EXIT_INPUT", "EXIT_INTERRUPTED", "StageError", "guarded", "run_stage", "write_traceback"]

EXIT_INPUT = 2  # bad input: the line names the fix
EXIT_FAILURE = 1  # unexpected: the line names the log file with the traceback
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it
LOG_DIR = Path("logs")  # under the working directory, the repository root under `dvc repro`
MAX_MESSAGE = 300  # characters of an unexpected exception's message on the error line


class StageError(RuntimeError):
    """A stage cannot run on its inputs; the message is one line naming the problem and the fix."""


# Failures of bad input in a stage: one line naming the fix and exit code 2, never a traceback.
STAGE_INPUT_ERRORS = (ParamsError, StageError, WeightsError, ValueError, FileNotFoundError)


def run_stage(
    stage: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], str], argv: Sequence[str] | None
) -> int:
    """Parse a stage's arguments and run it; every failure ends in one line on stderr (see :func:`guarded`).

    Args:
        stage: The stage's name, for messages.
        parser: The stage's argument parser (``--verbose`` is added).
        run: Runs the stage and returns what to print on success.
        argv: Arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        0 on success, 2 for bad parameters, inputs or weights (the message says what to fix), 1 for an unexpected
        failure (the message names the log file with the traceback), 130 when interrupted.
    """
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress messages.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def body() -> int:
        print(run(args))
        return 0

    return guarded(stage, body, STAGE_INPUT_ERRORS)


def guarded(command: str, run: Callable[[], int], expected: tuple[type[Exception], ...]) -> int:
    """Run a command so that any failure is one line ``uas <command>: ...`` on stderr and an exit code, no traceback.

    Args:
        command: The command's name after ``uas``, for messages and the log file's name.
        run: Runs the command and returns its exit code.
        expected: Exceptions of bad input, whose message names the fix.

    Returns:
        What ``run`` returned; 2 for an ``expected`` exception, 130 for ``KeyboardInterrupt``, 1 for any other
        exception, whose traceback goes to a log file (:func:`write_traceback`) that the line names.
    """
    try:
        return run()
    except expected as exc:
        _say(command, f"error: {_one_line(str(exc))}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _say(command, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # whatever failed: one line here, the traceback in the log file
        first = _first_line(str(exc))
        what = _one_line(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, MAX_MESSAGE)
        try:
            where = f"traceback in {write_traceback(command, exc)}"
        except OSError as problem:
            where = f"no traceback written: {_one_line(str(problem))}"
        _say(command, f"error: {what} ({where})")
        return EXIT_FAILURE


def write_traceback(command: str, exc: BaseException) -> Path:
    """Write an exception's full traceback, with the command line, to a new log file.

    The file is ``logs/uas-<command>-<UTC time>-<pid>.log`` under the working directory (the repository root under
    ``dvc repro``; git and DVC ignore ``logs/``), or under ``<temp>/uas-logs`` where that cannot be written.

    Args:
        command: The command's name, part of the file name.
        exc: The exception.

    Returns:
        The log file (absolute).

    Raises:
        OSError: Neither folder can be written.
    """
    now = datetime.now(timezone.utc)
    name = f"uas-{re.sub(r'[^A-Za-z0-9_.-]', '-', command)}-{now:%Y%m%dT%H%M%SZ}-{os.getpid()}.log"
    text = "".join(
        [
            f"uas {command} failed at {now.isoformat(timespec='seconds')}\n",
            f"command line: {' '.join(sys.argv)}\n",
            f"working directory: {Path.cwd()}\n",
            f"python {sys.version.split()[0]} ({sys.executable}), pid {os.getpid()}\n\n",
            *traceback.format_exception(type(exc), exc, exc.__traceback__),
        ]
    )
    try:
        return _write(LOG_DIR.resolve() / name, text)
    except OSError:
        return _write(Path(tempfile.gettempdir()) / "uas-logs" / name, text)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _say(command: str, text: str) -> None:
    print(f"uas {command}: {text}", file=sys.stderr, flush=True)


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _one_line(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
