# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``evaluate@<model>``: ``Engine.test`` on every category; metrics, curves, predictions, registration.

Outputs: ``<predictions>/<category>/predictions.npz`` (raw scores and maps, see :mod:`anomalib_uas.evaluation`) and
``<predictions>/evaluation.json`` (the weights' description or the reason the model was skipped, thresholds,
prompt images, MLflow run id); ``<reports>/metrics.json`` and the ROC, PR and per-category CSVs.
Every evaluated model is registered in MLflow per category (:mod:`anomalib_uas.registry`).

Thresholds, per category: the image threshold reaches ``evaluate.target_fpr`` on normal images held out of the test
set (the category's ``train/good`` images that were not prompts), and its false-alarm and miss rates on the test
set are reported; the F1-optimal image threshold is recorded beside it. The registered model and the server use the
target-rate threshold.

Categories are checked against the dataset before anything runs, so a typo never lets anomalib's datamodule start
a download; the outputs are replaced only when every category was evaluated.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from anomalib_uas import registry, tracking
from anomalib_uas.curves import error_rates, fpr_threshold, thresholds, write_curves
from anomalib_uas.evaluation import evaluate_model
from anomalib_uas.models.loading import load_model
from anomalib_uas.params import METRICS, MODEL_NAMES, Params, load_params
from anomalib_uas.stages import StageError, run_stage
from anomalib_uas.stages.outputs import replacing, write_json
from anomalib_uas.stages.status import Status, model_kwargs, read_status

__all__ = ["RATES", "check_categories", "cli", "held_out_normals", "main"]

RATES = ("false_alarm_rate", "miss_rate", "FP", "FN")  # of the image threshold, on the test set


def check_categories(dataset: Path, categories: Sequence[str]) -> None:
    """Check that every category is in the dataset, in MVTec AD layout.

    Args:
        dataset: The dataset folder.
        categories: ``data.categories``.

    Raises:
        StageError: A category is missing (the message lists what the dataset has).
    """
    absent = [category for category in categories if not (dataset / category / "test").is_dir()]
    if absent:
        present = (
            sorted(path.name for path in dataset.iterdir() if (path / "test").is_dir()) if dataset.is_dir() else []
        )
        msg = (
            f"data.categories {absent} are not in {dataset} (it has {present or 'nothing'}): fix data.categories or "
            "rerun the data stage (`dvc repro data`)"
        )
        raise StageError(msg)


def main(model: str, params_file: Path, dataset: Path, checkpoints: Path, predictions: Path, reports: Path) -> dict:
    """Evaluate one model on every category.

    Args:
        model: Model name.
        params_file: ``params.yaml``.
        dataset: The dataset folder (``data/dataset``).
        checkpoints: The model's weights folder (``checkpoints/<model>``).
        predictions: The model's predictions folder (``predictions/<model>``).
        reports: The model's reports folder (``reports/<model>``).

    Returns:
        The metrics written to ``metrics.json``.
    """
    params = load_params(params_file)
    categories = list(params.data.categories)
    check_categories(dataset, categories)
    status = read_status(checkpoints)
    with replacing(predictions, reports) as (predictions_out, reports_out):
        predictions_out.mkdir()
        reports_out.mkdir()
        if not status.ready:
            metrics = {"skipped": 1}
            write_json(predictions_out / "evaluation.json", {"skipped": status.reason})
            write_curves(reports_out, categories)
        else:
            metrics = _evaluate(model, params, dataset, status, predictions_out, reports_out)
        write_json(reports_out / "metrics.json", metrics)
    return metrics


def _evaluate(
    model: str, params: Params, dataset: Path, status: Status, predictions: Path, reports: Path
) -> dict[str, Any]:
    kwargs = model_kwargs(model, status, params)
    categories = list(params.data.categories)
    with tracking.stage_run("evaluate", model, params.as_dict()) as run:
        rows = evaluate_model(
            lambda: load_model(model, status.checkpoint_path, status.clip_weights_path, visualizer=False, **kwargs),
            dataset,
            categories,
            output_dir=Path(tempfile.mkdtemp(prefix=f"uas-{model}-")),
            predictions_dir=predictions,
            batch_size=params.evaluate.batch_size,
            build_logger=lambda category: tracking.engine_logger(f"{model}-{category}", run.info.run_id),
            held_out_normals=lambda category, prompts: held_out_normals(dataset, category, prompts),
        )
        saved = {category: np.load(predictions / category / "predictions.npz") for category in categories}
        found = {row["category"]: _thresholds(saved[row["category"]], row, params.evaluate.target_fpr) for row in rows}
        for row in rows:
            row.update({key: found[row["category"]][f"test_{key}"] for key in RATES})
        columns = [*METRICS, *RATES, "ms_per_image"]
        per_category = {row["category"]: {c: row[c] for c in columns if c in row} for row in rows}
        metrics = {
            "skipped": 0,
            "categories": per_category,
            "mean": {c: float(np.mean([row[c] for row in rows if c in row])) for c in columns},
        }
        write_curves(
            reports,
            categories,
            [saved[c]["pred_score"] for c in categories],
            [saved[c]["gt_label"] for c in categories],
            rows,
        )
        write_json(
            predictions / "evaluation.json",
            {
                "weights": status.description,
                "mlflow_run_id": run.info.run_id,
                "thresholds": found,
                "prompt_paths": {row["category"]: row["prompt_paths"] for row in rows},
            },
        )
        mlflow.log_metrics({f"mean.{k}": v for k, v in metrics["mean"].items()})
        for category, values in per_category.items():
            mlflow.log_metrics({f"{category}.{k}": v for k, v in values.items()})
        _log_artifacts(model, metrics, reports, predictions)
        if params.registry.register_models:
            for row in rows:
                category = row["category"]
                registry.register_model(
                    registry.ServableModel(
                        model=model,
                        category=category,
                        checkpoint=status.checkpoint_path,
                        clip_weights=status.clip_weights_path,
                        prompt_paths=[Path(p) for p in row["prompt_paths"]],
                        config={"model": model, "category": category, "kwargs": kwargs, **found[category]},
                        example_image=Path(str(saved[category]["image_path"][0])),
                    ),
                    per_category[category],
                    params.registry.champion_metric,
                )
    return metrics


def held_out_normals(dataset: Path, category: str, prompts: Sequence[str]) -> list[str]:
    """Normal images outside the test set that the model did not use as prompts: the category's ``train/good``.

    Args:
        dataset: The dataset folder.
        category: The category.
        prompts: The prompt images the model used.

    Returns:
        Image paths, sorted.
    """
    from anomalib_uas.data.images import list_images

    used = {str(Path(path).resolve()) for path in prompts}
    return [str(path) for path in list_images(dataset / category / "train" / "good") if str(path.resolve()) not in used]


def _thresholds(saved: Any, row: dict[str, Any], target_fpr: float) -> dict[str, Any]:
    """The image threshold at the target false-alarm rate (F1-optimal without held-out normals), and its test rates."""
    f1 = thresholds(saved)
    normal = np.asarray(row["normal_scores"])
    image = fpr_threshold(normal, target_fpr) if len(normal) else f1["image_threshold"]
    rates = error_rates(saved["gt_label"], saved["pred_score"], image)
    return {
        "image_threshold": image,
        "image_threshold_f1": f1["image_threshold"],
        "pixel_threshold": f1["pixel_threshold"],
        "threshold_basis": f"target_fpr {target_fpr}" if len(normal) else "F1 (no held-out normal images)",
        "held_out_normals": len(normal),
        **{f"test_{key}": value for key, value in rates.items()},
    }


def _log_artifacts(model: str, metrics: dict[str, Any], reports: Path, predictions: Path) -> None:
    """Log the reports, the ROC plot and overlays of maps on the highest-scored defects to the active run."""
    from anomalib_uas.figures import figures

    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder)
        write_json(staged / "reports" / "metrics.json", metrics)
        for name in ("roc.csv", "pr.csv", "per_category.csv"):
            (staged / "reports" / name).write_bytes((reports / name).read_bytes())
        for name, png in figures(model, reports, predictions).items():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).write_bytes(png)
        mlflow.log_artifacts(folder)


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas evaluate MODEL``: test the model on every category.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas evaluate", description="Engine.test of a model on every category.")
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--dataset", type=Path, default=Path("data/dataset"), help="Dataset (%(default)s).")
    parser.add_argument("--checkpoints", type=Path, help="The model's weights folder (checkpoints/MODEL).")
    parser.add_argument("--predictions", type=Path, help="Predictions output folder (predictions/MODEL).")
    parser.add_argument("--reports", type=Path, help="Reports output folder (reports/MODEL).")

    def run(args: argparse.Namespace) -> str:
        from anomalib_uas.evaluation import format_table

        model = args.model
        metrics = main(
            model,
            args.params,
            args.dataset,
            args.checkpoints or Path("checkpoints") / model,
            args.predictions or Path("predictions") / model,
            args.reports or Path("reports") / model,
        )
        if metrics["skipped"]:
            return f"{model}: skipped ({read_status(args.checkpoints or Path('checkpoints') / model).reason})"
        return format_table([{"category": name, **row} for name, row in metrics["categories"].items()])

    return run_stage("evaluate", parser, run, argv)
