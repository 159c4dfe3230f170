# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Reviewer feedback from the FiftyOne review datasets, exported as versioned image folders for the models.

A reviewer marks samples with sample tags, in the App or through the API:

* :data:`NORMAL_TAG` (``feedback:normal``): the image is normal; typically a false positive. Feedback normals
  join the prompt pools and the normal images that set thresholds.
* :data:`HARD_TAG` (``feedback:hard``): the image is a defect the model missed (a hard case).

:func:`export_feedback` copies the marked images of every ``uas-*`` dataset (review datasets of evaluations and
of ``uas predict --review``) into ``<output>/<category>/normal`` and ``<output>/<category>/hard`` and writes
``<output>/<category>/provenance.json``: per image its file, sha256, source path and the marks (dataset, sample
id, model, score, predicted label, ground truth, ``marked_at`` and ``exported_at``).

Who and when: open-source FiftyOne records no user and no time per tag; it records only each sample's
``last_modified_at``. So ``marked_at`` is the sample's ``last_modified_at`` when an export first saw the mark
(the tagging, unless the sample changed since), and ``exported_at`` the time of that export. Both, with the score
and labels of that moment, are kept on the sample (field ``feedback_export``), so a later export, after the
model and its scores changed, writes the same record: the output changes only when the marks change. Files are
named by content (``<stem>-<sha256 prefix><suffix>``), records are sorted, and the output is written to a
temporary folder and swapped in only when complete; an error (missing image, contradictory marks) leaves the
previous output as it was.

Example:
    >>> from anomalib_uas.feedback import export_feedback
    >>> export_feedback("data/feedback", categories=["brick", "grass"])  # doctest: +SKIP
    {'brick': {'normal': 3, 'hard': 1}, 'grass': {'normal': 0, 'hard': 0}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from anomalib_uas.review import fo

logger = logging.getLogger(__name__)

__all__ = ["FEEDBACK_TAGS", "HARD_TAG", "NORMAL_TAG", "export_feedback"]

NORMAL_TAG = "feedback:normal"
HARD_TAG = "feedback:hard"
FEEDBACK_TAGS = {NORMAL_TAG: "normal", HARD_TAG: "hard"}
RECORD_FIELD = "feedback_export"
_PROVENANCE = "provenance.json"


@dataclass(frozen=True)
class _Mark:
    """One marked sample: where it is and what it records."""

    dataset: str
    sample_id: str
    category: str
    kind: str
    source: Path
    record: dict[str, Any]


def _utc(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.replace(microsecond=0).isoformat() + "Z"


def _label(sample: Any, field: str) -> str | None:
    value = sample[field] if sample.has_field(field) else None
    return getattr(value, "label", None)


def _marks(name: str, now: str) -> list[_Mark]:
    """The marked samples of a dataset, with their frozen records (new ones are made but not stored yet)."""
    dataset = fo.load_dataset(name)
    marks = []
    for sample in dataset.match_tags(list(FEEDBACK_TAGS)):
        tags = sorted(set(sample.tags) & set(FEEDBACK_TAGS))
        if len(tags) > 1:
            msg = f"Sample {sample.id} of {name!r} ({sample.filepath}) is tagged {tags}; keep one of them."
            raise ValueError(msg)
        tag = tags[0]
        frozen = sample[RECORD_FIELD] if sample.has_field(RECORD_FIELD) else None
        if not frozen or frozen.get("tag") != tag:
            score = sample["anomaly_score"] if sample.has_field("anomaly_score") else None
            frozen = {
                "tag": tag,
                "model": (sample["model"] if sample.has_field("model") else None) or dataset.info.get("model"),
                "score": None if score is None else round(float(score), 6),
                "predicted": _label(sample, "prediction"),
                "ground_truth": _label(sample, "ground_truth"),
                "marked_at": _utc(sample.last_modified_at),
                "exported_at": now,
            }
        category = (sample["category"] if sample.has_field("category") else None) or dataset.info.get("category")
        if not category:
            msg = f"Sample {sample.id} of {name!r} has no category (field or dataset info); set one."
            raise ValueError(msg)
        marks.append(_Mark(name, sample.id, str(category), FEEDBACK_TAGS[tag], Path(sample.filepath), frozen))
    return marks


def _shown(path: Path) -> str:
    """A source path as recorded: relative to the working directory when inside it, so clones agree."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def _layout(marks: list[_Mark]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per category and file name: the image, its kind and its marks; one file per image content."""
    files: dict[str, dict[str, dict[str, Any]]] = {}
    for mark in marks:
        if not mark.source.is_file():
            msg = f"Marked image {mark.source} (sample {mark.sample_id} of {mark.dataset!r}) is missing; restore it."
            raise FileNotFoundError(msg)
        digest = hashlib.sha256(mark.source.read_bytes()).hexdigest()
        name = f"{mark.source.stem}-{digest[:12]}{mark.source.suffix.lower()}"
        entry = files.setdefault(mark.category, {}).setdefault(
            digest, {"name": name, "kind": mark.kind, "source": mark.source, "sha256": digest, "marks": []}
        )
        if entry["kind"] != mark.kind:
            others = ", ".join(f"{m['dataset']}/{m['sample_id']}" for m in entry["marks"])
            msg = (
                f"{mark.source} is marked {mark.kind} in {mark.dataset}/{mark.sample_id} and {entry['kind']} in "
                f"{others}; keep one mark."
            )
            raise ValueError(msg)
        entry["marks"].append({"dataset": mark.dataset, "sample_id": mark.sample_id, **mark.record})
    return {category: {e["name"]: e for e in entries.values()} for category, entries in files.items()}


def _write(folder: Path, entries: dict[str, dict[str, Any]]) -> dict[str, int]:
    provenance: dict[str, list[dict[str, Any]]] = {"normal": [], "hard": []}
    for name in sorted(entries):
        entry = entries[name]
        target = folder / entry["kind"] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry["source"], target)
        marks = sorted(entry["marks"], key=lambda m: (m["dataset"], m["sample_id"]))
        record = {"file": f"{entry['kind']}/{name}", "sha256": entry["sha256"], "source": _shown(entry["source"])}
        provenance[entry["kind"]].append({**record, "marks": marks})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return {kind: len(records) for kind, records in provenance.items()}


def _swap(staging: Path, output: Path) -> None:
    """Replace ``output`` by ``staging`` with renames, so that it is the old or the new folder, never a mix."""
    if not output.exists():
        staging.rename(output)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-", dir=output.parent))
    output.replace(retired / output.name)
    staging.rename(output)
    shutil.rmtree(retired)


def _store_records(marks: list[_Mark], names: Sequence[str]) -> None:
    """Keep each mark's record on its sample, and drop the records of samples no longer marked."""
    by_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    for mark in marks:
        by_dataset.setdefault(mark.dataset, {})[mark.sample_id] = mark.record
    for name in names:
        dataset = fo.load_dataset(name)
        records = by_dataset.get(name, {})
        if not dataset.has_sample_field(RECORD_FIELD):
            if not records:
                continue
            dataset.add_sample_field(RECORD_FIELD, fo.DictField)
        stale = dataset.exists(RECORD_FIELD).values("id")
        changes = {sample_id: None for sample_id in stale if sample_id not in records}
        changes.update(records)
        if changes:
            dataset.set_values(RECORD_FIELD, changes, key_field="id")


def export_feedback(
    output: str | Path = Path("data/feedback"),
    datasets: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
) -> dict[str, dict[str, int]]:
    """Export the images reviewers marked with :data:`NORMAL_TAG` or :data:`HARD_TAG`, with their provenance.

    Args:
        output: The feedback folder; ``<output>/<category>/{normal,hard}/`` and ``<output>/<category>/provenance.json``.
        datasets: FiftyOne datasets to read; every ``uas-*`` dataset when ``None``.
        categories: Categories to write (each gets a folder and a ``provenance.json``, empty when nothing is
            marked); marks of other categories are skipped with a warning. All marked categories when ``None``.

    Returns:
        Per category, the number of exported ``normal`` and ``hard`` images.

    Raises:
        ValueError: An unknown dataset, a sample with both tags or one image marked both ways.
        FileNotFoundError: A marked image that no longer exists.
    """
    output = Path(output)
    names = sorted(fo.list_datasets("uas-*")) if datasets is None else list(datasets)
    unknown = [name for name in names if not fo.dataset_exists(name)]
    if unknown:
        msg = f"No FiftyOne dataset {unknown}; existing: {fo.list_datasets()}."
        raise ValueError(msg)
    now = _utc(datetime.now(timezone.utc))
    marks = [mark for name in names for mark in _marks(name, now)]
    layout = _layout(marks)
    wanted = sorted(layout) if categories is None else list(categories)
    for category in sorted(set(layout) - set(wanted)):
        count = sum(len(entry["marks"]) for entry in layout[category].values())
        logger.warning("Skipping %d feedback marks of category %r (not in %s).", count, category, wanted)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-new-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would become the output's mode
    try:
        summary = {category: _write(staging / category, layout.get(category, {})) for category in wanted}
        _swap(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _store_records([mark for mark in marks if mark.category in wanted], names)
    return summary
