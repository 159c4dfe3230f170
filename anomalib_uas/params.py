# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The schema of ``params.yaml``: read once, every value checked before any stage touches a file.

:func:`load_params` parses the file into :class:`Params`. Anything wrong (malformed YAML, a missing section, an
unknown key, a value of the wrong type or outside its allowed set) raises :class:`ParamsError` with one line that
names the key, the bad value and what is allowed; the stages turn it into exit code 2.

Example:
    >>> from anomalib_uas.params import load_params
    >>> params = load_params("params.yaml")  # doctest: +SKIP
    >>> params.evaluate.k_shot  # doctest: +SKIP
    1
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "MAX_IMAGE_SIZE",
    "METRICS",
    "MODEL_NAMES",
    "CalibrateParams",
    "DataParams",
    "EvaluateParams",
    "Params",
    "ParamsError",
    "load_params",
]

MODEL_NAMES = ("metauas", "inctrl", "faprompt", "nearest_patch")
ModelName = Literal[MODEL_NAMES]
# Threshold-free metrics every evaluation reports; any of them can choose the registry's champions.
METRICS = (
    "image_AUROC",
    "image_AUPR",
    "image_F1Max",
    "pixel_AUROC",
    "pixel_AUPR",
    "pixel_F1Max",
    "pixel_AUPRO",
)
MetricName = Literal[METRICS]
PositiveInt = Annotated[int, Field(ge=1)]
# Largest image side of any stage: a 1024 px batch of 8 already needs several GB in the MetaUAS decoder, and 4096 px
# sixteen times that; the official models run at 240-518 px.
MAX_IMAGE_SIZE = 1024
Category = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ParamsError(ValueError):
    """``params.yaml`` cannot be used; the message is one line naming the key, the value and the fix."""


class _Section(BaseModel):
    """A section of ``params.yaml``: unknown keys are errors (they are typos), values keep their YAML types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class FolderData(_Section):
    """``data.folder``: the user's own images, arranged as one category."""

    normal_dir: str
    abnormal_dir: str
    mask_dir: str = ""
    normal_test_dir: str = ""


class DataParams(_Section):
    """``data``: which dataset the pipeline evaluates on."""

    dataset: Literal["demo", "mvtec", "visa", "folder"]
    categories: Annotated[list[Category], Field(min_length=1)]
    image_size: Annotated[int, Field(ge=32, le=MAX_IMAGE_SIZE)] = 256
    seed: int = 0
    train_normals: Annotated[int, Field(ge=1, le=1000)] = 64
    test_normals: Annotated[int, Field(ge=1, le=1000)] = 16
    source: str = "datasets/MVTecAD"
    folder: FolderData | None = None

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            msg = "categories must not repeat"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _folder_given(self) -> DataParams:
        if self.dataset == "folder" and self.folder is None:
            msg = "dataset 'folder' needs the data.folder section (normal_dir, abnormal_dir, mask_dir)"
            raise ValueError(msg)
        return self


class ClipConfig(_Section):
    """``models_config.<clip model>``: the CLIP backbone and where its weights come from."""

    clip_model: str | None = None  # None: the model's official backbone
    clip_weights: str | None = None  # None: the release file under weights/<model>/ or the weights cache
    image_size: Annotated[int, Field(ge=14, le=MAX_IMAGE_SIZE, multiple_of=14)] | None = None


class NearestPatchConfig(_Section):
    """``models_config.nearest_patch``: the encoder and the patch features the nearest-patch model compares."""

    backbone: str = "efficientnet_lite0"
    levels: Annotated[list[Annotated[int, Field(ge=0, le=4)]], Field(min_length=1, max_length=5)] = [2, 3]
    pool: Annotated[int, Field(ge=1, le=15)] = 3

    @field_validator("pool")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            msg = "pool is the side of a centred averaging window: use an odd number (1, 3, 5)"
            raise ValueError(msg)
        return value


class ModelsConfig(_Section):
    """``models_config``: per-model architecture choices read by the weights stage."""

    metauas: dict[str, Any] = Field(default_factory=dict)
    inctrl: ClipConfig = ClipConfig()
    faprompt: ClipConfig = ClipConfig()
    nearest_patch: NearestPatchConfig = NearestPatchConfig()

    @field_validator("metauas")
    @classmethod
    def _metauas_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            msg = "MetaUAS takes its architecture from weights.metauas and train.metauas; leave it {}"
            raise ValueError(msg)
        return value


Fraction = Annotated[float, Field(ge=0, le=1)]
Range = Annotated[list[float], Field(min_length=2, max_length=2)]


class PairSynthesis(_Section):
    """``train.metauas.synthesis``: settings of the change-pair synthesis; unset keys keep the synthesis defaults."""

    p_local: Fraction | None = None
    p_object: Fraction | None = None
    p_none: Fraction | None = None
    p_pattern: Fraction | None = None
    p_disappear_restore: Fraction | None = None
    p_realization: Fraction | None = None
    max_rotation: Annotated[float, Field(ge=0)] | None = None
    max_translate: Fraction | None = None
    color_jitter: Fraction | None = None
    min_change: Annotated[int, Field(ge=0)] | None = None
    perlin_threshold: float | None = None
    perlin_scale_exponents: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    scale_range: Range | None = None
    crop_scale: Range | None = None
    local_area: Range | None = None
    blend_beta: Range | None = None
    object_size: Range | None = None


class MetaUASTraining(_Section):
    """``train.metauas``: the offline meta-training recipe (``weights.metauas: train``)."""

    backbone: str = "efficientnet_lite0"
    fusion: Literal["cat", "add", "absdiff"] = "absdiff"
    decoder_channels: Annotated[list[PositiveInt], Field(min_length=5, max_length=5)] = [128, 64, 32, 16, 16]
    image_size: Annotated[int, Field(ge=32, le=MAX_IMAGE_SIZE, multiple_of=32)] = 128
    max_steps: PositiveInt = 1500
    batch_size: PositiveInt = 8
    num_pairs: PositiveInt = 12000
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = 0.995
    sources: list[str] | None = None
    synthesis: PairSynthesis = PairSynthesis()
    seed: int = 0


class AuxiliaryTraining(_Section):
    """``train.inctrl`` / ``train.faprompt``: auxiliary training on MVTec-layout categories (``weights.<m>: train``)."""

    root: str = "datasets/auxiliary"
    categories: Annotated[list[Category], Field(min_length=1)]
    max_steps: PositiveInt = 1000
    batch_size: PositiveInt = 8
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    limit_val_batches: PositiveInt = 1
    seed: int = 0


class InCTRLTraining(AuxiliaryTraining):
    """``train.inctrl``: auxiliary training with k normal prompts per query."""

    k_shot: Annotated[int, Field(ge=1, le=8)] = 2


class TrainParams(_Section):
    """``train``: one recipe per model (the nearest-patch model trains nothing)."""

    metauas: MetaUASTraining = MetaUASTraining()
    inctrl: InCTRLTraining
    faprompt: AuxiliaryTraining
    nearest_patch: dict[str, Any] = Field(default_factory=dict)

    @field_validator("nearest_patch")
    @classmethod
    def _nothing_to_train(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            msg = "the nearest-patch model trains nothing; leave it {} (its encoder is models_config.nearest_patch)"
            raise ValueError(msg)
        return value


class EvaluateParams(_Section):
    """``evaluate``: how every model is tested on every category."""

    image_size: Annotated[int, Field(ge=32, le=MAX_IMAGE_SIZE, multiple_of=32)] = 256
    k_shot: Annotated[int, Field(ge=1, le=8)] = 1
    prompt_strategy: Literal["random", "retrieval", "pool"] = "random"
    few_shot_source: str | None = None
    seed: int = 0
    batch_size: PositiveInt = 8

    @model_validator(mode="before")
    @classmethod
    def _moved_or_renamed(cls, data: Any) -> Any:
        fixes = {
            "target_fpr": "target_fpr moved to its own section: write `calibrate: {target_fpr: ..., confidence: 0.95}`",
            "prompt_source": "prompt_source was renamed: write evaluate.few_shot_source",
        }
        for key, fix in fixes.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(fix)
        return data

    @model_validator(mode="after")
    def _pool_has_source(self) -> EvaluateParams:
        if self.prompt_strategy == "pool" and not self.few_shot_source:
            msg = "prompt_strategy 'pool' searches a folder of normal images: set evaluate.few_shot_source to it"
            raise ValueError(msg)
        return self


class CalibrateParams(_Section):
    """``calibrate``: the false-alarm guarantee the deployed thresholds are set for (normal images only).

    With probability at least ``confidence`` the image threshold's false-alarm rate on new normal parts is at most
    ``target_fpr`` (:mod:`anomalib_uas.calibration`).
    """

    target_fpr: Annotated[float, Field(gt=0, lt=1)] = 0.05
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95


class RegistryParams(_Section):
    """``registry``: MLflow registration and the metric that picks the champions."""

    register_models: bool = Field(True, alias="register")
    champion_metric: MetricName = "pixel_AUPRO"


class Params(_Section):
    """All of ``params.yaml``."""

    data: DataParams
    models: Annotated[list[ModelName], Field(min_length=1)]
    weights: dict[ModelName, str]
    models_config: ModelsConfig = ModelsConfig()
    train: TrainParams
    evaluate: EvaluateParams
    calibrate: CalibrateParams = CalibrateParams()
    registry: RegistryParams = RegistryParams()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            msg = "models must not repeat"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _weights_for_every_model(self) -> Params:
        missing = [name for name in self.models if name not in self.weights]
        if missing:
            msg = f"weights has no entry for {', '.join(missing)}: add weights.{missing[0]} (see params.yaml comments)"
            raise ValueError(msg)
        return self

    def as_dict(self) -> dict[str, Any]:
        """The parameters as plain data, e.g. to log them.

        Returns:
            Nested dictionaries and lists.
        """
        return self.model_dump(mode="json", by_alias=True)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check the pipeline parameters.

    Args:
        path: The params file.

    Returns:
        The checked parameters.

    Raises:
        ParamsError: The file is missing, is not YAML, or a value is not allowed (one line naming key and fix).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"parameters file {path} does not exist: run from the repository root or pass --params"
        raise ParamsError(msg)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        msg = f"{path} is not valid YAML{where}: {problem}; fix the file (a copy is in git: `git diff {path}`)"
        raise ParamsError(msg) from None
    if raw is None:
        msg = f"{path} is empty: restore it (`git checkout {path}`) or write the sections data, models, weights, ..."
        raise ParamsError(msg)
    if not isinstance(raw, dict):
        msg = f"{path} must be a mapping of sections (data, models, weights, ...), got a {type(raw).__name__}"
        raise ParamsError(msg)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_one_line(path, exc)) from None


def _one_line(path: Path, error: ValidationError) -> str:
    """The first problem of a validation error, as one line with the key, the value and what is allowed."""
    first = error.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"])
    kind, message = first["type"], first["msg"]
    if kind == "missing":
        return f"{path}: {key} is missing: add it (see the comments in params.yaml and the README)"
    if kind == "extra_forbidden":
        return f"{path}: unknown key {key}: remove it or fix its spelling ({_allowed_keys(first['loc'])})"
    value = first.get("input")
    message = re.sub(r"^Value error, ", "", message)
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if key:
        return f"{path}: {key} = {shown} is not allowed: {message}"
    return f"{path}: {message}"


def _allowed_keys(location: tuple[Any, ...]) -> str:
    """The keys allowed beside an unknown one."""
    section: Any = Params
    for part in location[:-1]:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        if field is None:
            return "see params.yaml"
        annotation = field.annotation
        candidates = [arg for arg in getattr(annotation, "__args__", (annotation,)) if isinstance(arg, type)]
        section = next((arg for arg in candidates if issubclass(arg, BaseModel)), None)
        if section is None:
            return "see params.yaml"
    return "allowed: " + ", ".join(section.model_fields)
