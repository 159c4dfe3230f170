# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MLflow tracking for the pipeline and for Engine runs.

The tracking store is ``$MLFLOW_TRACKING_URI`` or, by default, an absolute sqlite database ``mlflow.db`` in the
working directory (MLflow 3.x refuses the ``./mlruns`` file store). Artifacts go to ``mlartifacts/`` beside the
database. Every stage run is tagged with the git commit (MLflow does it), the DVC hashes of the dataset and the
checkpoint it used, the DVC stage and the DVC experiment name.

MLflow records absolute artifact paths in the database. A repository that is copied or moved keeps its own
registry: whoever opens a sqlite store through :func:`tracking_uri` (the stages, ``uas serve``, ``uas predict``)
first points the paths that lead into the folder the store was made in at the folder it is in now
(:func:`relocate`), so that a copy neither logs into nor serves from the original's ``mlartifacts/``.

The registry of evaluated models is :mod:`anomalib_uas.registry`.

Example:
    >>> from anomalib_uas.tracking import stage_run
    >>> with stage_run("evaluate", model="metauas", params={"evaluate": {"k_shot": 1}}):  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from anomalib.loggers import AnomalibMLFlowLogger
from mlflow.utils.file_utils import local_file_uri_to_path

logger = logging.getLogger(__name__)

__all__ = [
    "ARTIFACTS",
    "EXPERIMENT",
    "artifact_root",
    "configure",
    "dvc_tags",
    "engine_logger",
    "flatten",
    "relocate",
    "stage_run",
    "tracking_uri",
    "training_run",
]

EXPERIMENT = "anomalib-uas"
ARTIFACTS = "mlartifacts"
# The columns of MLflow's sqlite schema that hold artifact paths (absolute file URIs, or plain paths for the
# "Default" experiment that MLflow creates).
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def tracking_uri() -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` (absolute).

    A sqlite store that was copied or moved is relocated first (:func:`relocate`).

    Returns:
        The URI.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    database = _database(uri)
    if database is not None:
        relocate(database)
    return uri


def _database(uri: str) -> Path | None:
    """The file of a sqlite tracking URI; ``None`` for other stores."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path:
    """The artifact folder of a store: ``mlartifacts/`` beside a sqlite database, else in the working directory.

    Args:
        uri: The tracking URI.

    Returns:
        The absolute folder.
    """
    database = _database(uri)
    return (database.parent if database is not None else Path.cwd().resolve()) / ARTIFACTS


def relocate(database: Path) -> None:
    """Point a copied or moved store's artifact paths into the folder it is in now.

    The folder a store was made in is the one holding its experiment's ``mlartifacts/``. When that is not the
    database's folder and the database's folder has an ``mlartifacts/`` of its own (it was copied or moved with
    it), every artifact path under the old folder is rewritten to the same place under the new one: experiments,
    runs, logged models and model versions. A store whose artifacts were kept elsewhere on purpose (a database
    outside the repository, with no ``mlartifacts/`` beside it) is left alone, and so is any other store.

    Args:
        database: The sqlite file.
    """
    target = database.parent
    if not database.is_file() or not (target / ARTIFACTS).is_dir():
        return
    with closing(sqlite3.connect(database)) as connection, connection:
        source = _made_in(connection)
        if source is None or source == target:
            return
        for old, new in ((source.as_uri(), target.as_uri()), (str(source), str(target))):
            for table, column in _ARTIFACT_COLUMNS:
                connection.execute(  # table and column are the constants above
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, f"{old}/"),
                )
    logger.info("%s was made in %s: its artifact paths now lead into %s", database, source, target / ARTIFACTS)


def _made_in(connection: sqlite3.Connection) -> Path | None:
    """The folder whose ``mlartifacts/`` holds the experiment's artifacts; ``None`` without such an experiment."""
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "experiments" not in tables:
        return None
    row = connection.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
    if row is None:
        return None
    location = Path(local_file_uri_to_path(row[0]))
    return location.parent if location.name == ARTIFACTS else None


def configure() -> str:
    """Point MLflow at the tracking store and select the experiment, creating it with a pinned artifact folder.

    The artifact folder (:func:`artifact_root`) is created with the experiment, so that a copy of the repository
    always carries one and is relocated when opened.

    Returns:
        The experiment id.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        root = artifact_root(uri)
        root.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=root.as_uri())
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


@contextmanager
def training_run(model: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A tracked, timed training run of a model's weights stage.

    Args:
        model: Model name.
        params: Pipeline parameters; logged flattened.

    Yields:
        A record with ``logger`` (the Engine's MLflow logger) and ``mlflow_run_id``; on exit it gains
        ``train_minutes``, which is also logged as a metric.
    """
    with stage_run("train", model, params) as run:
        record: dict[str, Any] = {"logger": engine_logger(f"train-{model}", run.info.run_id)}
        record["mlflow_run_id"] = run.info.run_id
        start = time.perf_counter()
        yield record
        minutes = (time.perf_counter() - start) / 60.0
        mlflow.log_metric("train_minutes", minutes)
        record["train_minutes"] = round(minutes, 2)
