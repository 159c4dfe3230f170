# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MLflow tracking for the pipeline and for Engine runs.

The tracking store is ``$MLFLOW_TRACKING_URI`` or, by default, an absolute sqlite database ``mlflow.db`` in the
working directory (MLflow 3.x refuses the ``./mlruns`` file store). Artifacts go to ``mlartifacts/``. Every stage
run is tagged with the git commit (MLflow does it), the DVC hashes of the dataset and the checkpoint it used, the
DVC stage and the DVC experiment name.

Registry: :func:`register_model` logs a category's model as a self-contained pyfunc
(:mod:`anomalib_uas.serving.pyfunc`), with the exported ONNX graph it serves, and registers it as a version of
``anomalib-uas-<category>``; :func:`update_champion` keeps the aliases
``champion`` (best version over all models) and ``champion-<model>`` (each model's best) on a chosen metric.

Example:
    >>> from anomalib_uas.tracking import stage_run
    >>> with stage_run("evaluate", model="metauas", params={"evaluate": {"k_shot": 1}}):  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from anomalib.loggers import AnomalibMLFlowLogger
from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT",
    "ServableModel",
    "configure",
    "dvc_tags",
    "engine_logger",
    "flatten",
    "register_model",
    "registered_name",
    "stage_run",
    "tracking_uri",
    "update_champion",
]

EXPERIMENT = "anomalib-uas"


def tracking_uri() -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` (absolute).

    Returns:
        The URI.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def configure() -> str:
    """Point MLflow at the tracking store and select the experiment, creating it with a pinned artifact folder.

    Returns:
        The experiment id.
    """
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=Path("mlartifacts").resolve().as_uri())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested parameters to dotted keys.

    Args:
        tree: Nested mapping.
        prefix: Prefix of the keys.

    Returns:
        ``{"evaluate.k_shot": 1, ...}``.
    """
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dvc_tags(model: str | None = None, lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """DVC provenance of the current stage: hashes of the dataset and the model's checkpoint, and the experiment.

    Args:
        model: Model whose checkpoint hash is wanted.
        lock: The DVC lock file.

    Returns:
        Tags; hashes are missing before the first ``dvc repro`` wrote the lock file.
    """
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    if not lock.is_file():
        return tags
    stages = yaml.safe_load(lock.read_text()).get("stages", {})
    wanted = {"data/dataset": "dvc.data.md5"}
    if model is not None:
        wanted[f"checkpoints/{model}"] = "dvc.checkpoint.md5"
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") in wanted:
                tags[wanted[out["path"]]] = str(out.get("md5", ""))
    return tags


@contextmanager
def stage_run(stage: str, model: str | None, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for a pipeline stage, with its parameters and provenance tags.

    Args:
        stage: Stage name (``evaluate``, ``train``, ``report``).
        model: Model name, when the stage is per model.
        params: Pipeline parameters; logged flattened.

    Yields:
        The active run.
    """
    configure()
    name = f"{stage}-{model}" if model else stage
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in flatten(params).items()})
        mlflow.set_tags({"uas.stage": stage, **({"uas.model": model} if model else {}), **dvc_tags(model)})
        yield run


def engine_logger(run_name: str, parent_run_id: str | None = None) -> AnomalibMLFlowLogger:
    """Anomalib's MLflow logger on the same store, as a child of a stage run.

    Args:
        run_name: Name of the Engine run.
        parent_run_id: The stage run it belongs to.

    Returns:
        The logger, to pass to ``Engine(logger=...)``.
    """
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    return AnomalibMLFlowLogger(experiment_name=EXPERIMENT, run_name=run_name, tracking_uri=tracking_uri(), tags=tags)


def registered_name(category: str) -> str:
    """Registered-model name of a category; its versions are the evaluated models.

    Args:
        category: Dataset category.

    Returns:
        ``"anomalib-uas-<category>"``.
    """
    return f"anomalib-uas-{category}"


@dataclass(frozen=True)
class ServableModel:
    """What a registered version holds: everything the pyfunc of :mod:`anomalib_uas.serving` needs offline.

    Args:
        model: Model name (``metauas``, ``inctrl``, ``faprompt``).
        category: Dataset category.
        checkpoint: The model checkpoint (official format).
        config: ``model``, ``category``, ``kwargs`` (model arguments) and the raw-score ``image_threshold`` and
            ``pixel_threshold``.
        example_image: An image of the category, stored as the signature's input example.
        prompt_paths: Normal prompt images (MetaUAS, InCTRL).
        clip_weights: CLIP weights file (InCTRL without a CLIP tower in its checkpoint, FAPrompt).
    """

    model: str
    category: str
    checkpoint: Path
    config: dict[str, Any]
    example_image: Path
    prompt_paths: list[Path] = field(default_factory=list)
    clip_weights: Path | None = None


def register_model(servable: ServableModel, metrics: dict[str, float], champion_metric: str) -> ModelVersion:
    """Log a category's model as an MLflow pyfunc, register it and update the champion aliases.

    Must run inside an active run (see :func:`stage_run`). The version is self-contained: its checkpoint, CLIP
    weights and prompt images are copied into the model's artifacts, with the ONNX graph it serves (exported here
    and checked against the eager model).

    Args:
        servable: The model and its files.
        metrics: The category's metrics.
        champion_metric: Metric that chooses the champions (higher is better).

    Returns:
        The new model version.

    Raises:
        ValueError: A prompted model without prompt images.
        RuntimeError: The exported graph does not reproduce the eager model.
    """
    from anomalib_uas.models.loading import PROMPTED_MODELS
    from anomalib_uas.serving.pyfunc import SIGNATURE, UASPyfuncModel, export_servable

    if servable.model in PROMPTED_MODELS and not servable.prompt_paths:
        msg = f"{servable.model} is registered with the prompt images it was evaluated with; none were given."
        raise ValueError(msg)
    name = registered_name(servable.category)
    with tempfile.TemporaryDirectory() as folder:
        staging = Path(folder)
        (staging / "config.json").write_text(json.dumps(servable.config, indent=2))
        artifacts = {"checkpoint": str(servable.checkpoint), "config": str(staging / "config.json")}
        if servable.prompt_paths:
            (staging / "prompts").mkdir()
            for index, path in enumerate(servable.prompt_paths):
                shutil.copy(path, staging / "prompts" / f"{index:03d}{Path(path).suffix}")
            artifacts["prompts"] = str(staging / "prompts")
        if servable.clip_weights is not None:
            artifacts["clip"] = str(servable.clip_weights)
        graph = export_servable(servable.config, artifacts, servable.example_image, staging / "graph")
        artifacts["graph"] = str(graph)
        info = mlflow.pyfunc.log_model(
            name=f"{servable.model}-{servable.category}",
            python_model=UASPyfuncModel(),
            artifacts=artifacts,
            code_paths=[str(Path(__file__).parent)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [servable.example_image.read_bytes()]}),
            pip_requirements=[
                "anomalib>=2.7,<2.8",
                "torch==2.14.1",
                "torchvision==0.29.1",
                "timm",
                "open_clip_torch>=3,<4",
                "onnxruntime>=1.20",
                "pillow",
            ],
            registered_model_name=name,
        )
    client = mlflow.MlflowClient()
    version = info.registered_model_version
    client.set_model_version_tag(name, version, "uas.model", servable.model)
    client.set_model_version_tag(name, version, champion_metric, f"{metrics[champion_metric]:.6f}")
    update_champion(name, champion_metric)
    return client.get_model_version(name, version)


def update_champion(name: str, metric: str) -> str:
    """Point ``champion`` at the version with the highest ``metric`` tag, and ``champion-<model>`` at each model's.

    Args:
        name: Registered-model name.
        metric: Tag holding the metric value.

    Returns:
        The champion version.
    """
    client = mlflow.MlflowClient()
    versions = [v for v in client.search_model_versions(f"name='{name}'") if metric in v.tags]

    def best(candidates: list[ModelVersion]) -> str:
        return max(candidates, key=lambda v: (float(v.tags[metric]), int(v.version))).version

    champion = best(versions)
    client.set_registered_model_alias(name, "champion", champion)
    for model in sorted({v.tags["uas.model"] for v in versions if "uas.model" in v.tags}):
        client.set_registered_model_alias(
            name, f"champion-{model}", best([v for v in versions if v.tags.get("uas.model") == model])
        )
    return champion
