# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt as an anomalib model: zero-shot anomaly maps and image scores from learned abnormality prompts.

At test time FAPrompt needs no image of the target category, normal or not. The prompt learner is trained once on
an auxiliary dataset with masks (MVTec AD to test everything else, VisA to test MVTec AD); the official file is
loaded with :meth:`FAPrompt.from_official_checkpoint`. With ``auxiliary_training=True`` the model is a ONE_CLASS
model for ``Engine.fit`` and trains the prompt learner with the official losses on the train split of an
:class:`~anomalib_uas.data.AuxiliaryDataModule` (all images of the auxiliary categories, with masks). Lightning
checkpoints hold the prompt learner only, never the frozen CLIP.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_uas.models.faprompt import FAPrompt
    >>> model = FAPrompt.from_official_checkpoint("epoch_15.pth", clip_weights="ViT-L-14-336px.pt")  # doctest: +SKIP
    >>> Engine().test(model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP

Paper:
    Jiawen Zhu, Yew-Soon Ong, Chunhua Shen, Guansong Pang, "Fine-grained Abnormality Prompt Learning for
    Zero-shot Anomaly Detection", ICCV 2025.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_uas.models.components.base import UniversalModelMixin
from anomalib_uas.models.faprompt.checkpoint import from_official, read_official, to_official
from anomalib_uas.models.faprompt.torch_model import REFERENCE_SIZE, FAPromptLoss, FAPromptModel

logger = logging.getLogger(__name__)

__all__ = ["CLIP_MEAN", "CLIP_STD", "FAPrompt"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_PREFIX = "model.clip."


class FAPrompt(UniversalModelMixin, AnomalibModule):
    """FAPrompt zero-shot anomaly segmentation.

    Args:
        clip_model: open_clip model: ``"ViT-L-14-336"`` (official, built with QuickGELU), or
            ``"uas-tiny-ViT-L-14-336"`` for tests.
        clip_pretrained: open_clip pretrained tag of the CLIP weights (``"openai"``), used when ``clip_weights``
            is not given; ``None`` leaves CLIP random (tests, timing).
        clip_weights: Local CLIP weights file (OpenAI's ``ViT-L-14-336px.pt`` archive, or a state_dict in OpenAI /
            open_clip key names).
        weights: Prompt-learner checkpoint in the official format (``{"prompt_learner": ...}``); loaded when the
            model is set up unless a Lightning checkpoint restores it. ``None`` keeps the random initialisation.
        image_size: Square input size, a multiple of the CLIP patch size (518 officially).
        dap_patch_selection: Patches feeding the abnormality prior: ``"topk"`` (the paper: the ten most abnormal
            patches of the static pass) or ``"first"`` (the first ten in raster order, as the released code and
            weights do).
        sigma: Gaussian sigma of the anomaly map at 518 px, scaled with ``image_size``; 0 disables the filter.
        auxiliary_training: Train the prompt learner on auxiliary data with masks when ``Engine.fit`` runs.
        learning_rate: Adam learning rate of auxiliary training (betas 0.5, 0.999 as in the official code).
        seed: Seed of the prompt learner's random initialisation.
        pre_processor: Pre-processor, ``True`` for the official one.
        post_processor: Post-processor, ``True`` for anomalib's normalisation and thresholds.
        evaluator: Evaluator, ``True`` for image AUROC/AUPR/F1Max and pixel AUROC/AUPR/F1Max/AUPRO.
        visualizer: Visualizer, ``True`` for anomalib's image visualizer.

    Raises:
        ValueError: For an unknown ``dap_patch_selection``, a negative ``sigma`` or an unusable ``image_size``.
    """

    INFERENCE_LEARNING_TYPE = LearningType.ZERO_SHOT
    TRAINING_FLAG = "auxiliary_training"

    def __init__(
        self,
        clip_model: str = "ViT-L-14-336",
        clip_pretrained: str | None = "openai",
        clip_weights: str | None = None,
        weights: str | None = None,
        image_size: int = REFERENCE_SIZE,
        dap_patch_selection: str = "topk",
        sigma: float = 10.0,
        auxiliary_training: bool = False,
        learning_rate: float = 1e-3,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=self.configure_pre_processor(image_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = FAPromptModel(
                clip_model=clip_model,
                clip_pretrained=clip_pretrained,
                clip_weights=clip_weights,
                image_size=image_size,
                dap_patch_selection=dap_patch_selection,
                sigma=sigma,
            )
        self.weights = weights
        self.auxiliary_training = auxiliary_training
        self.learning_rate = learning_rate
        self._weights_loaded = weights is None
        self.loss = FAPromptLoss(self.model.grid)

    @classmethod
    def from_official_checkpoint(
        cls,
        path: str | Path,
        clip_weights: str | Path | None = None,
        dap_patch_selection: str = "first",
        **kwargs: Any,
    ) -> FAPrompt:
        """Build FAPrompt from an official prompt-learner checkpoint (``epoch_N.pth``).

        Args:
            path: Local file holding ``{"prompt_learner": state_dict}``.
            clip_weights: Local file with the OpenAI ViT-L/14@336px weights; ``None`` fetches open_clip's
                ``openai`` weights (cached, or downloaded when online).
            dap_patch_selection: ``"first"`` by default: the released weights were trained and evaluated with the
                first ten patches feeding the prior. ``"topk"`` gives the paper's selection.
            **kwargs: Other :class:`FAPrompt` arguments (``image_size``, ``sigma``, components, ...).

        Returns:
            The model with the prompt learner loaded.
        """
        model = cls(
            weights=str(path),
            clip_weights=None if clip_weights is None else str(clip_weights),
            dap_patch_selection=dap_patch_selection,
            **kwargs,
        )
        model.load_weights()
        return model

    def load_weights(self) -> None:
        """Load the official-format prompt-learner checkpoint named by ``weights``.

        Raises:
            WeightsError: The file is not a FAPrompt checkpoint or does not fit the CLIP backbone.
        """
        if self.weights is None:
            return
        learner = self.model.prompt_learner
        learner.load_state_dict(from_official(read_official(self.weights), learner))
        self.model.clear_text_cache()
        self._weights_loaded = True
        logger.info("Loaded the FAPrompt prompt learner from %s", self.weights)

    def save_official_checkpoint(self, path: str | Path) -> Path:
        """Write the prompt learner in the official format, loadable by the official code and by this class.

        Args:
            path: Output file (e.g. ``epoch_15.pth``).

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"prompt_learner": to_official(self.model.prompt_learner)}, path)
        return path

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """The official pre-processing: bicubic resize to a square, OpenAI CLIP mean and std.

        Args:
            image_size: Square size (an int or an ``(h, w)`` pair with h == w); 518 by default.

        Returns:
            The pre-processor.
        """
        size = image_size if isinstance(image_size, int) else (image_size or (REFERENCE_SIZE, REFERENCE_SIZE))[0]
        transform = Compose(
            [
                Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                Normalize(mean=list(CLIP_MEAN), std=list(CLIP_STD)),
            ]
        )
        return PreProcessor(transform=transform)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """Adam over the prompt learner for auxiliary training (the official optimiser); nothing otherwise.

        Returns:
            The optimiser, or ``None``.
        """
        if not self.auxiliary_training:
            return None
        return torch.optim.Adam(self.model.prompt_learner.parameters(), lr=self.learning_rate, betas=(0.5, 0.999))

    def setup(self, stage: str | None = None) -> None:
        """Load the prompt-learner weights unless a checkpoint restored them.

        Args:
            stage: Lightning stage.
        """
        del stage
        if not self._weights_loaded:
            self.load_weights()

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One auxiliary training step with the official losses.

        Args:
            batch: Pre-processed auxiliary images with ``gt_label`` and ``gt_mask`` (all-zero for normal images).
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The loss.

        Raises:
            ValueError: The batch has no masks.
        """
        del args, kwargs
        if batch.gt_mask is None or batch.gt_label is None:
            msg = (
                "FAPrompt training needs labels and pixel masks (focal and dice losses on the maps); use a "
                "segmentation dataset such as AuxiliaryDataModule over MVTec-layout categories."
            )
            raise ValueError(msg)
        output = self.model(batch.image)
        terms = self.loss(output, batch.gt_label, batch.gt_mask)
        size = len(batch.image)
        self.log("train_loss", terms["loss"], prog_bar=True, batch_size=size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train_{name}", value, batch_size=size)
        return terms["loss"]

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Predict a validation batch in place (the post-processor collects its statistics from it).

        Test and predict steps are anomalib's, which run the same forward.

        Args:
            batch: Input batch.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The batch with ``pred_score`` and ``anomaly_map``.
        """
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen CLIP out of Lightning checkpoints: they hold the prompt learner only.

        Args:
            checkpoint: The Lightning checkpoint being written.
        """
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_CLIP_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the prompt learner as restored so that ``weights`` is not read again.

        Args:
            checkpoint: The Lightning checkpoint.
        """
        super().on_load_checkpoint(checkpoint)
        self._weights_loaded = True

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a state_dict; the frozen CLIP, which checkpoints leave out, keeps its current weights.

        Args:
            state_dict: The state_dict, with or without ``model.clip.*``.
            strict: Require every other key.
            assign: Assign the tensors instead of copying them.

        Returns:
            The missing and unexpected keys.
        """
        if not any(key.startswith(_CLIP_PREFIX) for key in state_dict):
            clip = {f"{_CLIP_PREFIX}{key}": value for key, value in self.model.clip.state_dict().items()}
            state_dict = {**clip, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
