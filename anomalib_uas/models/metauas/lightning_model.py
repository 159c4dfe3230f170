# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS as an anomalib model: one normal prompt image per category gives a pixel anomaly map.

Prompt images are chosen reproducibly and encoded once into buffers that are saved with the model:

* ``"random"`` (the paper's protocol): ``k_shot`` seeded normal images of the category (from the datamodule's
  normal training images, or from ``prompt_source``), shared by every query;
* ``"retrieval"`` (MetaUAS*): for each query the ``k_shot`` most similar normal images of the category, by
  cosine similarity of global last-level features;
* ``"pool"``: the same retrieval over a class-agnostic folder of normal images of many categories
  (``prompt_source``).

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_uas.models import MetaUAS
    >>> model = MetaUAS.from_official_checkpoint("metauas-256")  # doctest: +SKIP
    >>> Engine().test(model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP

Paper:
    Bin-Bin Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning", NeurIPS 2024.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_uas.data.images import list_images, read_image
from anomalib_uas.models.components.processing import probability_post_processor, segmentation_evaluator
from anomalib_uas.models.components.references import seeded_choice
from anomalib_uas.models.components.transforms import SizedPreProcessor
from anomalib_uas.models.metauas.checkpoint import OFFICIAL_BACKBONE, from_official
from anomalib_uas.models.metauas.torch_model import OFFICIAL_DECODER_CHANNELS, MetaUASModel
from anomalib_uas.weights import WeightsError, known_source_of, load_state_dict, resolve_weights

logger = logging.getLogger(__name__)

__all__ = ["MetaUAS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROMPT_STRATEGIES = ("random", "retrieval", "pool")


class MetaUAS(AnomalibModule):
    """MetaUAS universal anomaly segmentation.

    Args:
        backbone: Encoder; ``"tf_efficientnet_b4"`` is the official layout, ``"efficientnet_lite{0,1,2}"`` load
            offline ImageNet weights, any other timm hierarchical CNN works through ``features_only``.
        pretrained_backbone: Load the encoder's ImageNet weights (overwritten by ``weights`` when given).
        weights: A full-model checkpoint in the official format: a path, a URL, or ``"metauas-256"`` /
            ``"metauas-512"``. Loaded when the model is set up, unless a Lightning checkpoint restores it.
        image_size: Square input size, a multiple of 32 (256 by default, 512 supported).
        k_shot: Prompt images per query.
        prompt_strategy: ``"random"``, ``"retrieval"`` or ``"pool"`` (see the module docstring).
        prompt_source: A folder or a list of normal images. Required for ``"pool"``; for ``"random"`` and
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
            ``prompt_source``.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained_backbone: bool = True,
        weights: str | None = None,
        image_size: int = 256,
        k_shot: int = 1,
        prompt_strategy: str = "random",
        prompt_source: str | Sequence[str] | None = None,
        seed: int = 0,
        alignment: str = "soft",
        fusion: str = "cat",
        decoder_channels: Sequence[int] = OFFICIAL_DECODER_CHANNELS,
        meta_train: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 5e-4,
        train_encoder: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if image_size < 32 or image_size % 32:
            msg = (
                f"image_size must be a positive multiple of 32 (the encoder stride), got {image_size}; use 256 or 512."
            )
            raise ValueError(msg)
        if prompt_strategy not in PROMPT_STRATEGIES:
            msg = f"prompt_strategy must be one of {PROMPT_STRATEGIES}, got {prompt_strategy!r}."
            raise ValueError(msg)
        if prompt_strategy == "pool" and prompt_source is None:
            msg = "prompt_strategy='pool' searches a folder of normal images: set prompt_source to that folder."
            raise ValueError(msg)
        super().__init__(
            pre_processor=self.configure_pre_processor(image_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # layers that no checkpoint overwrites start the same for the same seed
            self.model = MetaUASModel(
                backbone=backbone,
                pretrained_backbone=pretrained_backbone and weights is None,
                alignment=alignment,
                fusion=fusion,
                decoder_channels=tuple(decoder_channels),
                k_shot=k_shot,
                retrieval=prompt_strategy != "random",
                train_encoder=train_encoder,
            )
        self.weights = weights
        self.prompt_strategy = prompt_strategy
        self.prompt_source = prompt_source
        self.k_shot = k_shot
        self.seed = seed
        self.meta_train = meta_train
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self._weights_loaded = weights is None
        self._prompt_images: torch.Tensor | None = None
        self.prompt_paths: list[str] = []
        self.loss = nn.BCEWithLogitsLoss()

    @classmethod
    def from_official_checkpoint(
        cls,
        path: str | Path,
        image_size: int = 256,
        backbone: str = OFFICIAL_BACKBONE,
        **kwargs: Any,
    ) -> MetaUAS:
        """Build MetaUAS from a checkpoint in the official format (``metauas-256.ckpt``, ``metauas-512.ckpt``).

        Args:
            path: Local file, URL, or ``"metauas-256"`` / ``"metauas-512"`` (cached or downloaded with sha256).
            image_size: Input size; must match the resolution of a known official file.
            backbone: Encoder of the checkpoint: the official b4 layout, or the backbone a checkpoint of this
                package was meta-trained with.
            **kwargs: Other :class:`MetaUAS` arguments (prompt strategy, k_shot, components, ...).

        Returns:
            The model with the weights loaded.
        """
        model = cls(backbone=backbone, pretrained_backbone=False, weights=str(path), image_size=image_size, **kwargs)
        model.load_weights()
        return model

    def load_weights(self) -> None:
        """Load the official-format checkpoint named by ``weights`` into the network.

        Raises:
            WeightsError: The file is of another model or another resolution.
        """
        path = resolve_weights(self.weights)
        known = known_source_of(path)
        image_size = self.hparams.image_size
        if known is not None and known.image_size not in {None, image_size}:
            msg = (
                f"{path.name} is {known.name}, trained at {known.image_size} px, but the model runs at "
                f"{image_size} px. Use image_size={known.image_size} or metauas-{image_size}."
            )
            raise WeightsError(msg)
        state_dict = from_official(load_state_dict(path), self.model)
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

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> SizedPreProcessor:
        """The official pre-processing: bilinear ``align_corners=True`` resize, no crop, ImageNet normalisation.

        Args:
            image_size: Square size (an int or an ``(h, w)`` pair with h == w); 256 by default.

        Returns:
            The pre-processor.
        """
        size = image_size if isinstance(image_size, int) else (image_size or (256, 256))[0]
        return SizedPreProcessor(size, IMAGENET_MEAN, IMAGENET_STD)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's post-processor, starting from the sigmoid map's own scale.

        Validation data replaces the statistics with adaptive thresholds and min-max normalisation. Without
        validation data (predicting on a folder), scores stay the raw change probabilities and both image and
        pixel thresholds are 0.5.

        Returns:
            The post-processor.
        """
        return probability_post_processor()

    def val_dataloader(self) -> list:
        """No validation data of the model's own; the datamodule's is used when there is one.

        Returns:
            An empty list, so that ``Engine.predict`` works without a datamodule.
        """
        return []

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Threshold-free image and pixel metrics.

        Returns:
            Evaluator with image AUROC, AUPR, F1Max and pixel AUROC, AUPR, F1Max, AUPRO.
        """
        return segmentation_evaluator()

    @property
    def learning_type(self) -> LearningType:
        """MetaUAS needs a few normal prompt images and no training on the target.

        Returns:
            ``LearningType.FEW_SHOT``, or ``LearningType.ONE_CLASS`` with ``meta_train`` so that ``Engine.fit``
            runs gradient steps on change pairs.
        """
        return LearningType.ONE_CLASS if self.meta_train else LearningType.FEW_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Trainer arguments: none for inference; meta-training has no sanity validation.

        Returns:
            Keyword arguments merged into the Trainer.
        """
        return {"num_sanity_val_steps": 0} if self.meta_train else {}

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
        logits = self.model(batch.image, prompt).squeeze(1)
        loss = self.loss(logits, batch.gt_mask.float())
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch.image))
        return loss

    def setup(self, stage: str | None = None) -> None:
        """Load weights and collect the prompt images of this run (none while meta-training: pairs carry them).

        Args:
            stage: Lightning stage.
        """
        if not self._weights_loaded:
            self.load_weights()
        if self.meta_train and stage == "fit":
            return
        images = self._collect_prompt_images()
        if images is not None:
            self._prompt_images = images

    def _collect_prompt_images(self) -> torch.Tensor | None:
        transform = self.pre_processor.transform if self.pre_processor is not None else None
        if self.prompt_source is not None:
            paths = list_images(self.prompt_source)
            if self.prompt_strategy == "random":
                paths = [paths[i] for i in seeded_choice(len(paths), self.k_shot, self.seed)]
            images = [read_image(path) for path in paths]
            self.prompt_paths = [str(path) for path in paths]
        else:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            train_data = getattr(datamodule, "train_data", None)
            if train_data is None:
                return None
            normal = [i for i, label in enumerate(train_data.samples.label_index) if int(label) == 0]
            if self.prompt_strategy == "random":
                normal = [normal[i] for i in seeded_choice(len(normal), self.k_shot, self.seed)]
            elif len(normal) < self.k_shot:
                msg = f"Retrieval needs at least k_shot={self.k_shot} normal training images, found {len(normal)}."
                raise ValueError(msg)
            images = [train_data[i].image for i in normal]
            self.prompt_paths = [str(train_data.samples.image_path.iloc[i]) for i in normal]
        return torch.stack([transform(image) if transform is not None else image for image in images])

    def _encode_prompts(self) -> None:
        if self._prompt_images is not None:
            self.model.set_prompt_bank(self._prompt_images.to(self.device))
            self._prompt_images = None
        elif not self.model.has_prompts:
            msg = (
                "MetaUAS has no prompt images. Give a datamodule with normal training images, set prompt_source to "
                "a folder or list of normal images, or load a checkpoint that holds a prompt bank."
            )
            raise RuntimeError(msg)

    def on_validation_start(self) -> None:
        """Encode the prompt images before validation."""
        self._encode_prompts()

    def on_test_start(self) -> None:
        """Encode the prompt images before testing."""
        self._encode_prompts()

    def on_predict_start(self) -> None:
        """Encode the prompt images before prediction."""
        self._encode_prompts()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the weights as restored so that ``weights`` is not read again.

        Args:
            checkpoint: The Lightning checkpoint.
        """
        super().on_load_checkpoint(checkpoint)
        self._weights_loaded = True

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Predict a validation batch in place (the post-processor collects its statistics from it).

        Args:
            batch: Input batch.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The batch with ``pred_score`` and ``anomaly_map``.
        """
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())
