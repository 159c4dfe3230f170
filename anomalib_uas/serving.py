# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The MLflow pyfunc model: registered models that are served over REST and scored with Spark.

A registered version holds, as artifacts, the model checkpoint, the CLIP weights of InCTRL and FAPrompt, the
normal prompt images of MetaUAS and InCTRL, and a JSON config (model name, category, model arguments, image and
pixel thresholds on the raw scores). The package itself is a code dependency; nothing is downloaded at load time.

Request rows (``dataframe_split``; MLflow decodes the base64 strings of the binary ``image`` column):

* ``image``: the encoded image (PNG, JPEG, ...), or ``image_path``: a path readable by the server (Spark);
* ``prompt_images`` (optional; MetaUAS and InCTRL): a list of 1 to :data:`MAX_PROMPTS` base64 normal images of
  the same object that replace the registered prompts for that row. FAPrompt is zero-shot and refuses them.

Parameter ``map_format``: ``"png"`` (default, base64 8-bit PNG), ``"array"`` (nested lists of floats) or ``"none"``.
Response columns: ``pred_score`` (raw), ``pred_label`` (1 = anomalous, at the registered threshold),
``anomaly_map`` and ``pred_mask`` (base64 PNG or arrays) at the model's input size: the resized image for
MetaUAS and FAPrompt, the centre crop of the short-side-resized image for InCTRL. Bad input (undecodable image,
image larger than :data:`MAX_PIXELS`, missing column, wrong prompt count) raises
``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring server answers with HTTP 400 while it stays up.

Example:
    >>> import mlflow
    >>> model = mlflow.pyfunc.load_model("models:/anomalib-uas-brick@champion")  # doctest: +SKIP
    >>> model.predict(frame, params={"map_format": "none"})  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

from anomalib_uas.data.images import decode_image, list_images, read_image
from anomalib_uas.models import get_spec
from anomalib_uas.models.loading import load_model

logger = logging.getLogger(__name__)

__all__ = ["MAX_PIXELS", "MAX_PROMPTS", "OUTPUT_COLUMNS", "SIGNATURE", "UASPyfuncModel"]

MAX_PIXELS = 40_000_000
MAX_PROMPTS = 8
MAP_FORMATS = ("png", "array", "none")
OUTPUT_COLUMNS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\r\n]+")

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
        ]
    ),
    params=ParamSchema([ParamSpec("map_format", DataType.string, "png")]),
)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode(data: bytes | str, name: str) -> torch.Tensor:
    """Decode an image sent as encoded bytes or as base64 text (which MLflow leaves undecoded inside lists)."""
    raw = data.encode("ascii", errors="replace") if isinstance(data, str) else bytes(data)
    if _BASE64_TEXT.fullmatch(raw[:64]):  # image files start with bytes outside the base64 alphabet
        with contextlib.suppress(binascii.Error, ValueError):  # not base64 after all: let the decoder say why
            raw = base64.b64decode(raw, validate=True)
    try:
        return decode_image(raw, max_pixels=MAX_PIXELS)
    except ValueError as exc:
        msg = f"{name}: {exc}"
        raise _invalid(msg) from exc


def _encode_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _present(value: object) -> bool:
    """Whether a cell holds something (``None``, NaN and empty values count as absent)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return len(value) > 0 if isinstance(value, Sequence | np.ndarray | bytes) else True


class UASPyfuncModel(mlflow.pyfunc.PythonModel):
    """Score images with a registered anomalib-uas model (MetaUAS, InCTRL or FAPrompt)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the model and encode what every request shares: prompt images and text prompts.

        Args:
            context: Holds the artifact paths ``config``, ``checkpoint``, and ``clip`` and ``prompts`` when the
                model has them.
        """
        artifacts = context.artifacts
        self.config = json.loads(Path(artifacts["config"]).read_text())
        # The scoring server predicts concurrent requests in threads; forwards that overlap only fight over the
        # cores (and a slow model then times out), so they take turns while decoding and encoding overlap.
        self.forward_lock = threading.Lock()
        self.name = self.config["model"]
        with torch.no_grad():
            self.module = load_model(
                self.name,
                artifacts["checkpoint"],
                artifacts.get("clip"),
                visualizer=False,
                **self.config["kwargs"],
            )
            self.transform = self.module.pre_processor.transform
            if get_spec(self.name).takes_prompts:
                prompts = torch.stack([self.transform(read_image(p)) for p in list_images(artifacts["prompts"])])
                if self.name == "metauas":
                    self.module.model.set_prompt_bank(prompts)
                else:
                    self.module.model.set_prompts(prompts)
                    self.module.model.set_category(self.config["category"])
            else:  # encode the static text once here, not racing in the server's worker threads
                self.module.model.cached_static_text()

    def _image(self, row: pd.Series) -> torch.Tensor:
        if _present(row.get("image")):
            return _decode(row["image"], "image")
        path = row.get("image_path")
        if isinstance(path, str) and path:
            try:
                return read_image(path)
            except (ValueError, FileNotFoundError) as exc:
                raise _invalid(str(exc)) from exc
        msg = "Each row needs an 'image' (base64-encoded PNG/JPEG) or an 'image_path'."
        raise _invalid(msg)

    def _prompts(self, row: pd.Series) -> torch.Tensor | None:
        """The row's prompt images ``[1, k, 3, H, W]``, or ``None`` for the registered ones."""
        prompts = row.get("prompt_images")
        if not _present(prompts):
            return None
        if not get_spec(self.name).takes_prompts:
            msg = f"This version serves {self.name}, which is zero-shot: drop the prompt_images column."
            raise _invalid(msg)
        if isinstance(prompts, bytes | str) or not 1 <= len(prompts) <= MAX_PROMPTS:
            msg = f"prompt_images must be a list of 1 to {MAX_PROMPTS} base64-encoded normal images."
            raise _invalid(msg)
        images = [self.transform(_decode(image, f"prompt image {i}")) for i, image in enumerate(prompts)]
        return torch.stack(images).unsqueeze(0)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Score every row.

        Args:
            context: Unused at prediction time.
            model_input: Rows with ``image`` or ``image_path`` and optional ``prompt_images``.
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
        with torch.inference_mode():  # grad mode is per thread; the server predicts in worker threads
            for _, row in model_input.iterrows():
                query = self.transform(self._image(row)).unsqueeze(0)
                prompts = self._prompts(row)
                with self.forward_lock:
                    output = self.module.model(query) if prompts is None else self.module.model(query, prompts)
                rows.append(self._row(output, map_format))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def _row(self, output: Any, map_format: str) -> dict[str, Any]:
        score = float(output.pred_score[0])
        anomaly_map = output.anomaly_map[0].float().numpy()
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
