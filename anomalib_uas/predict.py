# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Inspect a folder of images with a registered model: scores, masks, heatmaps and a contact sheet.

:func:`predict_folder` (``uas predict FOLDER --category C``) scores every image of a folder (recursively; hidden
files and the output folders of earlier runs are skipped) with the category's registered ``champion``
(``champion-<model>`` with ``model``), or with another logged model given as a URI or an MLflow model folder. The
model is loaded by MLflow exactly as ``uas serve`` loads it (the :class:`~anomalib_uas.serving.UASPyfuncModel`),
with its registered image threshold and prompt images. It writes into the output folder (by default
``predict/<category>/<folder name>``, never inside the scanned folder; it holds a ``.uas-predict`` marker, so a
later run over a folder that contains it never scores its masks and heatmaps):

* ``predictions.csv``: ``path``, ``score`` (raw), ``label`` (``anomaly`` / ``normal``), ``threshold`` (the raw-score
  threshold used) and ``threshold_version`` (the registered calibration it belongs to), ``mask`` and ``heatmap``
  (PNG paths, relative to the output folder) and ``error`` (why an image could not be scored; it is skipped, the
  run goes on);
* ``masks/`` and ``heatmaps/``: the predicted mask (0 / 255) and the anomaly map per image, at the model's input
  view, mirroring the folder's layout; the heatmaps share the registered decision's fixed colour range (its pixel
  threshold at 128), as in the review datasets;
* ``flagged.html``: an offline contact sheet (images embedded) of the images labelled ``anomaly``, highest score
  first, each with its heatmap overlay.

With ``review=True`` the results are added to the FiftyOne dataset ``uas-predict-<category>`` (updated in place,
keyed by image, model and category; saved view ``flagged``), where reviewers mark them like the evaluation review
datasets (see :mod:`anomalib_uas.feedback`).

Example:
    >>> from anomalib_uas.predict import predict_folder
    >>> predict_folder("incoming/", "brick", output="inspections/brick")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from PIL import Image
from tqdm import tqdm

from anomalib_uas import registry, tracking
from anomalib_uas.calibration import heatmap_png
from anomalib_uas.data.images import list_images
from anomalib_uas.serving.decoding import RequestImages
from anomalib_uas.serving.limits import DEFAULT_MAX_MEGAPIXELS, BadRequest, Limits
from anomalib_uas.serving.pyfunc import UASPyfuncModel

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "OUTPUT_MARKER", "Inspection", "default_output", "load_scorer", "predict_folder"]

COLUMNS = ("path", "score", "label", "threshold", "threshold_version", "mask", "heatmap", "error")
THUMBNAIL = 192
OUTPUT_MARKER = ".uas-predict"  # in every output folder: its images are never scored again
_MODEL_URI = re.compile(r"^(models|runs):/")
_HOT = np.array([[0, 0, 0], [180, 0, 0], [255, 140, 0], [255, 255, 80], [255, 255, 255]], dtype=np.float32)


@dataclass(frozen=True)
class Inspection:
    """What :func:`predict_folder` wrote.

    Args:
        csv: The predictions table.
        html: The contact sheet of flagged images.
        model_uri: The exact model version used.
        images: Images found.
        flagged: Images labelled ``anomaly``.
        errors: Images that could not be scored.
    """

    csv: Path
    html: Path
    model_uri: str
    images: int
    flagged: int
    errors: int


def _resolve(category: str, model: str | None, checkpoint: str | None) -> str:
    """The URI of the model version to load; an alias is resolved to its version, so the output names it."""
    uri = tracking.tracking_uri()
    if checkpoint is not None:
        if not _MODEL_URI.match(checkpoint) and not (Path(checkpoint) / "MLmodel").is_file():
            msg = f"--checkpoint {checkpoint} is neither a model URI nor an MLflow model folder (with MLmodel)."
            raise ValueError(msg)
        mlflow.set_tracking_uri(uri)
        return checkpoint
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        msg = f"No MLflow store at {uri}; run `dvc repro` (registers the models) or set MLFLOW_TRACKING_URI."
        raise ValueError(msg)
    mlflow.set_tracking_uri(uri)
    name, alias = registry.registered_name(category), "champion" if model is None else f"champion-{model}"
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        msg = f"No registered model {name}@{alias} in {uri}; check the category and model, or evaluate it first."
        raise ValueError(msg) from exc
    return f"models:/{name}/{version.version}"


def load_scorer(category: str, model: str | None = None, checkpoint: str | None = None) -> tuple[Any, str]:
    """Load a category's registered champion (or another logged model) as MLflow's pyfunc.

    Args:
        category: Category.
        model: Use this model's best version (alias ``champion-<model>``) instead of the overall champion.
        checkpoint: A logged model instead: a ``models:/`` or ``runs:/`` URI, or a local MLflow model folder.

    Returns:
        The pyfunc model and the URI of the version loaded.

    Raises:
        ValueError: No such registered model or alias, or a model of another category.
    """
    uri = _resolve(category, model, checkpoint)
    try:
        scorer = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        msg = f"Cannot load the model {uri}: {str(exc).splitlines()[0]}"
        raise ValueError(msg) from exc
    config = scorer.unwrap_python_model().config
    if config["category"] != category:
        msg = f"{uri} is the {config['model']} model of category {config['category']!r}, not {category!r}."
        raise ValueError(msg)
    return scorer, uri


def default_output(folder: Path, category: str) -> Path:
    """The output folder when none is given: ``predict/<category>/<folder name>``, never inside the folder.

    Under the working directory, or under the folder's parent when the working directory is inside the folder
    (``uas predict .``).

    Args:
        folder: The scanned folder (or image).
        category: The category.

    Returns:
        The output folder.
    """
    source = folder.resolve()
    output = Path("predict") / category / source.name
    if output.resolve().is_relative_to(source):
        output = source.parent / "predict" / category / source.name
    return output


def _inputs(folder: Path) -> list[Path]:
    """The images to score: every image of the folder except those in a folder that ``uas predict`` wrote."""
    images = list_images(folder)
    written = {marker.parent for marker in folder.rglob(OUTPUT_MARKER)} if folder.is_dir() else set()
    kept = [path for path in images if not written.intersection(path.parents)]
    if not kept:
        msg = f"{folder} holds no image besides the outputs of earlier `uas predict` runs."
        raise ValueError(msg)
    return kept


def _output_names(paths: list[Path], folder: Path) -> list[Path]:
    """PNG names mirroring the folder layout; images that share a stem keep their extension in the name."""
    relative = [path.relative_to(folder) if folder.is_dir() else Path(path.name) for path in paths]
    plain = [path.with_suffix(".png") for path in relative]
    return [
        path.with_name(f"{path.stem}_{path.suffix[1:].lower()}.png") if plain.count(name) > 1 else name
        for path, name in zip(relative, plain, strict=True)
    ]


def _thumbnail(path: Path, heatmap: Path | None) -> str:
    """A base64 JPEG of the image at the model's square view, with the heatmap blended over it."""
    with Image.open(path) as image:
        view = np.asarray(image.convert("RGB").resize((THUMBNAIL, THUMBNAIL)), dtype=np.float32)
    if heatmap is not None:
        with Image.open(heatmap) as anomaly_map:
            values = np.asarray(anomaly_map.convert("L").resize((THUMBNAIL, THUMBNAIL)), dtype=np.float32) / 255
        anchors = np.linspace(0, 1, len(_HOT))
        colours = np.stack([np.interp(values, anchors, _HOT[:, c]) for c in range(3)], axis=-1)
        view = 0.55 * view + 0.45 * colours
    buffer = io.BytesIO()
    Image.fromarray(view.round().astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _contact_sheet(rows: list[dict[str, Any]], output: Path, title: str) -> str:
    flagged = sorted((row for row in rows if row["label"] == "anomaly"), key=lambda row: -row["score"])
    tiles = []
    for row in flagged:
        image = _thumbnail(Path(row["path"]), output / row["heatmap"])
        tiles.append(
            f'<figure><img src="data:image/jpeg;base64,{image}" alt="{html.escape(row["path"])}">'
            f"<figcaption><b>{row['score']:.4f}</b> {html.escape(row['path'])}</figcaption></figure>"
        )
    body = "\n".join(tiles) or "<p>No image is above the threshold.</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em}main{display:flex;flex-wrap:wrap;gap:12px}"
        f"figure{{margin:0;width:{THUMBNAIL}px}}figcaption{{font-size:12px;word-break:break-all}}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(flagged)} of {len(rows)} images flagged, highest score first.</p>"
        f"<main>\n{body}\n</main></body></html>\n"
    )


def _score(
    scorer: UASPyfuncModel, images: RequestImages, path: Path, names: tuple[Path, Path], output: Path
) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(path=str(path), threshold=scorer.config["image_threshold"])
    row["threshold_version"] = scorer.config["threshold_version"]
    try:
        (result,) = scorer.score([{"image_path": str(path)}], "array", images)
    except BadRequest as exc:
        row["error"] = exc.message.splitlines()[0]
        logger.warning("Skipping %s: %s", path, row["error"])
        return row
    mask = np.asarray(json.loads(result["pred_mask"]), dtype=np.uint8) * 255
    heat = heatmap_png(np.asarray(json.loads(result["anomaly_map"])), scorer.config["threshold_basis"]["heatmap_range"])
    for array, name in zip((mask, heat), names, strict=True):
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(output / name)
    score = float(result["pred_score"])
    label = "anomaly" if int(result["pred_label"]) == 1 else "normal"
    row.update(score=score, label=label, mask=names[0].as_posix(), heatmap=names[1].as_posix())
    return row


def _add_to_review(rows: list[dict[str, Any]], output: Path, category: str, model: str, uri: str) -> str:
    from anomalib_uas.review import F, classification, fo, predict_dataset_name, show_heatmap, upsert_samples

    name = predict_dataset_name(category)
    dataset = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    records = [
        {
            "filepath": str(Path(row["path"]).resolve()),
            "model": model,
            "category": category,
            "model_uri": uri,
            "prediction": classification(row["score"], row["threshold"]),
            "anomaly_score": row["score"],
            "pred_mask": fo.Segmentation(mask_path=str((output / row["mask"]).resolve())),
            "anomaly_map": fo.Heatmap(map_path=str((output / row["heatmap"]).resolve()), range=[0, 255]),
        }
        for row in rows
        if not row["error"]
    ]
    upsert_samples(dataset, records)
    dataset.info = {**dataset.info, "category": category, "kind": "predict"}
    dataset.mask_targets = {"pred_mask": {255: "anomaly"}}
    show_heatmap(dataset)
    dataset.save()
    flagged = dataset.match(F("prediction.label") == "anomaly").sort_by("anomaly_score", reverse=True)
    dataset.save_view("flagged", flagged, overwrite=True)
    return name


def predict_folder(
    folder: str | Path,
    category: str,
    model: str | None = None,
    checkpoint: str | None = None,
    output: str | Path | None = None,
    review: bool = False,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> Inspection:
    """Score every image of a folder and write the table, the maps and the contact sheet.

    Args:
        folder: Folder of images (searched recursively), or one image.
        category: Category whose registered model scores them.
        model: Use this model's best version (``champion-<model>``) instead of the champion.
        checkpoint: Another logged model: a ``models:/`` or ``runs:/`` URI, or an MLflow model folder.
        output: Output folder; :func:`default_output` by default (never inside ``folder``).
        review: Also add the results to the FiftyOne dataset ``uas-predict-<category>``.
        max_megapixels: Largest image scored (larger ones get their reason in ``error``; every image is decoded
            reduced to about twice the model's input side, so this bounds the encoded size read, not the work).

    Returns:
        What was written.

    Raises:
        FileNotFoundError: The folder does not exist.
        ValueError: No image in the folder, or no such model.
    """
    folder = Path(folder)
    images = _inputs(folder)
    scorer, uri = load_scorer(category, model, checkpoint)
    python_model = scorer.unwrap_python_model()
    config = python_model.config
    threshold = float(config["image_threshold"])
    reader = RequestImages(
        Limits(max_rows=None, max_megapixels=max_megapixels), python_model.min_side, image_root=None, trusted=True
    )
    output = Path(output) if output is not None else default_output(folder, category)
    output.mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text(f"Written by uas predict ({uri}); uas predict never scores this folder.\n")
    names = _output_names(images, folder)
    rows = [
        _score(python_model, reader, path, (Path("masks") / name, Path("heatmaps") / name), output)
        for path, name in tqdm(list(zip(images, names, strict=True)), desc=f"uas predict {category}", unit="img")
    ]
    table = output / "predictions.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    title = f"{category}: {config['model']} ({uri}), threshold {threshold:.4f} (version {config['threshold_version']})"
    sheet = output / "flagged.html"
    sheet.write_text(_contact_sheet(rows, output, title))
    if review:
        logger.info("Added to FiftyOne dataset %s", _add_to_review(rows, output, category, config["model"], uri))
    return Inspection(
        csv=table,
        html=sheet,
        model_uri=uri,
        images=len(rows),
        flagged=sum(row["label"] == "anomaly" for row in rows),
        errors=sum(bool(row["error"]) for row in rows),
    )
