# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluate models on categories of an MVTec-layout dataset through ``anomalib.engine.Engine.test``.

For each category the model is tested with anomalib's metrics; a callback records every test image's score,
label, anomaly map and masks, so that curves, reports and error reviews can be built from the saved predictions
without running the model again.

Saved per category (``<predictions_dir>/<category>/``): ``predictions.npz`` with ``image_path``, ``gt_label``,
``pred_score`` (raw, before anomalib's normalisation), ``anomaly_map`` (float16, ``[N, H, W]``) and ``gt_mask``.

Example:
    >>> from anomalib_uas.evaluation import evaluate_model, format_table
    >>> from anomalib_uas.models import MetaUAS
    >>> rows = evaluate_model(lambda category: MetaUAS(), "datasets/demo", ["brick"])  # doctest: +SKIP
    >>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_uas.params import METRICS

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "PredictionRecorder",
    "evaluate_model",
    "format_table",
    "save_scored",
    "score_images",
]


class PredictionRecorder(Callback):
    """Record per-image test outputs and the time the test loop took.

    The recorder runs before the model's own callbacks, so it sees the raw scores and maps, before anomalib's
    post-processor normalises them: they stay comparable across categories and runs.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.records: dict[str, list[Any]] = {}
        self._start = 0.0

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock and clear earlier records.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self.records = {key: [] for key in ("image_path", "gt_label", "pred_score", "anomaly_map", "gt_mask")}
        self._start = time.perf_counter()

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """Keep the raw predictions of a batch.

        Args:
            trainer: The trainer.
            pl_module: The model.
            outputs: The step output.
            batch: The test batch.
            *args: Batch and dataloader indices.
        """
        del trainer, pl_module, args
        size = len(batch.image)
        self.records["image_path"].extend(batch.image_path)
        self.records["gt_label"].append(np.array(batch.gt_label.cpu(), dtype=np.uint8))
        self.records["pred_score"].append(np.array(outputs.pred_score.cpu(), dtype=np.float32))
        maps = outputs.anomaly_map if outputs.anomaly_map is not None else torch.zeros(size, *batch.image.shape[-2:])
        self.records["anomaly_map"].append(np.array(maps.reshape(size, *maps.shape[-2:]).cpu(), dtype=np.float16))
        masks = batch.gt_mask if batch.gt_mask is not None else torch.zeros(size, *maps.shape[-2:])
        self.records["gt_mask"].append(np.array(masks.reshape(size, *masks.shape[-2:]).cpu(), dtype=bool))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop the clock.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self.seconds = time.perf_counter() - self._start

    @property
    def num_images(self) -> int:
        """Images recorded in the last test loop.

        Returns:
            The count.
        """
        return len(self.records.get("image_path", []))

    def save(self, path: str | Path) -> Path:
        """Write the records of the last test loop.

        Args:
            path: Output ``.npz`` file.

        Returns:
            The path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {key: np.concatenate(value) for key, value in self.records.items() if key != "image_path"}
        np.savez_compressed(path, image_path=np.array(self.records["image_path"]), **arrays)
        return path


def evaluate_model(
    build_model: Callable[[str], AnomalibModule],
    root: str | Path,
    categories: Sequence[str],
    output_dir: str | Path = "results",
    predictions_dir: str | Path | None = None,
    batch_size: int = 8,
    build_logger: Callable[[str], Any] | None = None,
    scored_images: Callable[[str, list[str]], dict[str, list[str]]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``Engine.test`` on each category with a fresh model.

    Args:
        build_model: Returns a new model for a category (given its name).
        root: Dataset root in MVTec AD layout.
        categories: Categories to evaluate.
        output_dir: Engine root folder.
        predictions_dir: Where to save each category's ``predictions.npz``; not saved when ``None``.
        batch_size: Evaluation batch size.
        build_logger: Returns the Engine logger of a category (e.g. an MLflow logger); no logging when ``None``.
        scored_images: ``(category, prompt_paths) -> {group: image paths}``: images outside the test set that the
            tested model scores too (held-out normal images for calibration, reviewer feedback); none when ``None``.
            They are saved beside the predictions as ``normals.npz`` (``image_path``, ``group``, ``pred_score``,
            ``map_max``, ``map_min``).

    Returns:
        One row per category with the metrics, ``ms_per_image`` (the test loop's wall time per image) and the
        ``prompt_paths`` the model used.
    """
    rows = []
    for category in categories:
        datamodule = MVTecAD(
            root=root, category=category, train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0
        )
        recorder = PredictionRecorder()
        engine = Engine(
            default_root_dir=Path(output_dir) / category,
            logger=build_logger(category) if build_logger is not None else False,
            accelerator="cpu",
            devices=1,
            callbacks=[recorder],
        )
        model = build_model(category)
        results = engine.test(model, datamodule=datamodule, verbose=False)[0]
        row = {"category": category, **{name: float(results[name]) for name in METRICS if name in results}}
        row["ms_per_image"] = 1000.0 * recorder.seconds / max(recorder.num_images, 1)
        row["prompt_paths"] = list(getattr(model, "prompt_paths", []))
        if predictions_dir is not None:
            recorder.save(Path(predictions_dir) / category / "predictions.npz")
            groups = scored_images(category, row["prompt_paths"]) if scored_images is not None else {}
            save_scored(Path(predictions_dir) / category / "normals.npz", model, groups, batch_size)
        rows.append(row)
    return rows


def score_images(model: AnomalibModule, paths: Sequence[str | Path], batch_size: int = 8) -> dict[str, np.ndarray]:
    """Raw scores and map extremes of a model whose prompts are set (after ``Engine.test``), before normalisation.

    Args:
        model: The tested model.
        paths: Image files.
        batch_size: Images per forward.

    Returns:
        ``pred_score``, ``map_max`` and ``map_min`` (the largest and smallest value of each image's anomaly map),
        float32 arrays in the order of ``paths``.
    """
    from anomalib_uas.data.images import read_image

    network, transform = model.model.eval(), model.pre_processor.transform
    columns: dict[str, list[np.ndarray]] = {"pred_score": [], "map_max": [], "map_min": []}
    for start in range(0, len(paths), batch_size):
        images = torch.stack([transform(read_image(str(path))) for path in paths[start : start + batch_size]])
        with torch.no_grad():
            output = network(images)
        maps = output.anomaly_map.reshape(len(images), -1).float()
        columns["pred_score"].append(output.pred_score.reshape(-1).float().numpy())
        columns["map_max"].append(maps.amax(dim=1).numpy())
        columns["map_min"].append(maps.amin(dim=1).numpy())
    return {
        key: np.concatenate(value).astype(np.float32) if value else np.zeros(0, np.float32)
        for key, value in columns.items()
    }


def save_scored(path: Path, model: AnomalibModule, groups: dict[str, list[str]], batch_size: int = 8) -> Path:
    """Score images outside the test set and save them by group (see :func:`evaluate_model`).

    Args:
        path: Output ``normals.npz``.
        model: The tested model.
        groups: Group name -> image files.
        batch_size: Images per forward.

    Returns:
        The path.
    """
    paths = [str(p) for files in groups.values() for p in files]
    names = [group for group, files in groups.items() for _ in files]
    scored = score_images(model, paths, batch_size)
    np.savez_compressed(path, image_path=np.array(paths, dtype=str), group=np.array(names, dtype=str), **scored)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Format evaluation rows as a Markdown table with a mean row.

    Args:
        rows: What :func:`evaluate_model` returned.

    Returns:
        The table.
    """
    columns = [*METRICS, "ms_per_image"]
    lines = ["| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['category']} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in columns) + " |")
    if len(rows) > 1:
        means = [sum(row.get(c, float("nan")) for row in rows) / len(rows) for c in columns]
        lines.append("| **mean** | " + " | ".join(f"{value:.3f}" for value in means) + " |")
    return "\n".join(lines)
