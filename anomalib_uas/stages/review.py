# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``review``: FiftyOne review datasets (false positives, false negatives, worst masks) of every evaluation.

For each evaluated and calibrated model and category it builds a persistent FiftyOne dataset from the saved
predictions, with the model's own image embeddings (the torch model's ``embed``) for similarity search, and writes a
summary of the false positives and negatives per dataset. Labels, masks and heatmaps follow the deployed decision of
the ``calibrate`` stage (``calibration/<model>/calibration.json``, ``categories[<category>]["decision"]``): the
thresholds the registry and the server use, so a false positive here is one in production. A model whose weights
are not ready or whose calibration is skipped is skipped. The mask and heatmap PNGs are rewritten in place (the
datasets point at them; they are derived from the predictions and the decision alone), the summary is replaced only
when every dataset was built.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalib_uas.calibration import CALIBRATION_FILE, read_calibration
from anomalib_uas.data.images import read_image
from anomalib_uas.database import connect_database
from anomalib_uas.models.loading import load_model
from anomalib_uas.params import load_params
from anomalib_uas.stages import StageError, run_stage
from anomalib_uas.stages.outputs import replacing, write_json
from anomalib_uas.stages.status import model_kwargs, read_status

__all__ = ["cli", "decisions", "embeddings", "main"]


def decisions(calibration: Path, model: str, categories: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """The deployed decision of each category of a model, from the ``calibrate`` stage's output.

    Args:
        calibration: The calibration folder (``<model>/calibration.json``).
        model: Model name.
        categories: The categories to review.

    Returns:
        ``{category: decision}``; ``None`` when the model's calibration is skipped.

    Raises:
        StageError: The file is missing or lacks a category.
    """
    path = calibration / model / CALIBRATION_FILE
    calibrated = read_calibration(calibration / model)
    if not calibrated:
        msg = f"{path} does not exist: run the calibrate stage first (dvc repro calibrate@{model})"
        raise StageError(msg)
    if calibrated.get("skipped"):
        return None
    found = calibrated.get("categories", {})
    missing = [category for category in categories if "decision" not in found.get(category, {})]
    if missing:
        msg = f"{path} has no decision for {', '.join(missing)}: run `dvc repro calibrate@{model}`"
        raise StageError(msg)
    return {category: found[category]["decision"] for category in categories}


def main(
    params_file: Path,
    checkpoints: Path,
    predictions: Path,
    calibration: Path,
    media: Path,
    summary: Path,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Build, or update in place, the review datasets of every evaluated and calibrated model and category.

    Reviewers' tags, label fields and comments survive an update; ``rebuild`` starts clean.

    Args:
        params_file: ``params.yaml``.
        checkpoints: The weights stages' folder (``<model>/status.json`` and files).
        predictions: The predictions folder (``<model>/evaluation.json`` and ``<model>/<category>/``).
        calibration: The calibration folder (``<model>/calibration.json``): the deployed decisions.
        media: Output folder for the mask and heatmap PNGs the App shows.
        summary: Output JSON: per dataset the counts of samples, false positives and false negatives.
        rebuild: Delete each dataset first, with the reviewers' work.

    Returns:
        The summary (samples whose image left the predictions are not counted; they are in the ``removed`` view).

    Raises:
        StageError: A ready model has no calibration, or it lacks a category.
    """
    from anomalib_uas.review import F, build_review_dataset

    params = load_params(params_file)
    connect_database()
    counts: dict[str, Any] = {}
    media.mkdir(parents=True, exist_ok=True)  # rewritten in place: the datasets point at these files
    with replacing(summary) as (summary_out,):
        for model in params.models:
            status = read_status(checkpoints / model)
            if not status.ready:
                continue
            deployed = decisions(calibration, model, params.data.categories)
            if deployed is None:  # skipped like a model that is not ready
                continue
            evaluation = json.loads((predictions / model / "evaluation.json").read_text())
            module = load_model(
                model,
                status.checkpoint_path,
                status.clip_weights_path,
                visualizer=False,
                **model_kwargs(model, status, params),
            )
            for category in params.data.categories:
                saved = predictions / model / category / "predictions.npz"
                dataset = build_review_dataset(
                    model,
                    category,
                    saved,
                    deployed[category],
                    embeddings=embeddings(module, [str(p) for p in np.load(saved)["image_path"]]),
                    prompt_paths=evaluation["prompt_paths"][category],
                    mlflow_run_id=evaluation["mlflow_run_id"],
                    media_dir=media / model / category,
                    rebuild=rebuild,
                )
                active = dataset.match(F("removed") == False)  # noqa: E712 (a query expression, not a comparison)
                found = active.count_values("eval")
                counts[dataset.name] = {"FP": found.get("FP", 0), "FN": found.get("FN", 0), "samples": len(active)}
        write_json(summary_out, counts)
    return counts


def embeddings(module: Any, paths: list[str], batch_size: int = 16) -> np.ndarray:
    """Global image embeddings of the model's own encoder (its torch model's ``embed``), for similarity search.

    Args:
        module: The anomalib model (its pre-processor transforms the images).
        paths: Image files.
        batch_size: Images per forward.

    Returns:
        ``[N, D]`` embeddings in the order of ``paths``.
    """
    network, transform = module.model.eval(), module.pre_processor.transform
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([transform(read_image(path)) for path in paths[start : start + batch_size]])
        chunks.append(network.embed(images).float().numpy())
    return np.concatenate(chunks)


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas review``: build the review datasets.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas review", description="Build the FiftyOne review datasets.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="Weights (%(default)s).")
    parser.add_argument("--predictions", type=Path, default=Path("predictions"), help="Predictions (%(default)s).")
    parser.add_argument(
        "--calibration", type=Path, default=Path("calibration"), help="Deployed decisions (%(default)s)."
    )
    parser.add_argument("--media", type=Path, default=Path("review"), help="Mask/heatmap PNGs (%(default)s).")
    parser.add_argument("--summary", type=Path, default=Path("reports/review.json"), help="Summary (%(default)s).")
    parser.add_argument("--rebuild", action="store_true", help="Delete the datasets first, with the reviewers' work.")

    def run(args: argparse.Namespace) -> str:
        counts = main(
            args.params, args.checkpoints, args.predictions, args.calibration, args.media, args.summary, args.rebuild
        )
        return "\n".join(
            f"{name}: {c['samples']} samples, {c['FP']} false positives, {c['FN']} false negatives"
            for name, c in counts.items()
        )

    return run_stage("review", parser, run, argv)
