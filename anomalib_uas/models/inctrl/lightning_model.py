# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL as an anomalib model: few-shot image anomaly scores from k normal prompt images, no target training.

The k normal prompt images are drawn with a seed from the datamodule's normal training images, or taken from
``few_shot_source``: a folder or list of images, an official ``<category>.pt`` prompt file (a list of k already
transformed ``3 x 240 x 240`` tensors), or a folder of such files. Their features, and the text features of the
category, are computed once and saved in checkpoints.

With ``auxiliary_training=True`` the model is a ONE_CLASS model for ``Engine.fit``: it trains the adapter and the
two heads on an auxiliary dataset whose train split holds normal and anomalous images of several categories
(:class:`~anomalib_uas.data.AuxiliaryDataModule`), with k normal prompts per query drawn from the query's own
category at every step and the official focal losses on the final and the image-level scores. Lightning
checkpoints hold the trained parts, the prompt and text features, never the frozen CLIP.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_uas.models.inctrl import InCTRL
    >>> model = InCTRL.from_official_checkpoint("checkpoints/2/checkpoint.pyth", k_shot=2)  # doctest: +SKIP
    >>> Engine().test(model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP

Paper:
    Jiawen Zhu and Guansong Pang, "Toward Generalist Anomaly Detection via In-context Residual Learning with
    Few-shot Sample Prompts", CVPR 2024.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import CenterCrop, Compose, InterpolationMode, Normalize, Resize

from anomalib_uas.models.components.base import UniversalModelMixin
from anomalib_uas.models.components.prompts import PromptedModelMixin
from anomalib_uas.models.components.references import seeded_choice
from anomalib_uas.models.inctrl.checkpoint import load_official, read_official, split_official
from anomalib_uas.models.inctrl.torch_model import FEATURE_LAYERS, InCTRLModel

logger = logging.getLogger(__name__)

__all__ = ["CLIP_MEAN", "CLIP_STD", "MAX_SHOTS", "InCTRL", "binary_focal_loss"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_SHOTS = 8
DEFAULT_CATEGORY = "object"
_CLIP_PREFIX = "model.clip."


def binary_focal_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 1.0,
    probabilities_as_logits: bool = True,
) -> torch.Tensor:
    """The official binary focal loss, ``mean(alpha * (1 - p_t) ** gamma * BCE)``.

    Args:
        scores: Predicted anomaly probabilities ``[B]``.
        targets: Labels ``[B]`` (1 = anomalous).
        gamma: Focusing parameter.
        alpha: Weight.
        probabilities_as_logits: Feed the probabilities to ``binary_cross_entropy_with_logits`` as the official
            code does (its heads end in a sigmoid, the loss applies another). ``False`` uses the plain binary
            cross-entropy of the probabilities.

    Returns:
        The scalar loss.
    """
    targets = targets.to(scores.dtype)
    if probabilities_as_logits:
        bce = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")
    else:
        bce = F.binary_cross_entropy(scores, targets, reduction="none")
    return (alpha * (1.0 - torch.exp(-bce)) ** gamma * bce).mean()


class _AuxiliaryPool:
    """Normal prompt candidates of the categories of an auxiliary training set.

    Args:
        datamodule: A datamodule whose ``train_data.samples`` has ``image_path`` and ``label_index`` (and a
            ``category`` column for several categories).
        default_category: Category of datasets without a ``category`` column.
    """

    def __init__(self, datamodule: Any, default_category: str) -> None:
        self.dataset = datamodule.train_data
        self.category_by_path: dict[str, str] = {}
        for name in ("train_data", "val_data", "test_data"):
            samples = getattr(getattr(datamodule, name, None), "samples", None)
            if samples is not None and "category" in samples:
                self.category_by_path.update(zip(samples.image_path, samples.category, strict=True))
        self.default_category = default_category
        samples = self.dataset.samples
        categories = samples.category if "category" in samples else [default_category] * len(samples)
        self.normals: dict[str, list[int]] = {}
        for index, (category, label) in enumerate(zip(categories, samples.label_index, strict=True)):
            if int(label) == 0:
                self.normals.setdefault(category, []).append(index)

    def category_of(self, image_path: str) -> str:
        return self.category_by_path.get(str(image_path), self.default_category)

    def draw(self, category: str, count: int, generator: torch.Generator) -> list[int]:
        candidates = self.normals.get(category, [])
        if len(candidates) < count:
            msg = (
                f"Category {category!r} has {len(candidates)} normal training images, fewer than k_shot={count}; "
                f"add normal images or lower k_shot."
            )
            raise ValueError(msg)
        order = torch.randperm(len(candidates), generator=generator)[:count]
        return [candidates[i] for i in order.tolist()]


class InCTRL(PromptedModelMixin, UniversalModelMixin, AnomalibModule):
    """InCTRL few-shot generalist anomaly detection.

    Args:
        clip_model: open_clip model: ``"ViT-B-16-plus-240"`` (official), or ``"uas-tiny-ViT-B-16-plus-240"`` for
            tests.
        clip_pretrained: open_clip pretrained tag of the CLIP weights; used when neither ``clip_weights`` nor a
            ``weights`` file with a CLIP tower gives them. ``None`` leaves CLIP random (tests, timing).
        clip_weights: Local file with the CLIP weights (open_clip key names); takes precedence over the rest.
        weights: InCTRL checkpoint: an official ``checkpoint.pyth`` (CLIP included), a file of the trained parts,
            or a Lightning checkpoint of this package. ``None`` leaves the adapter and heads untrained.
        k_shot: Normal prompt images per query, 1 to 8.
        few_shot_source: Folder or list of normal images, an official ``<category>.pt`` prompt file, or a folder
            holding ``<category>.pt`` files. ``None`` draws from the datamodule's normal training images.
        category: Object name of the text prompts; by default the datamodule's category, else ``"object"``.
        seed: Seed of the prompt draws and of the initialisation of untrained layers.
        feature_layers: 1-based CLIP blocks of the patch features.
        auxiliary_training: Train the adapter and heads on an auxiliary dataset when ``Engine.fit`` runs.
        learning_rate: AdamW learning rate of auxiliary training.
        weight_decay: AdamW weight decay of auxiliary training.
        probabilities_as_logits: Reproduce the official loss, which treats the heads' probabilities as logits.
        pre_processor: Pre-processor, ``True`` for the official one.
        post_processor: Post-processor, ``True`` for anomalib's normalisation and thresholds.
        evaluator: Evaluator, ``True`` for image AUROC/AUPR/F1Max and pixel AUROC/AUPR/F1Max/AUPRO.
        visualizer: Visualizer, ``True`` for anomalib's image visualizer.

    Raises:
        ValueError: For ``k_shot`` outside 1 to 8.
    """

    INFERENCE_LEARNING_TYPE = LearningType.FEW_SHOT
    TRAINING_FLAG = "auxiliary_training"

    def __init__(
        self,
        clip_model: str = "ViT-B-16-plus-240",
        clip_pretrained: str | None = "laion400m_e32",
        clip_weights: str | None = None,
        weights: str | None = None,
        k_shot: int = 2,
        few_shot_source: str | Sequence[str] | None = None,
        category: str | None = None,
        seed: int = 0,
        feature_layers: Sequence[int] = FEATURE_LAYERS,
        auxiliary_training: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        probabilities_as_logits: bool = True,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if not 1 <= k_shot <= MAX_SHOTS:
            msg = f"k_shot must be between 1 and {MAX_SHOTS} (InCTRL uses 2, 4 or 8), got {k_shot}."
            raise ValueError(msg)
        image_size = _clip_image_size(clip_model)
        super().__init__(
            pre_processor=self.configure_pre_processor(image_size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        parts = split_official(read_official(weights)) if weights is not None else None
        clip_in_file = parts is not None and parts.clip is not None
        if clip_in_file and clip_weights is not None:
            logger.info("Using the CLIP weights of %s instead of the CLIP tower in %s", clip_weights, weights)
        clip_from_file = clip_in_file and clip_weights is None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = InCTRLModel(
                clip_model,
                clip_pretrained=None if clip_from_file else clip_pretrained,
                clip_weights=clip_weights,
                feature_layers=feature_layers,
            )
        if parts is not None:
            load_official(self.model, parts, load_clip=clip_from_file)
            logger.info("Loaded InCTRL weights from %s", weights)
        self.k_shot = k_shot
        self.few_shot_source = few_shot_source
        self.category = category
        self.seed = seed
        self.auxiliary_training = auxiliary_training
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.probabilities_as_logits = probabilities_as_logits
        self.init_prompts()
        self._checkpoint_category: str | None = None
        self._pool: _AuxiliaryPool | None = None
        self._train_generator = torch.Generator().manual_seed(seed)
        self._eval_generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_official_checkpoint(
        cls,
        path: str | Path,
        clip_weights: str | Path | None = None,
        **kwargs: Any,
    ) -> InCTRL:
        """Build InCTRL from an official checkpoint (``checkpoints/{2,4,8}/checkpoint.pyth``).

        The official files are full state_dicts; their frozen CLIP tower (laion400m_e32) is used. For a file of
        the trained parts only, CLIP comes from ``clip_weights`` or from open_clip's ``laion400m_e32``.

        Args:
            path: Local file or URL of the checkpoint.
            clip_weights: Local CLIP weights file; when given it is used instead of a CLIP tower in the file.
            **kwargs: Other :class:`InCTRL` arguments (``k_shot``, ``few_shot_source``, components, ...).

        Returns:
            The model with the weights loaded.
        """
        return cls(weights=str(path), clip_weights=None if clip_weights is None else str(clip_weights), **kwargs)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """The official pre-processing: bicubic short-side resize, centre crop, OpenAI CLIP mean and std.

        Args:
            image_size: The CLIP input size (an int or an ``(h, w)`` pair with h == w); 240 by default.

        Returns:
            The pre-processor.
        """
        size = image_size if isinstance(image_size, int) else (image_size or (240, 240))[0]
        transform = Compose(
            [
                Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                CenterCrop(size),
                Normalize(mean=list(CLIP_MEAN), std=list(CLIP_STD)),
            ]
        )
        return PreProcessor(transform=transform)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """AdamW over the adapter and the heads for auxiliary training (the official optimiser); nothing otherwise.

        Returns:
            The optimiser, or ``None``.
        """
        if not self.auxiliary_training:
            return None
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.learning_rate, betas=(0.9, 0.999), weight_decay=self.weight_decay)

    def _resolve_category(self) -> str | None:
        if self.category:
            return self.category
        name = getattr(self._datamodule(), "category", None)
        return name if isinstance(name, str) and name else None

    def setup(self, stage: str | None = None) -> None:
        """Collect the prompt images of this run (few-shot) or the prompt pool (auxiliary training).

        Args:
            stage: Lightning stage.
        """
        del stage
        datamodule = self._datamodule()
        if self.auxiliary_training:
            train_data = getattr(datamodule, "train_data", None)
            if train_data is not None:
                labels = {int(label) for label in train_data.samples.label_index}
                if labels != {0, 1}:
                    msg = (
                        "Auxiliary training needs normal and anomalous images in the datamodule's train split, found "
                        f"labels {sorted(labels)}. anomalib's MVTecAD and Folder keep anomalies in the test split; "
                        "use anomalib_uas.data.AuxiliaryDataModule (MVTec layout) for the auxiliary categories."
                    )
                    raise ValueError(msg)
                self._pool = _AuxiliaryPool(datamodule, self._resolve_category() or DEFAULT_CATEGORY)
            return
        self.collect_prompts()

    def _transform(self, image: torch.Tensor) -> torch.Tensor:
        return self.pre_processor.transform(image) if self.pre_processor is not None else image

    def source_prompts(self) -> torch.Tensor:
        """The prompt images of ``few_shot_source``: images, or an official ``<category>.pt`` prompt file.

        Returns:
            The pre-processed prompt images; ``prompt_paths`` names them.

        Raises:
            FileNotFoundError: A folder of prompt files without the category's.
            ValueError: A prompt file of another format, or fewer images than ``k_shot``.
        """
        source = self.few_shot_source
        if isinstance(source, str | Path):
            path = Path(source)
            if path.is_dir() and any(path.glob("*.pt")):
                category = self._resolve_category() or DEFAULT_CATEGORY
                path = path / f"{category}.pt"
                if not path.is_file():
                    available = sorted(p.stem for p in Path(source).glob("*.pt"))
                    msg = f"{source} has no prompt file {path.name} for category {category!r}; it has {available}."
                    raise FileNotFoundError(msg)
            if path.suffix == ".pt":
                return self._prompt_file(path)
        return super().source_prompts()

    def _prompt_file(self, path: Path) -> torch.Tensor:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = f"Cannot read the prompt file {path}: {type(exc).__name__}: {exc}."
            raise ValueError(msg) from exc
        if isinstance(content, list | tuple) and all(isinstance(t, torch.Tensor) for t in content) and content:
            content = torch.stack(list(content))
        size = list(self.model.image_size)
        if not isinstance(content, torch.Tensor) or content.dim() != 4 or list(content.shape[1:]) != [3, *size]:
            found = list(content.shape) if isinstance(content, torch.Tensor) else type(content).__name__
            msg = (
                f"The prompt file {path} must hold a list of transformed [3, {size[0]}, {size[1]}] image tensors "
                f"(the official <category>.pt format), found {found}."
            )
            raise ValueError(msg)
        if len(content) < self.k_shot:
            msg = f"The prompt file {path} holds {len(content)} images, fewer than k_shot={self.k_shot}."
            raise ValueError(msg)
        indices = seeded_choice(len(content), self.k_shot, self.seed) if len(content) > self.k_shot else None
        indices = indices or list(range(len(content)))
        self.prompt_paths = [f"{path}[{i}]" for i in indices]
        return content[indices].float()

    def _prepare_inference(self) -> None:
        if self.auxiliary_training:
            self._eval_generator = torch.Generator().manual_seed(self.seed)
            return
        self.encode_prompts()
        category = self._resolve_category()
        if category is None and not self.model.text_features.numel():
            logger.info("No category name for the text prompts; using %r", DEFAULT_CATEGORY)
            category = DEFAULT_CATEGORY
        if category is not None and category != self.model.category:
            self.model.set_category(category)

    def on_validation_start(self) -> None:
        """Encode the prompt images and the text prompts before validation."""
        self._prepare_inference()

    def on_test_start(self) -> None:
        """Encode the prompt images and the text prompts before testing."""
        self._prepare_inference()

    def on_predict_start(self) -> None:
        """Encode the prompt images and the text prompts before prediction."""
        self._prepare_inference()

    def _auxiliary_prompts(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        if self._pool is None:
            msg = (
                "Auxiliary training and evaluation draw prompts from the datamodule's training images; give a "
                "datamodule (e.g. AuxiliaryDataModule) whose train split holds normal and anomalous images."
            )
            raise RuntimeError(msg)
        categories = [self._pool.category_of(path) for path in batch.image_path]
        prompts = []
        for category in categories:
            indices = self._pool.draw(category, self.k_shot, generator)
            prompts.append(torch.stack([self._transform(self._pool.dataset[i].image) for i in indices]))
        return torch.stack(prompts).to(self.device), categories

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """One auxiliary training step: focal losses on the final and the image-level residual scores.

        Args:
            batch: A batch of pre-processed auxiliary images with ``gt_label`` and ``image_path``.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            The loss, or ``None`` (step skipped) for a batch of one image, which the heads' batch norm cannot
            train on.
        """
        del args, kwargs
        if len(batch.image) < 2:
            return None
        prompts, categories = self._auxiliary_prompts(batch, self._train_generator)
        output = self.model(batch.image, prompts, categories)
        loss = sum(
            binary_focal_loss(score, batch.gt_label, probabilities_as_logits=self.probabilities_as_logits)
            for score in (output.final_score, output.img_ref_score)
        )
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch.image))
        return loss

    def _predict(self, batch: Batch) -> Batch:
        if self.auxiliary_training:
            prompts, categories = self._auxiliary_prompts(batch, self._eval_generator)
            output = self.model(batch.image, prompts, categories)
        else:
            output = self.model(batch.image)
        return batch.update(**output._asdict())

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
        return self._predict(batch)

    test_step = validation_step
    predict_step = validation_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen CLIP out of Lightning checkpoints and record the category of the text features.

        Args:
            checkpoint: The Lightning checkpoint being written.
        """
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_CLIP_PREFIX)]:
            del state[key]
        checkpoint["inctrl"] = {"category": self.model.category, "prompt_paths": list(self.prompt_paths)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the category of the restored text features.

        Args:
            checkpoint: The Lightning checkpoint.
        """
        super().on_load_checkpoint(checkpoint)
        extra = checkpoint.get("inctrl", {})
        self._checkpoint_category = extra.get("category")
        self.prompt_paths = list(extra.get("prompt_paths", []))

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
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._checkpoint_category is not None:
            self.model.remember_text_features(self._checkpoint_category)
        return result


def _clip_image_size(clip_model: str) -> int:
    config = open_clip.get_model_config(clip_model)
    if config is None:
        msg = f"Unknown open_clip model {clip_model!r}; use 'ViT-B-16-plus-240' (or 'uas-tiny-ViT-B-16-plus-240')."
        raise ValueError(msg)
    size = config["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]
