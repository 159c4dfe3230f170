# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The MLflow model registry of evaluated models, with champion aliases.

:func:`register_model` logs a category's model as a self-contained pyfunc (:mod:`anomalib_uas.serving.pyfunc`), with
the exported ONNX graph it serves, and registers it as a version of ``anomalib-uas-<category>``;
:func:`update_champion` keeps the aliases ``champion`` (best version over all models) and ``champion-<model>`` (each
model's best) on a chosen metric: the best finite metric, and between equal metrics the holding model's newest
version (its newest decision); a version whose metric tag is not a number (edited by hand) is skipped with a warning.

Example:
    >>> from anomalib_uas.registry import registered_name
    >>> registered_name("brick")
    'anomalib-uas-brick'
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from anomalib_uas import __version__
from anomalib_uas.calibration import DECISION_KEYS
from anomalib_uas.weights import sha256sum

logger = logging.getLogger(__name__)

__all__ = [
    "GRAPH_CHECK_TAG",
    "GRAPH_FROM_TAG",
    "GRAPH_KEY_TAG",
    "RUNTIME_TAG",
    "THRESHOLD_VERSION_TAG",
    "ServableModel",
    "graph_key",
    "register_model",
    "registered_name",
    "update_champion",
    "version_of",
]

GRAPH_KEY_TAG = "uas.graph_key"
GRAPH_FROM_TAG = "uas.graph_from"  # the earlier version whose graph a version reuses
RUNTIME_TAG = "uas.runtime"  # what serves the version: "onnx" (its checked graph) or "eager" (the graph failed)
GRAPH_CHECK_TAG = "uas.graph_check"  # the graph's differences from the eager model, or why it failed
THRESHOLD_VERSION_TAG = "uas.threshold_version"  # the calibrated decision the version deploys


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
        config: ``model``, ``category``, ``kwargs`` (model arguments) and the calibrated decision
            (:data:`~anomalib_uas.calibration.DECISION_KEYS`: the raw-score ``image_threshold`` and
            ``pixel_threshold``, their ``threshold_basis`` and ``threshold_version``).
        example_image: An image of the category, stored as the signature's input example.
        check_images: Further images of the category that the exported graph is checked on (normal and defective
            ones, so that both sides of the thresholds are compared).
        prompt_paths: Normal prompt images (MetaUAS, InCTRL).
        clip_weights: CLIP weights file (InCTRL without a CLIP tower in its checkpoint, FAPrompt).
    """

    model: str
    category: str
    checkpoint: Path
    config: dict[str, Any]
    example_image: Path
    check_images: tuple[Path, ...] = ()
    prompt_paths: list[Path] = field(default_factory=list)
    clip_weights: Path | None = None


def graph_key(servable: ServableModel) -> str:
    """What the exported graph depends on, hashed.

    That is the model, its config without thresholds, its files' contents and the package and torch versions that
    export it. Two versions with the same key differ at most in thresholds and metrics (a re-evaluation with
    feedback images, say), so the later one can reuse the earlier one's graph.

    Args:
        servable: The model and its files.

    Returns:
        A sha256 hex digest.
    """
    config = {key: value for key, value in servable.config.items() if key not in DECISION_KEYS}
    files = [servable.checkpoint, *servable.prompt_paths, *([servable.clip_weights] if servable.clip_weights else [])]
    record = {
        "model": servable.model,
        "config": config,
        "files": [sha256sum(path) for path in files],
        "versions": [__version__, torch.__version__],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _earlier_graph(name: str, key: str, folder: Path) -> tuple[str | None, Path | None]:
    """Download the graph of the newest version of ``name`` tagged with ``key``: ``(version, graph folder)``."""
    versions = mlflow.MlflowClient().search_model_versions(f"name='{name}' and tags.`{GRAPH_KEY_TAG}` = '{key}'")
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        try:
            uri = f"models:/{name}/{version.version}/artifacts/graph"
            return version.version, Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder)))
        except MlflowException:
            logger.info("Version %s of %s has no graph to reuse", version.version, name)
    return None, None


def register_model(servable: ServableModel, metrics: dict[str, float], champion_metric: str) -> ModelVersion:
    """Log a category's model as an MLflow pyfunc, register it and update the champion aliases.

    Must run inside an active run (see :func:`~anomalib_uas.tracking.stage_run`). The version is self-contained:
    its checkpoint, CLIP weights and prompt images are copied into the model's artifacts, with the ONNX graph it
    serves, checked against the eager model (:func:`~anomalib_uas.serving.runtime.check_graph`). The graph is
    exported here, or copied from the newest earlier version with the same :func:`graph_key` (tag
    ``uas.graph_key``) when that graph passes the same check; the version then names the one it came from (tag
    ``uas.graph_from``). A graph that fails the check is not stored: the version serves the eager model, which is
    the reference the graph is checked against, slower but exact; tag ``uas.runtime`` says which runtime serves a
    version and ``uas.graph_check`` what the check measured or why it failed, and a warning names model,
    category, output and difference. The version's config records the sha256 of the graph's files, which loading
    checks (:func:`~anomalib_uas.serving.pyfunc.open_graph`).

    Args:
        servable: The model and its files.
        metrics: The category's metrics.
        champion_metric: Metric that chooses the champions (higher is better).

    Returns:
        The new model version.

    Raises:
        ValueError: A prompted model without prompt images, a config without its calibrated decision, or metrics
            without the champion metric.
    """
    if champion_metric not in metrics:
        msg = f"registry.champion_metric {champion_metric!r} is not among the metrics {sorted(metrics)}: fix it"
        raise ValueError(msg)
    from anomalib_uas.models import get_spec
    from anomalib_uas.serving.pyfunc import GRAPH_DIGESTS, SIGNATURE, UASPyfuncModel, export_servable
    from anomalib_uas.serving.runtime import GraphMismatchError, graph_digests

    if get_spec(servable.model).takes_prompts and not servable.prompt_paths:
        msg = f"{servable.model} is registered with the prompt images it was evaluated with; none were given."
        raise ValueError(msg)
    missing = [key for key in DECISION_KEYS if key not in servable.config]
    if missing:
        msg = f"{servable.model} {servable.category} has no calibrated {', '.join(missing)}: run its calibrate stage"
        raise ValueError(msg)
    name = registered_name(servable.category)
    basis = servable.config["threshold_basis"]
    tags = {
        "uas.model": servable.model,
        THRESHOLD_VERSION_TAG: servable.config["threshold_version"],
        "uas.certified_fpr": f"{basis['image']['certified_fpr']:.6f}",
        "uas.threshold_basis": (
            f"{basis['image']['normals']} normals, target {basis['image']['target_fpr']} at confidence "
            f"{basis['image']['confidence']}, {'certified' if basis['image']['certified'] else 'not certified'}"
        ),
    }
    config = dict(servable.config)
    with tempfile.TemporaryDirectory() as folder:
        staging = Path(folder)
        artifacts = {"checkpoint": str(servable.checkpoint)}
        if servable.prompt_paths:
            (staging / "prompts").mkdir()
            for index, path in enumerate(servable.prompt_paths):
                shutil.copy(path, staging / "prompts" / f"{index:03d}{Path(path).suffix}")
            artifacts["prompts"] = str(staging / "prompts")
        if servable.clip_weights is not None:
            artifacts["clip"] = str(servable.clip_weights)
        tags[GRAPH_KEY_TAG] = key = graph_key(servable)
        earlier_version, earlier = _earlier_graph(name, key, staging / "earlier")
        graph = staging / "graph"
        images = [servable.example_image, *servable.check_images]
        try:
            reused, difference = export_servable(servable.config, artifacts, images, graph, earlier)
        except GraphMismatchError as error:
            logger.warning("%s %s: %s; this version serves the eager model", servable.model, servable.category, error)
            tags.update({RUNTIME_TAG: "eager", GRAPH_CHECK_TAG: f"failed: {error}"})
        else:
            artifacts["graph"] = str(graph)
            config[GRAPH_DIGESTS] = graph_digests(graph)
            tags.update({RUNTIME_TAG: "onnx", GRAPH_CHECK_TAG: difference.describe()})
            if reused:
                tags[GRAPH_FROM_TAG] = earlier_version
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        artifacts["config"] = str(staging / "config.json")
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
    tags[champion_metric] = f"{metrics[champion_metric]:.6f}"
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)
    update_champion(name, champion_metric)
    return client.get_model_version(name, version)


def update_champion(name: str, metric: str) -> str | None:
    """Point ``champion`` and each ``champion-<model>`` at the best version, the newest decision of its model.

    An alias goes to a version whose ``metric`` tag is finite and highest. Between versions of equal metric it stays
    with the model that holds it (or, when none does, the model that reached the best first) and goes to that
    model's newest version: the register stage registers a version only when the model's evaluation or its
    calibrated decision changed, so the newest one at an equal metric carries the decision to deploy (a new
    ``calibrate.target_fpr``, feedback normals). Another model's equal metric never takes an alias. A version with a
    non-finite metric never holds an alias. A tag that is not a number (edited in the MLflow UI) counts as no
    metric, with a warning naming the version and the tag: until the tag is fixed the version takes no alias, and
    one it holds goes to any version with a metric.

    Args:
        name: Registered-model name.
        metric: Tag holding the metric value.

    Returns:
        The champion version, or ``None`` when no version has a finite metric.
    """
    client = mlflow.MlflowClient()
    scored = {}
    for version in client.search_model_versions(f"name='{name}'"):
        value = _metric(version, metric)
        if math.isfinite(value):
            scored[version.version] = (value, version.tags.get("uas.model"))
    models = sorted({model for _, model in scored.values() if model})
    champion = None
    for alias, candidates in [
        ("champion", list(scored)),
        *[(f"champion-{model}", [v for v, (_, m) in scored.items() if m == model]) for model in models],
    ]:
        if not candidates:
            continue
        best = max(scored[v][0] for v in candidates)
        leaders = [v for v in candidates if scored[v][0] == best]
        current = version_of(name, alias)
        holder = current if current in leaders else min(leaders, key=int)  # the first version that reached the best
        newest = max((v for v in leaders if scored[v][1] == scored[holder][1]), key=int)
        if newest != current:
            client.set_registered_model_alias(name, alias, newest)
        if alias == "champion":
            champion = newest
    return champion


def _metric(version: ModelVersion, metric: str) -> float:
    """A version's metric tag as a number; NaN when it is missing or, with a warning, not a number."""
    text = version.tags.get(metric, "nan")
    try:
        return float(text)
    except ValueError:
        logger.warning(
            "Version %s of %s has %s tag %r, which is not a number: it cannot become champion until the tag is fixed",
            version.version,
            version.name,
            metric,
            text,
        )
        return math.nan


def version_of(name: str, alias: str) -> str | None:
    """The version an alias points at.

    Args:
        name: Registered-model name.
        alias: Alias, e.g. ``champion``.

    Returns:
        The version, or ``None`` when the model or the alias does not exist.
    """
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None
