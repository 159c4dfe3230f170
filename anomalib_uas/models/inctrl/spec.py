# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL as the pipeline, the registry and serving see it.

Weights (``weights.inctrl``): ``official`` is ``weights/inctrl/2/checkpoint.pyth``, the authors' file with its CLIP
tower (for k = 4 or 8 give their path); a local path or URL; or ``train`` (auxiliary training of the adapter and the
heads, ``train.inctrl``). Without its files on the machine the model is skipped, with the files named.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomalib_uas.models.components.clip_files import ClipModelFiles, train_auxiliary
from anomalib_uas.models.inctrl.checkpoint import read_official, split_official, to_official
from anomalib_uas.models.inctrl.lightning_model import InCTRL
from anomalib_uas.models.spec import ModelFiles, ModelSpec

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from anomalib_uas.models.inctrl.torch_model import InCTRLModel
    from anomalib_uas.params import EvaluateParams, Params

__all__ = ["SPEC"]

FILES = ClipModelFiles(
    model="inctrl",
    clip_model="ViT-B-16-plus-240",
    clip_pretrained="laion400m_e32",
    official_checkpoint="2/checkpoint.pyth",
    published_at="`checkpoints/<k>/checkpoint.pyth` (k = 2, 4, 8; it holds its CLIP weights) from the authors' "
    "Google Drive folder 1McmfxF8_H0BeRvcJ_poGIB-ATQCDDEIa (linked from github.com/mala-lab/InCTRL)",
)


def _fetch(source: str, params: Params, folder: Path, output: Path) -> ModelFiles:
    del output  # the files are the user's or downloaded; the weights stage copies them
    config = params.models_config.inctrl
    checkpoint, problem = FILES.find_checkpoint(source, folder)
    if checkpoint is None:
        raise FILES.missing([problem])
    parts = split_official(read_official(checkpoint))  # WeightsError: not an InCTRL file
    clip = None
    if config.clip_weights or parts.clip is None:
        clip, clip_problem = FILES.find_clip(config, folder, download=True)
        if clip is None:
            raise FILES.missing([clip_problem])
    clip_model = config.clip_model or FILES.clip_model
    clip_from = f"CLIP from {clip.name}" if clip is not None else "CLIP tower of the same file"
    return ModelFiles(
        checkpoint=checkpoint,
        clip_weights=clip,
        kwargs={"clip_model": clip_model},
        description=f"InCTRL checkpoint {checkpoint} ({clip_model}, {clip_from})",
    )


def _train(params: Params, folder: Path, output: Path, engine_logger: Logger | bool) -> ModelFiles:
    recipe = params.train.inctrl

    def build(clip_model: str, clip_weights: Path) -> InCTRL:
        return InCTRL(
            clip_model=clip_model,
            clip_pretrained=None,
            clip_weights=str(clip_weights),
            k_shot=recipe.k_shot,
            auxiliary_training=True,
            learning_rate=recipe.learning_rate,
            seed=recipe.seed,
            visualizer=False,
        )

    def save(module: InCTRL, path: Path) -> None:
        torch.save(to_official(module.model, include_clip=False), path)

    return train_auxiliary(
        FILES, recipe, params.models_config.inctrl, folder, output, build, save, engine_logger, balanced=True
    )


def _evaluation_kwargs(evaluate: EvaluateParams) -> dict[str, Any]:
    return {"k_shot": evaluate.k_shot, "seed": evaluate.seed}  # k normal prompts drawn from the normal train images


def _prepare_serving(model: InCTRLModel, category: str) -> None:
    model.set_category(category)  # the category's text features, encoded once


SPEC = ModelSpec(
    name="inctrl",
    module_class=InCTRL,
    uses_clip=True,
    takes_prompts=True,
    fetch=_fetch,
    train=_train,
    evaluation_kwargs=_evaluation_kwargs,
    prompt_pool="few_shot_source",
    official_files=FILES.published_at,
    optional=True,
    prepare_serving=_prepare_serving,
)
