# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt as the pipeline, the registry and serving see it.

Weights (``weights.faprompt``): ``official`` is ``weights/faprompt/epoch_15.pth``, the authors' prompt learner, used
with the OpenAI ViT-L/14@336px CLIP weights; a local path or URL; or ``train`` (auxiliary training of the prompt
learner, ``train.faprompt``). Without its files on the machine the model is skipped, with the files named.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models.components.clip_files import ClipModelFiles, train_auxiliary
from anomalib_uas.models.faprompt.checkpoint import read_official
from anomalib_uas.models.faprompt.lightning_model import FAPrompt
from anomalib_uas.models.faprompt.torch_model import REFERENCE_SIZE, FAPromptModel
from anomalib_uas.models.spec import ModelFiles, ModelSpec

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from anomalib_uas.params import EvaluateParams, Params

__all__ = ["SPEC"]

FILES = ClipModelFiles(
    model="faprompt",
    clip_model="ViT-L-14-336",
    clip_pretrained="openai",
    official_checkpoint="epoch_15.pth",
    published_at="the `epoch_<N>.pth` prompt-learner checkpoint linked from github.com/mala-lab/FAPrompt",
)


def _fetch(source: str, params: Params, folder: Path, output: Path) -> ModelFiles:
    del output  # the files are the user's or downloaded; the weights stage copies them
    config = params.models_config.faprompt
    checkpoint, problem = FILES.find_checkpoint(source, folder)
    clip, clip_problem = FILES.find_clip(config, folder, download=checkpoint is not None)
    if checkpoint is None or clip is None:
        raise FILES.missing([text for text in (problem, clip_problem) if text])
    read_official(checkpoint)  # WeightsError: not a FAPrompt file
    clip_model = config.clip_model or FILES.clip_model
    return ModelFiles(
        checkpoint=checkpoint,
        clip_weights=clip,
        kwargs={"clip_model": clip_model, "image_size": config.image_size or REFERENCE_SIZE},
        description=f"FAPrompt prompt learner {checkpoint} ({clip_model}, CLIP from {clip.name})",
    )


def _train(params: Params, folder: Path, output: Path, engine_logger: Logger | bool) -> ModelFiles:
    recipe, config = params.train.faprompt, params.models_config.faprompt
    image_size = config.image_size or REFERENCE_SIZE

    def build(clip_model: str, clip_weights: Path) -> FAPrompt:
        return FAPrompt(
            clip_model=clip_model,
            clip_pretrained=None,
            clip_weights=str(clip_weights),
            image_size=image_size,
            auxiliary_training=True,
            learning_rate=recipe.learning_rate,
            seed=recipe.seed,
            visualizer=False,
        )

    def save(module: FAPrompt, path: Path) -> None:
        module.save_official_checkpoint(path)

    files = train_auxiliary(FILES, recipe, config, folder, output, build, save, engine_logger)
    return replace(files, kwargs={**files.kwargs, "image_size": image_size})


def _evaluation_kwargs(evaluate: EvaluateParams) -> dict[str, Any]:
    del evaluate  # zero-shot: no prompt image, its own input size
    return {}


def _prepare_serving(model: FAPromptModel, category: str) -> None:
    del category  # zero-shot with category-agnostic prompts
    model.cached_static_text()  # the static text features, encoded once


SPEC = ModelSpec(
    name="faprompt",
    module_class=FAPrompt,
    uses_clip=True,
    takes_prompts=False,
    fetch=_fetch,
    train=_train,
    evaluation_kwargs=_evaluation_kwargs,
    official_files=FILES.published_at,
    optional=True,
    prepare_serving=_prepare_serving,
)
