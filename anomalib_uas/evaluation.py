# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Evaluate a model on categories of an MVTec-layout dataset through ``anomalib.engine.Engine.test``.

Example:
    >>> from anomalib_uas.evaluation import evaluate_metauas, format_table
    >>> rows = evaluate_metauas("datasets/demo", ["brick"])  # doctest: +SKIP
    >>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import Callback

from anomalib_uas.models import MetaUAS
from anomalib_uas.weights import OFFICIAL_WEIGHTS, WeightsNotFoundError, resolve_weights

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "MetaUASWeights", "best_offline_metauas_weights", "evaluate_metauas", "format_table"]

METRICS = (
    "image_AUROC",
    "image_AUPR",
    "image_F1Max",
    "pixel_AUROC",
    "pixel_AUPR",
    "pixel_F1Max",
    "pixel_AUPRO",
)


@dataclass(frozen=True)
class MetaUASWeights:
    """Which MetaUAS weights an evaluation uses.

    Attributes:
        description: What a reader is told about the weights.
        model_kwargs: Arguments that build the model with them.
    """

    description: str
    model_kwargs: dict[str, Any]


def best_offline_metauas_weights(image_size: int = 256) -> MetaUASWeights:
    """Pick the best MetaUAS weights available without a download.

    The official checkpoint of the resolution, when it is in the weights cache, comes first. Otherwise the
    EfficientNet-Lite0 encoder with its offline ImageNet weights is used with an untrained (seeded) decoder,
    which checks the plumbing but does not measure MetaUAS quality.

    Args:
        image_size: Input size; an official checkpoint exists for 256 and 512.

    Returns:
        The chosen weights.
    """
    name = f"metauas-{image_size}"
    if name in OFFICIAL_WEIGHTS:
        try:
            path = resolve_weights(name)
        except WeightsNotFoundError as exc:
            logger.info("Official weights not available: %s", exc)
        else:
            return MetaUASWeights(
                description=f"official MetaUAS checkpoint {path} (EfficientNet-b4)",
                model_kwargs={"backbone": "tf_efficientnet_b4", "pretrained_backbone": False, "weights": str(path)},
            )
    return MetaUASWeights(
        description=(
            "EfficientNet-Lite0 with offline ImageNet weights and an UNTRAINED decoder (no official MetaUAS "
            f"checkpoint in the weights cache; put {name}.ckpt there for real numbers). The metrics check the "
            "pipeline, not the method."
        ),
        model_kwargs={"backbone": "efficientnet_lite0", "pretrained_backbone": True},
    )


class _TestTimer(Callback):
    """Measures the wall time of the test loop and the number of images it saw."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start = 0.0

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
        del trainer, pl_module, outputs, args
        self.images += len(batch.image)

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        del trainer, pl_module
        self.seconds = time.perf_counter() - self._start


def evaluate_metauas(
    root: str | Path,
    categories: Sequence[str],
    weights: MetaUASWeights | None = None,
    image_size: int = 256,
    k_shot: int = 1,
    prompt_strategy: str = "random",
    seed: int = 0,
    output_dir: str | Path = "results",
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Run ``Engine.test`` with MetaUAS on each category.

    Args:
        root: Dataset root in MVTec AD layout.
        categories: Categories to evaluate.
        weights: Weights to use; the best offline ones by default.
        image_size: Model input size.
        k_shot: Prompt images per query.
        prompt_strategy: ``"random"`` or ``"retrieval"``.
        seed: Seed of the prompt choice and of untrained layers.
        output_dir: Engine root folder.
        batch_size: Evaluation batch size.

    Returns:
        One row per category with the seven metrics, ``ms_per_image`` and the weights description.
    """
    weights = weights or best_offline_metauas_weights(image_size)
    rows = []
    for category in categories:
        model = MetaUAS(
            image_size=image_size,
            k_shot=k_shot,
            prompt_strategy=prompt_strategy,
            seed=seed,
            visualizer=False,
            **weights.model_kwargs,
        )
        datamodule = MVTecAD(
            root=root, category=category, train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0
        )
        timer = _TestTimer()
        engine = Engine(
            default_root_dir=Path(output_dir) / category,
            logger=False,
            accelerator="cpu",
            devices=1,
            callbacks=[timer],
            enable_progress_bar=True,
        )
        results = engine.test(model, datamodule=datamodule, verbose=False)[0]
        row = {"category": category, **{name: float(results[name]) for name in METRICS if name in results}}
        row["ms_per_image"] = 1000.0 * timer.seconds / max(timer.images, 1)
        row["weights"] = weights.description
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Format evaluation rows as a Markdown table with a mean row.

    Args:
        rows: What :func:`evaluate_metauas` returned.

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
