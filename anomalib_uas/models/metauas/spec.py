# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS as the pipeline, the registry and serving see it.

Weights (``weights.metauas``): ``train`` meta-trains the offline recipe ``train.metauas`` on synthetic change pairs;
``metauas-256`` / ``metauas-512`` are the official files (``weights/metauas/<name>.ckpt``, the weights cache, or a
sha256-checked download when online); anything else must be a local checkpoint file. MetaUAS is never skipped: a
source that does not resolve fails the weights stage with the fix. Every checkpoint is read for the architecture it
records (:func:`~anomalib_uas.models.metauas.checkpoint.read_architecture`), so a file that is not a MetaUAS
checkpoint fails before it counts as ready, and a trained checkpoint is built without architecture arguments.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models.metauas.checkpoint import read_architecture
from anomalib_uas.models.metauas.lightning_model import MetaUAS
from anomalib_uas.models.spec import ModelFiles, ModelSpec
from anomalib_uas.weights import OFFICIAL_WEIGHTS, WeightsError, WeightsNotFoundError, resolve_weights

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from anomalib_uas.params import EvaluateParams, Params

__all__ = ["SPEC"]


def _files(checkpoint: Path, description: str) -> ModelFiles:
    """The checkpoint with the architecture it records (official files: the official one)."""
    architecture = read_architecture(checkpoint)  # WeightsError: not a MetaUAS checkpoint
    trained_at = architecture.pop("image_size")
    return ModelFiles(
        checkpoint=checkpoint,
        kwargs=architecture,
        description=description + (f", trained at {trained_at} px" if trained_at else ""),
    )


def _fetch(source: str, params: Params, folder: Path, output: Path) -> ModelFiles:
    del params, output  # the files are the user's or downloaded; the weights stage copies them
    names = ", ".join(OFFICIAL_WEIGHTS)
    if source in OFFICIAL_WEIGHTS:
        local = folder / OFFICIAL_WEIGHTS[source].filename
        try:
            path = resolve_weights(local if local.is_file() else source)
        except WeightsNotFoundError as exc:
            msg = f"{exc} In this repository you can also put it at {local}."
            raise WeightsError(msg) from exc
        return _files(path, f"official MetaUAS checkpoint {source}")
    path = Path(source).expanduser()
    if not path.is_file():
        msg = (
            f"weights.metauas = {source!r} is neither 'train', an official name ({names}) nor an existing checkpoint "
            "file: fix it in params.yaml"
        )
        raise WeightsError(msg)
    return _files(path, f"MetaUAS checkpoint {path}")


def _train(params: Params, folder: Path, output: Path, engine_logger: Logger | bool) -> ModelFiles:
    from anomalib_uas.models.metauas.training import train_metauas

    del folder  # the offline recipe needs no file: its encoder weights come from an installed package
    recipe = params.train.metauas
    checkpoint = train_metauas(output / "training", logger=engine_logger, **recipe.model_dump(exclude_none=True))
    trained = output / "metauas.pth"
    shutil.copy(checkpoint, trained)
    shutil.rmtree(output / "training")
    return _files(
        trained,
        f"MetaUAS ({recipe.backbone}, {recipe.fusion} fusion) meta-trained offline on synthetic change pairs for "
        f"{recipe.max_steps} steps",
    )


def _evaluation_kwargs(evaluate: EvaluateParams) -> dict[str, Any]:
    return {
        "image_size": evaluate.image_size,
        "k_shot": evaluate.k_shot,
        "prompt_strategy": evaluate.prompt_strategy,
        "few_shot_source": evaluate.few_shot_source,
        "seed": evaluate.seed,
    }


SPEC = ModelSpec(
    name="metauas",
    module_class=MetaUAS,
    uses_clip=False,
    takes_prompts=True,
    fetch=_fetch,
    train=_train,
    evaluation_kwargs=_evaluation_kwargs,
    prompt_pool="few_shot_source",
    official_files=f"the official checkpoints {', '.join(OFFICIAL_WEIGHTS)} (downloaded with sha256 when online)",
)
