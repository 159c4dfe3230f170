# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The MLflow pyfunc model: registered models that are served over REST and scored with Spark.

A registered version holds, as artifacts, the model checkpoint, the prompt images of the category and a JSON
config (model arguments, image and pixel thresholds on the raw scores). The package itself is a code dependency
(it must be installed where the model is loaded; nothing is downloaded at load time).

Request rows (``dataframe_split`` with base64 strings for binary columns, decoded by MLflow):

* ``image``: the encoded image (PNG, JPEG, ...), or ``image_path``: a path readable by the server (Spark);
* ``prompt_image`` (optional, MetaUAS): a normal image of the same object that replaces the registered prompts.

Parameter ``map_format``: ``"png"`` (default, base64 8-bit PNG), ``"array"`` (nested lists of floats) or ``"none"``.
Response columns: ``pred_score`` (raw), ``pred_label`` (1 = anomalous, at the registered threshold),
``anomaly_map`` and ``pred_mask`` (base64 PNG or arrays). Bad input (undecodable image, image larger than
:data:`MAX_PIXELS`, missing column) raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring server
answers with HTTP 400 while it stays up.

Example:
    >>> import mlflow
    >>> model = mlflow.pyfunc.load_model("models:/anomalib-uas-brick@champion")  # doctest: +SKIP
    >>> model.predict(frame, params={"map_format": "none"})  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from anomalib_uas.data.images import decode_image, list_images, read_image

logger = logging.getLogger(__name__)

__all__ = ["MAX_PIXELS", "SIGNATURE", "UASPyfuncModel", "build_model"]

MAX_PIXELS = 40_000_000
MAP_FORMATS = ("png", "array", "none")

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("binary", "image", required=False),
            ColSpec("string", "image_path", required=False),
            ColSpec("binary", "prompt_image", required=False),
        ]
    ),
    outputs=Schema(
        [
            ColSpec("double", "pred_score"),
            ColSpec("long", "pred_label"),
            ColSpec("string", "anomaly_map"),
            ColSpec("string", "pred_mask"),
        ]
    ),
    params=ParamSchema([ParamSpec("map_format", "string", "png")]),
)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode(data: bytes | str) -> torch.Tensor:
    if isinstance(data, str):  # JSON formats other than dataframe_split leave the base64 text undecoded
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError as exc:
            msg = "The image is neither encoded bytes nor valid base64."
            raise _invalid(msg) from exc
    try:
        return decode_image(bytes(data), max_pixels=MAX_PIXELS)
    except ValueError as exc:
        raise _invalid(str(exc)) from exc


def build_model(config: dict[str, Any], checkpoint: str) -> Any:
    """Build the anomalib model of a registered version.

    Args:
        config: The registered config (``model`` name and ``kwargs``).
        checkpoint: Path of the checkpoint artifact.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: For a model this package cannot serve.
    """
    if config["model"] != "metauas":
        msg = f"Serving {config['model']!r} is not supported by this version of anomalib-uas."
        raise ValueError(msg)
    from anomalib_uas.models import MetaUAS

    return MetaUAS.from_official_checkpoint(checkpoint, **config["kwargs"]).eval()


def _encode_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class UASPyfuncModel(mlflow.pyfunc.PythonModel):
    """Score images with a registered anomalib-uas model."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the model and encode the registered prompt images.

        Args:
            context: Holds the artifact paths ``checkpoint``, ``prompts`` and ``config``.
        """
        torch.set_grad_enabled(False)
        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        self.module = build_model(self.config, context.artifacts["checkpoint"])
        self.transform = self.module.pre_processor.transform
        prompts = [read_image(path) for path in list_images(context.artifacts["prompts"])]
        self.module.model.set_prompt_bank(torch.stack([self.transform(image) for image in prompts]))

    def _image(self, row: pd.Series) -> torch.Tensor:
        if isinstance(row.get("image"), (bytes, bytearray, str)) and len(row["image"]):
            return _decode(row["image"])
        path = row.get("image_path")
        if isinstance(path, str) and path:
            try:
                return read_image(path)
            except (ValueError, FileNotFoundError) as exc:
                raise _invalid(str(exc)) from exc
        msg = "Each row needs an 'image' (base64-encoded PNG/JPEG) or an 'image_path'."
        raise _invalid(msg)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Score every row.

        Args:
            context: Unused at prediction time.
            model_input: Rows with ``image`` or ``image_path`` and an optional ``prompt_image``.
            params: ``map_format``: ``"png"``, ``"array"`` or ``"none"``.

        Returns:
            ``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask`` per row.

        Raises:
            MlflowException: For bad input (HTTP 400 when served).
        """
        del context
        map_format = (params or {}).get("map_format", "png")
        if map_format not in MAP_FORMATS:
            msg = f"map_format must be one of {MAP_FORMATS}, got {map_format!r}."
            raise _invalid(msg)
        if not isinstance(model_input, pd.DataFrame) or model_input.empty:
            msg = "Send at least one row with an 'image' column (dataframe_split)."
            raise _invalid(msg)
        rows = []
        for _, row in model_input.iterrows():
            query = self.transform(self._image(row)).unsqueeze(0)
            prompt = row.get("prompt_image")
            if isinstance(prompt, (bytes, bytearray, str)) and len(prompt):
                output = self.module.model(query, self.transform(_decode(prompt)).unsqueeze(0))
            else:
                output = self.module.model(query)
            rows.append(self._row(output, map_format))
        return pd.DataFrame(rows, columns=["pred_score", "pred_label", "anomaly_map", "pred_mask"])

    def _row(self, output: Any, map_format: str) -> dict[str, Any]:
        score = float(output.pred_score[0])
        anomaly_map = output.anomaly_map[0].numpy()
        mask = anomaly_map > self.config["pixel_threshold"]
        if map_format == "png":
            encoded_map = _encode_png((np.clip(anomaly_map, 0, 1) * 255).round().astype(np.uint8))
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
        }
