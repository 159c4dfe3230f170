# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS as the pipeline, the registry and serving see it.

Weights (``weights.metauas``): ``train`` meta-trains the offline recipe ``train.metauas`` on synthetic change pairs;
``metauas-256`` / ``metauas-512`` are the official files (``weights/metauas/<name>.ckpt``, the weights cache, or a
sha256-checked download when online); anything else must be a local checkpoint file. MetaUAS is never skipped: a
source that does not resolve fails the weights stage with the fix.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models.metauas.checkpoint import OFFICIAL_BACKBONE
from anomalib_uas.models.metauas.lightning_model import MetaUAS
from anomalib_uas.models.metauas.torch_model import OFFICIAL_DECODER_CHANNELS
from anomalib_uas.models.spec import ModelFiles, ModelSpec
from anomalib_uas.weights import OFFICIAL_WEIGHTS, WeightsError, WeightsNotFoundError, resolve_weights

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from anomalib_uas.params import EvaluateParams, Params

__all__ = ["SPEC"]

OFFICIAL_ARCHITECTURE = {
    "backbone": OFFICIAL_BACKBONE,
    "fusion": "cat",
    "decoder_channels": list(OFFICIAL_DECODER_CHANNELS),
}


def _fetch(source: str, params: Params, folder: Path) -> ModelFiles:
    del params
    names = ", ".join(OFFICIAL_WEIGHTS)
    if source in OFFICIAL_WEIGHTS:
        local = folder / OFFICIAL_WEIGHTS[source].filename
        try:
            path = resolve_weights(local if local.is_file() else source)
        except WeightsNotFoundError as exc:
            msg = f"{exc} In this repository you can also put it at {local}."
            raise WeightsError(msg) from exc
        return ModelFiles(
            checkpoint=path, kwargs=dict(OFFICIAL_ARCHITECTURE), description=f"official MetaUAS checkpoint {source}"
        )
    path = Path(source).expanduser()
    if not path.is_file():
        msg = (
            f"weights.metauas = {source!r} is neither 'train', an official name ({names}) nor an existing checkpoint "
            "file: fix it in params.yaml"
        )
        raise WeightsError(msg)
    return ModelFiles(
        checkpoint=path, kwargs=dict(OFFICIAL_ARCHITECTURE), description=f"MetaUAS checkpoint {path.name}"
    )


def _train(params: Params, folder: Path, output: Path, engine_logger: Logger | bool) -> ModelFiles:
    from anomalib_uas.models.metauas.training import train_metauas

    del folder  # the offline recipe needs no file: its encoder weights come from an installed package
    recipe = params.train.metauas
    checkpoint = train_metauas(output / "training", logger=engine_logger, **recipe.model_dump())
    trained = output / "metauas.pth"
    shutil.copy(checkpoint, trained)
    shutil.rmtree(output / "training")
    return ModelFiles(
        checkpoint=trained,
        kwargs={"backbone": recipe.backbone, "fusion": recipe.fusion, "decoder_channels": recipe.decoder_channels},
        description=(
            f"MetaUAS ({recipe.backbone}, {recipe.fusion} fusion) meta-trained offline on synthetic change pairs for "
            f"{recipe.max_steps} steps at {recipe.image_size} px"
        ),
    )


def _evaluation_kwargs(evaluate: EvaluateParams) -> dict[str, Any]:
    return {
        "image_size": evaluate.image_size,
        "k_shot": evaluate.k_shot,
        "prompt_strategy": evaluate.prompt_strategy,
        "prompt_source": evaluate.prompt_source,
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
    official_files=f"the official checkpoints {', '.join(OFFICIAL_WEIGHTS)} (downloaded with sha256 when online)",
)
