# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``register@<model>``: register each category's evaluated and calibrated model in MLflow.

It reads the evaluation (``<predictions>/evaluation.json``, the saved predictions, ``<reports>/metrics.json``) and
the calibration (``<calibration>/calibration.json``) and registers a version of ``anomalib-uas-<category>`` whose
config carries the calibrated decision (:data:`~anomalib_uas.calibration.DECISION_KEYS`), then moves the champion
aliases (:mod:`anomalib_uas.registry`). ``<registered>/registered.json`` records, per category, the version and the
key of what it holds (the evaluation's fingerprint, the decision, the metrics, the champion metric): a category whose
key is unchanged and whose version still exists is not registered again, so a new version appears exactly when
the model, its inputs or its thresholds changed. With ``registry.register: false`` nothing is registered.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from anomalib_uas import registry, tracking
from anomalib_uas.calibration import read_calibration
from anomalib_uas.params import MODEL_NAMES, Params, load_params
from anomalib_uas.stages import StageError, run_stage
from anomalib_uas.stages.outputs import replacing, write_json
from anomalib_uas.stages.status import Status, model_kwargs, read_status

__all__ = ["cli", "main"]

RECORD_FILE = "registered.json"


def main(
    model: str,
    params_file: Path,
    checkpoints: Path,
    predictions: Path,
    reports: Path,
    calibration: Path,
    registered: Path,
) -> dict[str, Any]:
    """Register every category of one model whose evaluation or calibration changed.

    Args:
        model: Model name.
        params_file: ``params.yaml``.
        checkpoints: The model's weights folder (``checkpoints/<model>``).
        predictions: The model's predictions folder (``predictions/<model>``).
        reports: The model's reports folder (``reports/<model>``, its ``metrics.json``).
        calibration: The model's calibration folder (``calibration/<model>``).
        registered: The output folder (``registered/<model>``), replaced on success.

    Returns:
        What ``registered.json`` holds.

    Raises:
        StageError: The calibration does not belong to the evaluation (run the stages in order).
    """
    params = load_params(params_file)
    status = read_status(checkpoints)
    calibrated = read_calibration(calibration)
    record: dict[str, Any] = {"model": model, "skipped": None, "categories": {}}
    if not status.ready:
        record["skipped"] = status.reason
    elif not params.registry.register_models:
        record["skipped"] = "registry.register is false"
    else:
        evaluation = json.loads((predictions / "evaluation.json").read_text())
        missing = [c for c in params.data.categories if c not in calibrated.get("categories", {})]
        if missing:
            msg = f"calibration/{model} has no {missing[0]}: run `dvc repro calibrate@{model}` before registering"
            raise StageError(msg)
        metrics = json.loads((reports / "metrics.json").read_text())["categories"]
        previous = _read_record(registered).get("categories", {})
        with tracking.stage_run("register", model, params.as_dict()):
            for category in params.data.categories:
                record["categories"][category] = _register(
                    model, category, params, status, evaluation, calibrated, metrics[category], previous, predictions
                )
    with replacing(registered) as (staging,):
        staging.mkdir()
        write_json(staging / RECORD_FILE, record)
    return record


def _read_record(registered: Path) -> dict[str, Any]:
    path = registered / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _register(
    model: str,
    category: str,
    params: Params,
    status: Status,
    evaluation: dict[str, Any],
    calibrated: dict[str, Any],
    metrics: dict[str, float],
    previous: dict[str, Any],
    predictions: Path,
) -> dict[str, Any]:
    """Register one category unless its previous version holds the same evaluation and decision."""
    decision = calibrated["categories"][category]["decision"]
    key = hashlib.sha256(
        json.dumps(
            [evaluation["fingerprints"][category], decision, metrics, params.registry.champion_metric], sort_keys=True
        ).encode()
    ).hexdigest()
    earlier = previous.get(category, {})
    name = registry.registered_name(category)
    if earlier.get("key") == key and _exists(name, earlier.get("version")):
        return earlier
    saved = np.load(predictions / category / "predictions.npz")
    kwargs = model_kwargs(model, status, params)
    version = registry.register_model(
        registry.ServableModel(
            model=model,
            category=category,
            checkpoint=status.checkpoint_path,
            clip_weights=status.clip_weights_path,
            prompt_paths=[Path(p) for p in evaluation["prompt_paths"][category]],
            config={"model": model, "category": category, "kwargs": kwargs, **decision},
            example_image=Path(str(saved["image_path"][0])),
            check_images=_check_images(saved),
        ),
        metrics,
        params.registry.champion_metric,
    )
    return {"key": key, "name": name, "version": version.version, "threshold_version": decision["threshold_version"]}


def _exists(name: str, version: str | None) -> bool:
    """Whether a registered version is still in the registry (it may have been deleted by hand)."""
    if version is None:
        return False
    try:
        mlflow.MlflowClient().get_model_version(name, version)
    except MlflowException:
        return False
    return True


def _check_images(saved: Any, per_label: int = 2) -> tuple[Path, ...]:
    """Test images the exported graph is checked on besides the first: the first normal and defective ones."""
    paths, labels = saved["image_path"], saved["gt_label"]
    chosen = [index for label in (0, 1) for index in np.flatnonzero(labels == label)[:per_label] if index != 0]
    return tuple(Path(str(paths[index])) for index in chosen)


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas register MODEL``: register the model's calibrated categories in MLflow.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas register", description="Register calibrated models in MLflow.")
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--checkpoints", type=Path, help="The model's weights folder (checkpoints/MODEL).")
    parser.add_argument("--predictions", type=Path, help="The model's predictions (predictions/MODEL).")
    parser.add_argument("--reports", type=Path, help="The model's reports (reports/MODEL).")
    parser.add_argument("--calibration", type=Path, help="The model's calibration (calibration/MODEL).")
    parser.add_argument("--registered", type=Path, help="Output folder (registered/MODEL).")

    def run(args: argparse.Namespace) -> str:
        model = args.model
        record = main(
            model,
            args.params,
            args.checkpoints or Path("checkpoints") / model,
            args.predictions or Path("predictions") / model,
            args.reports or Path("reports") / model,
            args.calibration or Path("calibration") / model,
            args.registered or Path("registered") / model,
        )
        if record["skipped"] is not None:
            return f"{model}: not registered ({record['skipped']})"
        return "\n".join(
            f"{category}: {entry['name']} version {entry['version']} (thresholds {entry['threshold_version']})"
            for category, entry in record["categories"].items()
        )

    return run_stage("register", parser, run, argv)
