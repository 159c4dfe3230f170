# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``weights@<model>``: train or fetch a model's checkpoint, check it loads, and record how to build it.

``weights.<model>`` in ``params.yaml`` names the source (see each model's ``spec.py``). The files are copied into the
stage's output folder (``checkpoints/<model>``) with a ``status.json`` (:mod:`anomalib_uas.stages.status`), and the
model is built from them once before the folder replaces the previous one: a file that is not a checkpoint of the
model fails the stage and leaves the previous checkpoint in place. A source that does not resolve fails the stage
too; only a model whose spec allows it (a CLIP model whose official files are absent) is recorded as skipped.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from anomalib_uas import tracking
from anomalib_uas.models import get_spec
from anomalib_uas.models.loading import load_model
from anomalib_uas.params import MODEL_NAMES, load_params
from anomalib_uas.stages import run_stage
from anomalib_uas.stages.outputs import replacing, write_json
from anomalib_uas.stages.status import STATUS_FILE, Status
from anomalib_uas.weights import WeightsError, WeightsNotFoundError

__all__ = ["cli", "main"]


def main(model: str, params_file: Path, weights_dir: Path, output: Path) -> Status:
    """Produce a model's checkpoint, or record why the model is skipped.

    Args:
        model: Model name.
        params_file: ``params.yaml``.
        weights_dir: The model's folder of user-supplied files (``weights/<model>``).
        output: The stage's output folder (``checkpoints/<model>``).

    Returns:
        The status written to ``status.json``.

    Raises:
        WeightsError: The source does not resolve to a usable checkpoint (the previous output is kept).
    """
    params = load_params(params_file)
    spec = get_spec(model)
    source = params.weights[model]
    with replacing(output) as (staging,):
        staging.mkdir()
        try:
            if source == "train":
                with tracking.training_run(model, params.as_dict()) as run:
                    files = spec.train(params, weights_dir, staging, run.pop("logger"))
                extra = run
            else:
                files, extra = spec.fetch(source, params, weights_dir, staging), {}
        except WeightsNotFoundError as exc:
            if not spec.optional:
                raise WeightsError(str(exc)) from exc
            status = Status(folder=output, ready=False, reason=str(exc))
            write_json(staging / STATUS_FILE, status.to_json())
            return status
        checkpoint = staging / f"{model}.pth"
        if files.checkpoint != checkpoint:
            shutil.copy(files.checkpoint, checkpoint)
        clip = None
        if files.clip_weights is not None:
            clip = "clip.pt"
            shutil.copy(files.clip_weights, staging / clip)
        status = Status(
            folder=output,
            ready=True,
            description=files.description
            + (f" ({extra['train_minutes']:.1f} min)" if "train_minutes" in extra else ""),
            checkpoint=checkpoint.name,
            clip_weights=clip,
            kwargs=files.kwargs,
            extra={**files.extra, **extra},
        )
        load_model(model, checkpoint, None if clip is None else staging / clip, **files.kwargs)  # WeightsError
        write_json(staging / STATUS_FILE, status.to_json())
    return status


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas weights MODEL``: train or fetch the model's checkpoint.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(
        prog="uas weights", description="Train or fetch a model's checkpoint (params: weights, train, models_config)."
    )
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--weights-dir", type=Path, help="The model's own files (weights/MODEL).")
    parser.add_argument("--output", type=Path, help="Output folder (checkpoints/MODEL).")

    def run(args: argparse.Namespace) -> str:
        weights_dir = args.weights_dir or Path("weights") / args.model
        status = main(args.model, args.params, weights_dir, args.output or Path("checkpoints") / args.model)
        return f"{args.model}: {'ready' if status.ready else 'skipped'}: {status.description or status.reason}"

    return run_stage("weights", parser, run, argv)
