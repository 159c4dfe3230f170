# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``evaluate@<model>``: ``Engine.test`` on every category; metrics, curves and saved predictions.

Outputs: ``<predictions>/<category>/predictions.npz`` (raw scores and maps of the test set, see
:mod:`anomalib_uas.evaluation`), ``<predictions>/<category>/normals.npz`` (the raw scores and map extremes of the
images outside the test set: held-out normals and reviewers' feedback) and ``<predictions>/evaluation.json`` (the
weights' description or the reason the model was skipped, prompt images, feedback counts, MLflow run id);
``<reports>/metrics.json`` and the ROC, PR and per-category CSVs.

This stage scores; it sets no threshold and registers nothing. ``calibrate@<model>`` sets the thresholds from the
saved normal images' scores (:mod:`anomalib_uas.stages.calibrate`), ``register@<model>`` registers the result, so
that changing the calibration parameters never runs ``Engine.test`` again.

The held-out normal images are the category's ``train/good`` images that were not prompts, and the reviewers'
feedback normals (``data/feedback``, see :mod:`anomalib_uas.stages.evaluation_inputs`). Feedback images are held
out of the test metrics and scored separately; feedback normals also join the prompt pool of the models that take
prompts.

A category whose inputs (code, weights, parameters, images, feedback: a fingerprint in ``evaluation.json``) are
those of the previous evaluation keeps its previous predictions and metrics; only the other categories are tested
again (feedback for one category re-evaluates that category only).

The dataset is checked before anything runs (:mod:`anomalib_uas.stages.dataset_check`: a missing category, an empty
``good`` folder, a hidden or unreadable image file are one line each); the outputs are replaced only when every
category was evaluated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from anomalib_uas import tracking
from anomalib_uas.curves import write_curves
from anomalib_uas.evaluation import evaluate_model
from anomalib_uas.models import get_spec
from anomalib_uas.models.loading import load_model
from anomalib_uas.models.spec import ModelSpec
from anomalib_uas.params import METRICS, MODEL_NAMES, Params, load_params
from anomalib_uas.stages import run_stage
from anomalib_uas.stages.dataset_check import check_dataset
from anomalib_uas.stages.evaluation_inputs import Feedback, held_out_normals, prompt_pool, read_feedback, test_split
from anomalib_uas.stages.outputs import replacing, write_json
from anomalib_uas.stages.status import Status, model_kwargs, read_status

__all__ = ["build_arguments", "cli", "main"]


def main(
    model: str,
    params_file: Path,
    dataset: Path,
    checkpoints: Path,
    predictions: Path,
    reports: Path,
    feedback: Path | None = None,
) -> dict:
    """Evaluate one model on every category.

    Args:
        model: Model name.
        params_file: ``params.yaml``.
        dataset: The dataset folder (``data/dataset``).
        checkpoints: The model's weights folder (``checkpoints/<model>``).
        predictions: The model's predictions folder (``predictions/<model>``).
        reports: The model's reports folder (``reports/<model>``).
        feedback: The reviewers' feedback folder (``data/feedback``); none when ``None`` or missing.

    Returns:
        The metrics written to ``metrics.json``.
    """
    params = load_params(params_file)
    categories = list(params.data.categories)
    check_dataset(dataset, categories)
    status = read_status(checkpoints)
    previous = _Previous.read(predictions, reports)
    marks = {category: read_feedback(feedback or Path("/nonexistent"), category) for category in categories}
    with replacing(predictions, reports) as (predictions_out, reports_out):
        predictions_out.mkdir()
        reports_out.mkdir()
        if not status.ready:
            metrics = {"skipped": 1}
            write_json(predictions_out / "evaluation.json", {"skipped": status.reason})
            write_curves(reports_out, categories)
        else:
            metrics = _evaluate(model, params, dataset, status, marks, previous, predictions_out, reports_out)
        write_json(reports_out / "metrics.json", metrics)
    return metrics


def build_arguments(
    spec: ModelSpec, kwargs: dict[str, Any], dataset: Path, category: str, feedback: Feedback
) -> dict[str, Any]:
    """A model's arguments for one category: with feedback normals, its own few-shot source becomes a pool.

    The few-shot source reaches an evaluated model on this one route: its spec's ``evaluation_kwargs`` (the only
    reader of ``evaluate.few_shot_source``) give ``kwargs[spec.prompt_pool]`` (MetaUAS: ``evaluate.few_shot_source``;
    InCTRL: none, the category's ``train/good``), and the pool adds the category's feedback normals to it, so no
    model is handed another model's source.

    Args:
        spec: The model's spec.
        kwargs: Its evaluation arguments (:func:`~anomalib_uas.stages.status.model_kwargs`).
        dataset: The dataset folder.
        category: The category.
        feedback: The category's feedback.

    Returns:
        The arguments, with the pool in place of the prompt source when there is one.
    """
    if not spec.prompt_pool:
        return dict(kwargs)
    pool = prompt_pool(dataset, category, kwargs.get(spec.prompt_pool), feedback)
    return {**kwargs, spec.prompt_pool: pool} if pool else dict(kwargs)


@dataclass(frozen=True)
class _Previous:
    """The previous evaluation of the model (outputs persist until a run replaces them)."""

    folder: Path
    evaluation: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def read(cls, predictions: Path, reports: Path) -> _Previous:
        def load(path: Path) -> dict[str, Any]:
            return json.loads(path.read_text()) if path.is_file() else {}

        return cls(predictions, load(predictions / "evaluation.json"), load(reports / "metrics.json"))

    def reusable(self, category: str, fingerprint: str) -> bool:
        """Whether the category was evaluated on exactly the same inputs and its outputs are all there."""
        return (
            self.evaluation.get("fingerprints", {}).get(category) == fingerprint
            and category in self.metrics.get("categories", {})
            and all((self.folder / category / name).is_file() for name in ("predictions.npz", "normals.npz"))
        )


def _fingerprint(category: str, dataset: Path, status: Status, params: Params, feedback: Feedback) -> str:
    """What a category's evaluation depends on: code, weights, parameters, its images and its feedback."""
    digest = hashlib.sha256()
    digest.update(json.dumps([status.to_json(), params.evaluate.model_dump()]).encode())
    weights = [status.checkpoint_path, *([status.clip_weights_path] if status.clip_weights_path else [])]
    files = [*sorted(Path(__file__).parents[1].rglob("*.py")), *weights]
    files += sorted(path for path in (dataset / category).rglob("*") if path.is_file())
    files += [Path(path) for path in [*feedback.normal, *feedback.hard]]
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _evaluate(
    model: str,
    params: Params,
    dataset: Path,
    status: Status,
    marks: dict[str, Feedback],
    previous: _Previous,
    predictions: Path,
    reports: Path,
) -> dict[str, Any]:
    spec, kwargs = get_spec(model), model_kwargs(model, status, params)
    categories = list(params.data.categories)
    fingerprints = {c: _fingerprint(c, dataset, status, params, marks[c]) for c in categories}
    reused = [category for category in categories if previous.reusable(category, fingerprints[category])]
    fresh = [category for category in categories if category not in reused]
    for category in reused:  # same inputs as last time: keep its predictions and metrics
        shutil.copytree(previous.folder / category, predictions / category)

    def build(category: str) -> Any:
        arguments = {**build_arguments(spec, kwargs, dataset, category, marks[category]), "visualizer": False}
        return load_model(model, status.checkpoint_path, status.clip_weights_path, **arguments)

    def scored(category: str, prompts: list[str]) -> dict[str, list[str]]:
        return {**held_out_normals(dataset, category, prompts, marks[category]), "feedback_hard": marks[category].hard}

    with tracking.stage_run("evaluate", model, params.as_dict()) as run, tempfile.TemporaryDirectory() as view:
        rows = evaluate_model(
            build,
            test_split(dataset, fresh, marks, Path(view)),
            fresh,
            output_dir=Path(view) / ".engine",
            predictions_dir=predictions,
            batch_size=params.evaluate.batch_size,
            build_logger=lambda category: tracking.engine_logger(f"{model}-{category}", run.info.run_id),
            scored_images=scored,
        )
        saved = {category: _saved(predictions / category / "predictions.npz", view, dataset) for category in categories}
        for category in reused:
            prompts = previous.evaluation["prompt_paths"][category]
            rows.append({"category": category, **previous.metrics["categories"][category], "prompt_paths": prompts})
        rows.sort(key=lambda row: categories.index(row["category"]))
        columns = [*METRICS, "ms_per_image"]
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
                "prompt_paths": {row["category"]: row["prompt_paths"] for row in rows},
                "feedback": {c: {"normal": len(marks[c].normal), "hard": len(marks[c].hard)} for c in categories},
                "fingerprints": fingerprints,
                "evaluated": fresh,
                "reused": reused,
            },
        )
        mlflow.log_metrics({f"mean.{k}": v for k, v in metrics["mean"].items()})
        for category, values in per_category.items():
            mlflow.log_metrics({f"{category}.{k}": v for k, v in values.items()})
        _log_artifacts(model, metrics, reports, predictions)
    return metrics


def _saved(path: Path, view: str, dataset: Path) -> dict[str, np.ndarray]:
    """A category's saved predictions, with image paths of the dataset instead of the test-split view's links."""
    saved = dict(np.load(path))
    paths = [str(p) for p in saved["image_path"]]
    prefixes = (view, str(Path(view).resolve()), str(dataset.resolve()))  # linked categories resolve to the dataset
    mapped = [next((str(dataset) + p[len(x) :] for x in prefixes if p.startswith(x + "/")), p) for p in paths]
    if mapped != paths:
        saved["image_path"] = np.array(mapped)
        np.savez_compressed(path, **saved)
    return saved


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
    parser.add_argument("--feedback", type=Path, default=Path("data/feedback"), help="Feedback (%(default)s).")

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
            args.feedback,
        )
        if metrics["skipped"]:
            return f"{model}: skipped ({read_status(args.checkpoints or Path('checkpoints') / model).reason})"
        return format_table([{"category": name, **row} for name, row in metrics["categories"].items()])

    return run_stage("evaluate", parser, run, argv)
