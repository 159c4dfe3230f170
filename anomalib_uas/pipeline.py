# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The stages of the inspection pipeline run by ``dvc repro`` (``dvc.yaml``) and by the ``uas`` command line.

Data flows one way through fixed paths, each stage reading only what the stage before it wrote:

1. :func:`prepare_data`: ``params.data`` -> ``data/dataset`` (MVTec AD layout);
2. :func:`prepare_weights`: per model -> ``checkpoints/<model>/`` (a trained or official checkpoint and
   ``status.json``; a model whose weights cannot be had is marked skipped with the reason and the fix);
3. :func:`evaluate`: per model, ``Engine.test`` on every category -> ``reports/<model>/metrics.json``, ROC and PR
   curves and per-category bars as CSV, and ``predictions/<model>/<category>/predictions.npz``;
4. :func:`~anomalib_uas.report.write_report`: one comparison table (Markdown and an offline HTML page);
5. :func:`review`: FiftyOne review datasets of every evaluation (``reports/review.json`` lists them).

Example:
    >>> from anomalib_uas.pipeline import load_params, prepare_data
    >>> prepare_data(load_params("params.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from sklearn.metrics import precision_recall_curve, roc_curve

from anomalib_uas import tracking
from anomalib_uas.data import generate_demo_dataset
from anomalib_uas.evaluation import METRICS, evaluate_model
from anomalib_uas.weights import WeightsNotFoundError, resolve_weights

logger = logging.getLogger(__name__)

__all__ = ["MODELS", "evaluate", "load_params", "prepare_data", "prepare_weights", "read_status", "review"]

MODELS = ("metauas", "inctrl", "faprompt")
DATA_DIR = Path("data/dataset")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
PREDICTIONS_DIR = Path("predictions")
LOCAL_WEIGHTS_DIR = Path("weights")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the pipeline parameters.

    Args:
        path: The params file.

    Returns:
        The parameters.

    Raises:
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Parameters file {path} does not exist; run from the repository root or pass --params."
        raise FileNotFoundError(msg)
    return yaml.safe_load(path.read_text())


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def prepare_data(params: dict[str, Any], output: Path = DATA_DIR) -> Path:
    """Build the evaluation dataset in MVTec AD layout at a fixed path.

    ``demo`` generates the offline demo dataset; ``mvtec`` and ``visa`` copy the categories from ``data.source``
    (prepared by anomalib's datamodules, which download them when online); ``folder`` arranges the user's good,
    defect and mask folders as one category.

    Args:
        params: Pipeline parameters (the ``data`` section is used).
        output: Output folder.

    Returns:
        The output folder.

    Raises:
        ValueError: For an unknown dataset name.
        FileNotFoundError: A source folder is missing.
    """
    data = params["data"]
    kind = data["dataset"]
    if output.exists():
        shutil.rmtree(output)
    if kind == "demo":
        generate_demo_dataset(output, categories=data["categories"], image_size=data["image_size"], seed=data["seed"])
    elif kind in {"mvtec", "visa"}:
        _copy_anomalib_dataset(kind, Path(data["source"]), data["categories"], output)
    elif kind == "folder":
        _copy_folder_dataset(data["folder"], data["categories"][0], output)
    else:
        msg = f"data.dataset must be demo, mvtec, visa or folder, got {kind!r}."
        raise ValueError(msg)
    return output


def _copy_anomalib_dataset(kind: str, source: Path, categories: list[str], output: Path) -> None:
    from anomalib.data import MVTecAD, Visa

    datamodule_class = MVTecAD if kind == "mvtec" else Visa
    for category in categories:
        datamodule = datamodule_class(root=source, category=category, num_workers=0)
        datamodule.prepare_data()  # downloads when the category is missing and the machine is online
        prepared = source / "visa_pytorch" / category if kind == "visa" else source / category
        if not prepared.is_dir():
            msg = f"{prepared} is missing: download {kind} to {source} (anomalib does it when online)."
            raise FileNotFoundError(msg)
        shutil.copytree(prepared, output / category)


def _copy_folder_dataset(folder: dict[str, str], category: str, output: Path) -> None:
    target = output / category
    for key, relative in (("normal_dir", "train/good"), ("abnormal_dir", "test/defect")):
        source = Path(folder[key])
        if not source.is_dir():
            msg = f"data.folder.{key} = {source} does not exist."
            raise FileNotFoundError(msg)
        shutil.copytree(source, target / relative)
    normal_test = folder.get("normal_test_dir")
    if normal_test:
        shutil.copytree(normal_test, target / "test" / "good")
    else:  # keep a third of the normal images for testing
        goods = sorted((target / "train" / "good").iterdir())
        (target / "test" / "good").mkdir(parents=True)
        for path in goods[: max(1, len(goods) // 3)]:
            path.rename(target / "test" / "good" / path.name)
    masks = folder.get("mask_dir")
    if masks:
        (target / "ground_truth" / "defect").mkdir(parents=True)
        for mask in sorted(Path(masks).iterdir()):
            name = mask.stem if mask.stem.endswith("_mask") else f"{mask.stem}_mask"
            shutil.copy(mask, target / "ground_truth" / "defect" / f"{name}{mask.suffix}")


def read_status(model: str, checkpoints: Path = CHECKPOINTS_DIR) -> dict[str, Any]:
    """Read what :func:`prepare_weights` decided for a model.

    Args:
        model: Model name.
        checkpoints: Checkpoints folder.

    Returns:
        The status: ``{"status": "ready", "checkpoint": ..., "description": ...}`` or
        ``{"status": "skipped", "reason": ...}``.
    """
    return json.loads((checkpoints / model / "status.json").read_text())


def prepare_weights(model: str, params: dict[str, Any], checkpoints: Path = CHECKPOINTS_DIR) -> dict[str, Any]:
    """Produce the checkpoint of a model, or record why it is skipped.

    Args:
        model: ``metauas``, ``inctrl`` or ``faprompt``.
        params: Pipeline parameters (``weights`` and ``train`` sections).
        checkpoints: Checkpoints folder; ``<checkpoints>/<model>`` is the stage output.

    Returns:
        The status written to ``status.json``.

    Raises:
        ValueError: For an unknown model.
    """
    if model not in MODELS:
        msg = f"Unknown model {model!r}; choose one of {MODELS}."
        raise ValueError(msg)
    output = checkpoints / model
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    source = params["weights"][model]
    try:
        status = _metauas_weights(source, params, output) if model == "metauas" else _clip_weights(model, output)
    except WeightsNotFoundError as exc:
        status = {"status": "skipped", "reason": str(exc)}
    _write_json(output / "status.json", status)
    return status


def _metauas_weights(source: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    if source == "train":
        from anomalib_uas.models.metauas.training import train_metauas

        recipe = params["train"]["metauas"]
        checkpoint = train_metauas(output / "training", **recipe)
        shutil.copy(checkpoint, output / "metauas.pth")
        shutil.rmtree(output / "training")
        return {
            "status": "ready",
            "checkpoint": str(output / "metauas.pth"),
            "backbone": recipe["backbone"],
            "image_size": recipe["image_size"],
            "description": f"MetaUAS meta-trained offline on synthetic change pairs ({recipe['backbone']})",
        }
    local = LOCAL_WEIGHTS_DIR / f"{source}.ckpt"
    try:
        path = resolve_weights(local if local.is_file() else source)
    except WeightsNotFoundError as exc:
        msg = f"{exc} In this repository you can also put it at {local}; the next `dvc repro` then evaluates it."
        raise WeightsNotFoundError(msg) from exc
    shutil.copy(path, output / "metauas.pth")
    return {
        "status": "ready",
        "checkpoint": str(output / "metauas.pth"),
        "backbone": "tf_efficientnet_b4",
        "image_size": int(params["evaluate"]["image_size"]),
        "description": f"official MetaUAS checkpoint {path.name}",
    }


def _clip_weights(model: str, output: Path) -> dict[str, Any]:
    del output
    msg = (
        f"{model} is not part of this release of anomalib-uas yet; it is skipped. Its CLIP weights will be read "
        f"from {LOCAL_WEIGHTS_DIR}/ once the model lands."
    )
    raise WeightsNotFoundError(msg)


def _metauas_kwargs(status: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    evaluation = params["evaluate"]
    return {
        "image_size": evaluation["image_size"],
        "backbone": status["backbone"],
        "k_shot": evaluation["k_shot"],
        "prompt_strategy": evaluation["prompt_strategy"],
        "seed": evaluation["seed"],
    }


def _build_metauas(status: dict[str, Any], params: dict[str, Any]) -> Any:
    from anomalib_uas.models import MetaUAS

    return MetaUAS.from_official_checkpoint(status["checkpoint"], visualizer=False, **_metauas_kwargs(status, params))


def evaluate(model: str, params: dict[str, Any], data: Path = DATA_DIR) -> dict[str, Any]:
    """Evaluate one model on every category and write its metrics, curves and predictions.

    Args:
        model: Model name.
        params: Pipeline parameters.
        data: The dataset folder written by :func:`prepare_data`.

    Returns:
        The metrics written to ``reports/<model>/metrics.json``.
    """
    reports = REPORTS_DIR / model
    predictions = PREDICTIONS_DIR / model
    for folder in (reports, predictions):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    status = read_status(model)
    categories = list(params["data"]["categories"])
    if status["status"] != "ready":
        metrics = {"skipped": 1}
        _write_json(reports / "metrics.json", metrics)
        _write_json(reports / "skipped.json", {"reason": status["reason"]})
        _write_curves(reports, [], [], categories)
        return metrics
    with tracking.stage_run("evaluate", model, params) as run:
        rows = evaluate_model(
            lambda: _build_metauas(status, params),
            data,
            categories,
            output_dir=Path("results") / model,
            predictions_dir=predictions,
            batch_size=params["evaluate"]["batch_size"],
            build_logger=lambda category: tracking.engine_logger(f"{model}-{category}", run.info.run_id),
        )
        columns = [*METRICS, "ms_per_image"]
        per_category = {row["category"]: {c: row[c] for c in columns if c in row} for row in rows}
        metrics = {"skipped": 0, "categories": per_category}
        metrics["mean"] = {c: float(np.mean([row[c] for row in rows if c in row])) for c in columns}
        _write_json(reports / "metrics.json", metrics)
        _write_json(reports / "weights.json", {"description": status["description"]})
        saved = {category: np.load(predictions / category / "predictions.npz") for category in categories}
        _write_curves(
            reports,
            [saved[c]["pred_score"] for c in categories],
            [saved[c]["gt_label"] for c in categories],
            categories,
            rows,
        )
        mlflow.log_metrics({f"mean.{k}": v for k, v in metrics["mean"].items()})
        for category, values in per_category.items():
            mlflow.log_metrics({f"{category}.{k}": v for k, v in values.items()})
        thresholds = {category: _thresholds(saved[category]) for category in categories}
        _write_json(
            reports / "evaluation.json",
            {
                "mlflow_run_id": run.info.run_id,
                "thresholds": thresholds,
                "prompt_paths": {row["category"]: row["prompt_paths"] for row in rows},
            },
        )
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        if params["registry"]["register"]:
            for row in rows:
                config = {"model": model, "kwargs": _metauas_kwargs(status, params), **thresholds[row["category"]]}
                tracking.register_model(
                    model,
                    row["category"],
                    Path(status["checkpoint"]),
                    [Path(p) for p in row["prompt_paths"]],
                    config,
                    per_category[row["category"]],
                    params["registry"]["champion_metric"],
                )
    return metrics


def _thresholds(saved: np.lib.npyio.NpzFile, max_pixels: int = 200_000) -> dict[str, float]:
    """F1-optimal image and pixel thresholds on the raw scores of an evaluation."""
    image = _f1_threshold(saved["gt_label"], saved["pred_score"])
    maps = saved["anomaly_map"].astype(np.float32).ravel()
    masks = saved["gt_mask"].ravel()
    step = max(1, maps.size // max_pixels)
    return {"image_threshold": image, "pixel_threshold": _f1_threshold(masks[::step], maps[::step])}


def _f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _write_curves(
    reports: Path,
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    categories: list[str],
    rows: list[dict[str, Any]] | None = None,
) -> None:
    roc_rows, pr_rows = [], []
    for category, score, label in zip(categories, scores, labels, strict=False):
        if len(np.unique(label)) < 2:
            continue
        fpr, tpr, _ = roc_curve(label, score, drop_intermediate=True)
        roc_rows += [
            {"category": category, "fpr": f"{a:.6f}", "tpr": f"{b:.6f}"} for a, b in zip(fpr, tpr, strict=True)
        ]
        precision, recall, _ = precision_recall_curve(label, score, drop_intermediate=True)
        pr_rows += [
            {"category": category, "recall": f"{r:.6f}", "precision": f"{p:.6f}"}
            for p, r in zip(precision, recall, strict=True)
        ]
    bars = [{"category": row["category"], **{c: f"{row[c]:.6f}" for c in METRICS if c in row}} for row in rows or []]
    for name, fields, content in (
        ("roc.csv", ["category", "fpr", "tpr"], roc_rows),
        ("pr.csv", ["category", "recall", "precision"], pr_rows),
        ("per_category.csv", ["category", *METRICS], bars),
    ):
        with (reports / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(content)


def review(params: dict[str, Any], reports: Path = REPORTS_DIR) -> dict[str, Any]:
    """Build the FiftyOne review datasets of every evaluated model and category.

    Args:
        params: Pipeline parameters.
        reports: The reports folder.

    Returns:
        Per dataset name: the counts of false positives and false negatives; also written to
        ``reports/review.json``.
    """
    from anomalib_uas.review import build_review_dataset

    summary: dict[str, Any] = {}
    for model in params["models"]:
        status = read_status(model)
        if status["status"] != "ready":
            continue
        evaluation = json.loads((reports / model / "evaluation.json").read_text())
        module = _build_metauas(status, params)
        network, transform = module.model.eval(), module.pre_processor.transform
        for category in params["data"]["categories"]:
            predictions = PREDICTIONS_DIR / model / category / "predictions.npz"
            paths = [str(p) for p in np.load(predictions)["image_path"]]
            embeddings = _embeddings(network, transform, paths)
            dataset = build_review_dataset(
                model,
                category,
                predictions,
                embeddings=embeddings,
                prompt_paths=evaluation["prompt_paths"][category],
                mlflow_run_id=evaluation["mlflow_run_id"],
                **evaluation["thresholds"][category],
            )
            counts = dataset.count_values("eval")
            summary[dataset.name] = {"FP": counts.get("FP", 0), "FN": counts.get("FN", 0), "samples": len(dataset)}
    _write_json(reports / "review.json", summary)
    return summary


def _embeddings(network: Any, transform: Any, paths: list[str], batch_size: int = 16) -> np.ndarray:
    from anomalib_uas.data.images import read_image

    chunks = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([transform(read_image(path)) for path in paths[start : start + batch_size]])
        with torch.no_grad():
            chunks.append(network.encode(images)[-1].mean(dim=(2, 3)).numpy())
    return np.concatenate(chunks)
