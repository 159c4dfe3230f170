# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The MLflow pyfunc model: registered models that are served over REST and scored in process or with Spark.

A registered version holds, as artifacts, the model checkpoint, the CLIP weights of InCTRL and FAPrompt, the normal
prompt images of MetaUAS and InCTRL, a JSON config (model name, category, model arguments and the calibrated decision:
image and pixel thresholds on the raw scores, their basis and version, see :mod:`anomalib_uas.calibration`) and the
exported ONNX graph of the model with those prompts (:func:`~anomalib_uas.serving.runtime.export_graph`). The package
itself is a code dependency; nothing is downloaded at load time. Queries with the registered prompts run through the
graph, micro-batched across concurrent requests; a row with its own prompt images runs the eager model.

The config records the sha256 of the graph's files (key ``graph_sha256``). Loading refuses a graph that is not the
registered one (overwritten, truncated) or that ONNX Runtime cannot read, with a
:class:`~anomalib_uas.serving.runtime.GraphFileError` (a ``ValueError``, one line in the CLI) that names the file in
the artifact store, the registered version and how to register the model again.

Rows (``dataframe_split``):

* ``image``: the encoded image (PNG, JPEG, BMP, TIFF or WebP; base64 in JSON), or ``image_path``: a file, read
  in process and by Spark anywhere, and over REST only under the image root given to ``uas serve``;
* ``prompt_images`` (optional; models registered with prompts): a list of 1 to :data:`MAX_PROMPTS` normal images
  of the same object that replace the registered prompts for that row. Zero-shot models refuse them.

Parameter ``map_format``: ``"png"`` (default, base64 8-bit PNG), ``"array"`` (nested lists of floats) or ``"none"``.
Response columns: ``pred_score`` (raw), ``pred_label`` (1 = anomalous, at the registered image threshold),
``anomaly_map`` and ``pred_mask`` (base64 PNG or arrays, the mask at the registered pixel threshold) at the model's
input size (the map's PNG is drawn on the version's fixed colour range ``threshold_basis["heatmap_range"]``, as the
review and ``uas predict`` draw it: the scale of raw maps differs between models), and ``threshold_version``, the
calibrated decision that drew the label and the mask. Bad input raises
:class:`~anomalib_uas.serving.limits.BadRequest` in :meth:`UASPyfuncModel.score` (the REST status) and
``MlflowException(INVALID_PARAMETER_VALUE)`` in :meth:`UASPyfuncModel.predict`.

Example:
    >>> import mlflow
    >>> model = mlflow.pyfunc.load_model("models:/anomalib-uas-brick@champion")  # doctest: +SKIP
    >>> model.predict(frame, params={"map_format": "none"})  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import io
import json
import logging
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from mlflow.utils.file_utils import local_file_uri_to_path
from PIL import Image

from anomalib_uas.calibration import heatmap_png
from anomalib_uas.data.images import list_images, read_image
from anomalib_uas.models import get_spec
from anomalib_uas.models.loading import load_model
from anomalib_uas.registry import registered_name
from anomalib_uas.serving.decoding import RequestImages
from anomalib_uas.serving.limits import MAX_PROMPTS, BadRequest, Limits
from anomalib_uas.serving.runtime import (
    EagerRunner,
    GraphDifference,
    GraphFileError,
    GraphRunner,
    MicroBatcher,
    check_graph,
    export_graph,
    verify_graph,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "GRAPH_DIGESTS",
    "MAP_FORMATS",
    "OUTPUT_COLUMNS",
    "SIGNATURE",
    "UNVERSIONED",
    "Cancelled",
    "UASPyfuncModel",
    "export_servable",
    "load_servable",
    "open_graph",
]

COLUMNS = ("image", "image_path", "prompt_images")
GRAPH_DIGESTS = "graph_sha256"  # config key: the sha256 of each graph file, by name, recorded at registration
MAP_FORMATS = ("png", "array", "none")
OUTPUT_COLUMNS = ("pred_score", "pred_label", "anomaly_map", "pred_mask", "threshold_version")
# The threshold version of a version registered before the calibrate stage existed (its config has no decision):
# it serves its own thresholds, and `dvc repro` registers the calibrated decision as a new version.
UNVERSIONED = "unversioned"
# Model arguments that versions registered before the models shared one set of names stored under their old names.
RENAMED = {"prompt_source": "few_shot_source", "pretrained": "clip_pretrained"}

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.binary, "image", required=False),
            ColSpec(DataType.string, "image_path", required=False),
            ColSpec(Array(DataType.binary), "prompt_images", required=False),
        ]
    ),
    outputs=Schema(
        [
            ColSpec(DataType.double, "pred_score"),
            ColSpec(DataType.long, "pred_label"),
            ColSpec(DataType.string, "anomaly_map"),
            ColSpec(DataType.string, "pred_mask"),
            ColSpec(DataType.string, "threshold_version"),
        ]
    ),
    params=ParamSchema([ParamSpec("map_format", DataType.string, "png")]),
)


class Cancelled(RuntimeError):  # noqa: N818 (a state, not a failure)
    """The request was given up (timed out, or its client left) before its work was done."""


def load_servable(config: Mapping[str, Any], artifacts: Mapping[str, str]) -> Any:
    """Build a registered model in eval mode with what every request shares: prompt images and text features.

    Args:
        config: The registered config (``model``, ``category``, ``kwargs``, thresholds).
        artifacts: Local paths of ``checkpoint``, and of ``clip`` and ``prompts`` when the model has them.

    Returns:
        The anomalib module; ``module.model`` is ready for ``model(images)``.
    """
    with torch.no_grad():
        module = load_model(
            config["model"], artifacts["checkpoint"], artifacts.get("clip"), visualizer=False, **config["kwargs"]
        )
        model, transform = module.model, module.pre_processor.transform
        if "prompts" in artifacts:
            prompts = torch.stack([transform(read_image(path)) for path in list_images(artifacts["prompts"])])
            model.set_prompts(prompts)
        prepare = get_spec(config["model"]).prepare_serving
        if prepare is not None:  # once here, not racing in the server's threads
            prepare(model, config["category"])
    return module


def export_servable(
    config: Mapping[str, Any],
    artifacts: Mapping[str, str],
    images: Sequence[Path],
    folder: Path,
    earlier: Path | None = None,
) -> tuple[bool, GraphDifference]:
    """Export and check the graph a registered version serves: the model as :func:`load_servable` builds it.

    Args:
        config: The registered config (its thresholds count the labels and mask pixels the graph changes).
        artifacts: Local paths of the version's other artifacts.
        images: Images of the category to trace and check the graph with (the first two trace it).
        folder: The graph folder to write.
        earlier: The graph of an earlier version registered from the same files and settings. It is copied
            instead of exporting again when it passes the same check.

    Returns:
        Whether ``earlier`` was reused (otherwise the graph was exported), and the graph's differences from the
        eager model.

    Raises:
        GraphMismatchError: The exported graph does not reproduce the eager model (:func:`check_graph`).
    """
    module = load_servable(config, artifacts)
    batch = torch.stack([module.pre_processor.transform(read_image(path)) for path in images])
    thresholds = (config["image_threshold"], config["pixel_threshold"]) if "image_threshold" in config else None
    if earlier is not None:
        try:
            difference = check_graph(module.model, batch, earlier, thresholds)
        except Exception as error:  # any unusable earlier graph (unreadable, other outputs) is exported anew
            logger.info("Exporting anew: the earlier graph %s does not serve this model (%s)", earlier, error)
        else:
            shutil.copytree(earlier, folder)
            return True, difference
    export_graph(module.model, batch, folder)
    return False, check_graph(module.model, batch, folder, thresholds)


def open_graph(folder: Path, config: Mapping[str, Any]) -> GraphRunner:
    """The graph a version serves, once it is the one registered with it and ONNX Runtime reads it.

    Args:
        folder: The local copy of the version's ``graph`` artifact.
        config: The registered config; versions registered before the graph's sha256 was recorded are not checked.

    Returns:
        The graph's runner.

    Raises:
        GraphFileError: The graph is not the registered one or cannot be read; the message names the file in the
            artifact store, the registered version and how to register it again.
    """
    try:
        verify_graph(folder, config.get(GRAPH_DIGESTS, {}))
        return GraphRunner(folder)
    except GraphFileError as error:
        raise _stored_graph_error(error, folder.parent.parent, config) from error


def _stored_graph_error(error: GraphFileError, model_dir: Path, config: Mapping[str, Any]) -> GraphFileError:
    """The same error, naming the file in the artifact store and the version, with what to do about it."""
    model, category = config["model"], config["category"]
    name, model_id = registered_name(category), Model.load(model_dir).model_id
    registered = _registered_version(name, model_id)
    if registered is None:
        path, owner, delete = error.path, f"logged model {model_id}", ""
    else:
        version, storage = registered
        path = Path(local_file_uri_to_path(storage)) / error.path.relative_to(model_dir)
        owner, delete = f"{name} version {version}", f"delete version {version} of {name}, then "
    fix = f"{delete}register it again: rm -r predictions/{model}/{category} && dvc repro evaluate@{model}"
    return GraphFileError(path, f"{error.problem}: the graph of {owner} cannot be served; {fix}")


def _registered_version(name: str, model_id: str | None) -> tuple[str, str] | None:
    """The version of ``name`` that registers the logged model ``model_id`` and where its files are stored."""
    uri = mlflow.get_tracking_uri()
    if model_id is None or (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()):
        return None  # no store to ask (asking would create one)
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.source == f"models:/{model_id}":
            return version.version, client.get_model_version_download_uri(name, version.version)
    return None


def _present(value: object) -> bool:
    """Whether a cell holds something (``None`` and NaN count as absent, empty values too)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return len(value) > 0 if isinstance(value, Sequence | np.ndarray | bytes) else True


def _encode_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class UASPyfuncModel(mlflow.pyfunc.PythonModel):
    """Score images with a registered anomalib-uas model (MetaUAS, InCTRL or FAPrompt)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the model, its pre-processing and the forward worker (on the exported graph when registered).

        Args:
            context: Holds the artifact paths ``config``, ``checkpoint``, and ``clip``, ``prompts`` and ``graph``
                when the version has them.

        Raises:
            GraphFileError: The graph is not the one registered, or cannot be read (:func:`open_graph`).
        """
        artifacts = context.artifacts
        self.config = json.loads(Path(artifacts["config"]).read_text())
        if "threshold_version" not in self.config:  # registered before calibration: its thresholds, unversioned
            self.config |= {"threshold_version": UNVERSIONED, "threshold_basis": {"heatmap_range": [0.0, 1.0]}}
        self.config["kwargs"] = {RENAMED.get(key, key): value for key, value in self.config["kwargs"].items()}
        graph = open_graph(Path(artifacts["graph"]), self.config) if "graph" in artifacts else None
        self.module = load_servable(self.config, artifacts)
        self.transform = self.module.pre_processor.transform
        self.prompted = "prompts" in artifacts
        self.min_side = min(self.transform(torch.zeros(3, 64, 64)).shape[-2:])
        self.eager = EagerRunner(self.module.model)
        self.runtime = "eager" if graph is None else "onnx"
        self.batcher = MicroBatcher(self.eager if graph is None else graph)
        logger.info("Serving %s (%s) on %s", self.config["model"], self.config["category"], self.runtime)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Score every row (in process and Spark: ``image_path`` is read wherever it points).

        Args:
            context: Unused at prediction time.
            model_input: Rows with ``image`` or ``image_path`` and optional ``prompt_images``.
            params: ``map_format``: ``"png"``, ``"array"`` or ``"none"``.

        Returns:
            ``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask``, ``threshold_version`` per row.

        Raises:
            MlflowException: For bad input.
        """
        del context
        if not isinstance(model_input, pd.DataFrame):
            msg = "Send a DataFrame with an 'image' or 'image_path' column."
            raise MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)
        images = RequestImages(Limits(max_rows=None), self.min_side, image_root=None, trusted=True)
        try:
            rows = self.score(model_input.to_dict("records"), (params or {}).get("map_format", "png"), images)
        except BadRequest as exc:
            raise MlflowException(exc.message, error_code=INVALID_PARAMETER_VALUE) from exc
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def score(
        self,
        rows: Sequence[Mapping[str, Any]],
        map_format: str,
        images: RequestImages,
        cancel: threading.Event | None = None,
    ) -> list[dict[str, Any]]:
        """Score rows: decode and pre-process each in this thread, the forwards in the micro-batching worker.

        Args:
            rows: Mappings with ``image`` or ``image_path`` and optional ``prompt_images``.
            map_format: ``"png"``, ``"array"`` or ``"none"``.
            images: Decodes the request's images within its bounds and path policy.
            cancel: Set by the caller to give the request up; its queued forwards are dropped.

        Returns:
            One output row per input row.

        Raises:
            BadRequest: For bad input or a bound crossed.
            Cancelled: ``cancel`` was set.
        """
        if map_format not in MAP_FORMATS:
            msg = f"map_format must be one of {MAP_FORMATS}, got {map_format!r}."
            raise BadRequest(msg)
        if not rows:
            msg = "Send at least one row with an 'image' column (dataframe_split)."
            raise BadRequest(msg)
        if images.limits.max_rows is not None and len(rows) > images.limits.max_rows:
            msg = (
                f"The request has {len(rows)} rows; at most {images.limits.max_rows} are accepted per request "
                "(uas serve --max-rows). Split it into smaller requests."
            )
            raise BadRequest(msg, status=413, code="REQUEST_TOO_LARGE")
        cancel = cancel or threading.Event()
        futures: list[concurrent.futures.Future] = []
        try:
            for row in rows:
                self._check(cancel)
                images.start_row()
                query = self.transform(self._image(row, images))
                prompts = self._prompts(row, images)
                if prompts is None:
                    futures.append(self.batcher.submit(query, cancel))
                else:
                    call = functools.partial(self.eager, query.unsqueeze(0), prompts)
                    futures.append(self.batcher.submit_call(call, cancel))
                pending = [future for future in futures if not future.done()]
                if len(pending) >= self.batcher.max_batch:  # bounded memory for long (Spark) inputs
                    concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            return [self._output(*self._result(future), map_format) for future in futures]
        except Cancelled:
            logger.warning(
                "Stopped the work of a request that timed out or whose client left, after %d of its %d rows",
                len(futures),
                len(rows),
            )
            raise
        except BaseException:
            cancel.set()
            raise

    @staticmethod
    def _check(cancel: threading.Event) -> None:
        if cancel.is_set():
            raise Cancelled

    @staticmethod
    def _result(future: concurrent.futures.Future) -> tuple[float, np.ndarray]:
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise Cancelled from exc

    def _image(self, row: Mapping[str, Any], images: RequestImages) -> torch.Tensor:
        if _present(row.get("image")):
            return images.decode(row["image"], "image")
        path = row.get("image_path")
        if isinstance(path, str) and path:
            return images.read(path)
        msg = "Each row needs an 'image' (base64-encoded PNG, JPEG, BMP, TIFF or WebP)."
        raise BadRequest(msg)

    def _prompts(self, row: Mapping[str, Any], images: RequestImages) -> torch.Tensor | None:
        """The row's prompt images ``[1, k, 3, H, W]``, or ``None`` for the registered ones."""
        prompts = row.get("prompt_images")
        if prompts is None or (isinstance(prompts, float) and np.isnan(prompts)):
            return None
        if not self.prompted:
            msg = f"This version serves {self.config['model']}, which is zero-shot: drop the prompt_images column."
            raise BadRequest(msg)
        if isinstance(prompts, bytes | str) or not 1 <= len(prompts) <= MAX_PROMPTS:
            msg = f"prompt_images must be a list of 1 to {MAX_PROMPTS} base64-encoded normal images."
            raise BadRequest(msg)
        decoded = [self.transform(images.decode(image, f"prompt image {i}")) for i, image in enumerate(prompts)]
        return torch.stack(decoded).unsqueeze(0)

    def _output(self, score: float, anomaly_map: np.ndarray, map_format: str) -> dict[str, Any]:
        mask = anomaly_map > self.config["pixel_threshold"]
        if map_format == "png":
            encoded_map = _encode_png(heatmap_png(anomaly_map, self.config["threshold_basis"]["heatmap_range"]))
            encoded_mask = _encode_png(mask.astype(np.uint8) * 255)
        elif map_format == "array":
            encoded_map, encoded_mask = json.dumps(anomaly_map.round(5).tolist()), json.dumps(mask.astype(int).tolist())
        else:
            encoded_map = encoded_mask = ""
        return {
            "pred_score": score,
            "pred_label": int(score > self.config["image_threshold"]),
            "anomaly_map": encoded_map,
            "pred_mask": encoded_mask,
            "threshold_version": self.config["threshold_version"],
        }
