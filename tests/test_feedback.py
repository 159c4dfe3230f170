# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Feedback export from review datasets on the real embedded FiftyOne database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_uas.feedback import HARD_TAG, NORMAL_TAG, export_feedback
from anomalib_uas.review import classification, fo, upsert_samples


def _image(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def datasets(tmp_path: Path) -> Iterator[list]:
    """Two review datasets of one category (two models) over the same four images, and one of another category."""
    images = [_image(tmp_path / "images" / f"{i:03d}.png", 40 * i) for i in range(4)]
    other = _image(tmp_path / "images" / "other.png", 250)
    made = []
    for model, category, paths in (("m1", "tiles", images), ("m2", "tiles", images), ("m1", "wood", [other])):
        dataset = fo.Dataset(f"uas-{model}-{category}-{uuid.uuid4().hex[:8]}")
        records = [
            {
                "filepath": path,
                "model": model,
                "category": category,
                "anomaly_score": 0.1 + 0.2 * i,
                "prediction": classification(0.1 + 0.2 * i, 0.4),
                "ground_truth": fo.Classification(label="anomaly" if i == 3 else "normal"),
            }
            for i, path in enumerate(paths)
        ]
        upsert_samples(dataset, records)
        made.append(dataset)
    yield made
    for dataset in made:
        dataset.delete()


def _tag(dataset, index: int, tag: str) -> None:
    sample = dataset.skip(index).first()
    sample.tags.append(tag)
    sample.save()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_copies_marked_images_with_their_provenance(datasets, tmp_path: Path) -> None:
    first, second, wood = datasets
    _tag(first, 2, NORMAL_TAG)  # a false positive (score 0.5 > 0.4, normal)
    _tag(second, 2, NORMAL_TAG)  # the same image marked in the other model's dataset: one file, two marks
    _tag(first, 3, HARD_TAG)
    _tag(wood, 0, NORMAL_TAG)  # a category that is not exported
    output = tmp_path / "feedback"
    names = [d.name for d in datasets]

    summary = export_feedback(output, datasets=names, categories=["tiles", "empty"])

    assert summary == {"tiles": {"normal": 1, "hard": 1}, "empty": {"normal": 0, "hard": 0}}
    assert sorted(p.name for p in output.iterdir()) == ["empty", "tiles"]
    normal = list((output / "tiles" / "normal").iterdir())
    assert len(normal) == 1
    assert normal[0].read_bytes() == Path(first.skip(2).first().filepath).read_bytes()
    provenance = json.loads((output / "tiles" / "provenance.json").read_text())
    record = provenance["normal"][0]
    assert record["file"] == f"normal/{normal[0].name}"
    assert [mark["dataset"] for mark in record["marks"]] == sorted([first.name, second.name])
    mark = next(m for m in record["marks"] if m["dataset"] == first.name)
    sample = first.skip(2).first()
    assert mark["sample_id"] == sample.id
    assert mark["model"] == "m1"
    assert mark["score"] == pytest.approx(0.5)
    assert (mark["predicted"], mark["ground_truth"], mark["tag"]) == ("anomaly", "normal", NORMAL_TAG)
    assert mark["marked_at"].endswith("Z")
    assert mark["exported_at"].endswith("Z")
    assert provenance["hard"][0]["marks"][0]["ground_truth"] == "anomaly"
    assert json.loads((output / "empty" / "provenance.json").read_text()) == {"normal": [], "hard": []}


def test_export_is_deterministic_and_follows_the_marks(datasets, tmp_path: Path) -> None:
    first, _, _ = datasets
    _tag(first, 2, NORMAL_TAG)
    output = tmp_path / "feedback"
    export_feedback(output, datasets=[first.name], categories=["tiles"])
    before = _snapshot(output)

    sample = first.skip(2).first()
    sample["anomaly_score"] = 0.01  # the model improved: the record keeps the score at the time of the mark
    sample.save()
    export_feedback(output, datasets=[first.name], categories=["tiles"])
    assert _snapshot(output) == before

    sample.tags.remove(NORMAL_TAG)
    sample.save()
    _tag(first, 1, NORMAL_TAG)
    export_feedback(output, datasets=[first.name], categories=["tiles"])
    provenance = json.loads((output / "tiles" / "provenance.json").read_text())
    assert [r["marks"][0]["sample_id"] for r in provenance["normal"]] == [first.skip(1).first().id]
    assert len(list((output / "tiles" / "normal").iterdir())) == 1
    assert first.skip(2).first().feedback_export is None


def test_bad_marks_leave_the_previous_output(datasets, tmp_path: Path) -> None:
    first, second, _ = datasets
    _tag(first, 2, NORMAL_TAG)
    output = tmp_path / "feedback"
    export_feedback(output, datasets=[first.name, second.name], categories=["tiles"])
    before = _snapshot(output)

    _tag(second, 2, HARD_TAG)  # the same image: normal in one dataset, a missed defect in the other
    with pytest.raises(ValueError, match="keep one mark"):
        export_feedback(output, datasets=[first.name, second.name], categories=["tiles"])
    assert _snapshot(output) == before

    sample = second.skip(2).first()
    sample.tags.append(NORMAL_TAG)
    sample.save()
    with pytest.raises(ValueError, match="keep one of them"):
        export_feedback(output, datasets=[second.name], categories=["tiles"])

    Path(first.skip(2).first().filepath).unlink()
    with pytest.raises(FileNotFoundError, match="restore it"):
        export_feedback(output, datasets=[first.name], categories=["tiles"])
    assert _snapshot(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feedback", "images"]  # no temporary folder left

    with pytest.raises(ValueError, match="No FiftyOne dataset"):
        export_feedback(output, datasets=["uas-nothing-here"])
