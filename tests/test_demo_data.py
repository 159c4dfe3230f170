# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Tests of the deterministic demo dataset generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_uas.data import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, DEMO_SOURCES, generate_demo_dataset
from anomalib_uas.data.demo import MANIFEST_NAME, MIN_DEFECT_DELTA, make_defect_sample

SMALL = {"image_size": 48, "num_train": 3, "num_test_good": 2, "num_test_defect": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    return generate_demo_dataset(root, categories=DEMO_CATEGORIES[:2], seed=3, **SMALL)


def test_public_constants() -> None:
    assert tuple(DEMO_SOURCES) == DEMO_CATEGORIES
    assert 3 <= len(DEMO_CATEGORIES) <= 5
    assert len(DEMO_DEFECT_TYPES) >= 2
    assert "good" not in DEMO_DEFECT_TYPES


def test_layout_and_counts(small_root: Path) -> None:
    assert sorted(path.name for path in small_root.iterdir()) == sorted([*DEMO_CATEGORIES[:2], MANIFEST_NAME])
    for category in DEMO_CATEGORIES[:2]:
        base = small_root / category
        assert sorted(path.name for path in base.iterdir()) == ["ground_truth", "test", "train"]
        assert [path.name for path in (base / "train").iterdir()] == ["good"]
        assert sorted(path.name for path in (base / "test").iterdir()) == sorted(["good", *DEMO_DEFECT_TYPES])
        assert sorted(path.name for path in (base / "ground_truth").iterdir()) == sorted(DEMO_DEFECT_TYPES)
        assert len(list((base / "train" / "good").glob("*.png"))) == SMALL["num_train"]
        assert len(list((base / "test" / "good").glob("*.png"))) == SMALL["num_test_good"]
        for defect_type in DEMO_DEFECT_TYPES:
            images = sorted((base / "test" / defect_type).iterdir())
            masks = sorted((base / "ground_truth" / defect_type).iterdir())
            assert len(images) == len(masks) == SMALL["num_test_defect"]
            assert [f"{image.stem}_mask.png" for image in images] == [mask.name for mask in masks]
    manifest = json.loads((small_root / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    assert manifest["parameters"] == {"categories": list(DEMO_CATEGORIES[:2]), "seed": 3, **SMALL}


def test_image_and_mask_formats(small_root: Path) -> None:
    size = SMALL["image_size"]
    for path in small_root.rglob("*.png"):
        with Image.open(path) as image:
            assert image.size == (size, size)
            array = np.asarray(image)
            if "ground_truth" in path.parts:
                assert image.mode == "L"
                assert set(np.unique(array)) == {0, 255}, path
            else:
                assert image.mode == "RGB"
                assert array.std() > 5, path


def test_same_seed_is_byte_identical(tmp_path: Path, small_root: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", categories=DEMO_CATEGORIES[:2], seed=3, **SMALL)
    assert _files(again) == _files(small_root)


def test_different_seed_differs(tmp_path: Path, small_root: Path) -> None:
    other = _files(generate_demo_dataset(tmp_path / "other", categories=DEMO_CATEGORIES[:2], seed=4, **SMALL))
    reference = _files(small_root)
    assert other.keys() == reference.keys()
    images = [name for name in reference if name.endswith(".png")]
    assert all(other[name] != reference[name] for name in images if "ground_truth" not in name)


def test_categories_are_different_images(small_root: Path) -> None:
    first, second = DEMO_CATEGORIES[:2]
    image_a = np.asarray(Image.open(small_root / first / "train" / "good" / "000.png"), dtype=float)
    image_b = np.asarray(Image.open(small_root / second / "train" / "good" / "000.png"), dtype=float)
    assert np.abs(image_a - image_b).mean() > 5


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
@pytest.mark.parametrize("defect_type", DEMO_DEFECT_TYPES)
@pytest.mark.parametrize("image_size", [32, 96])
def test_mask_marks_exactly_the_changed_pixels(category: str, defect_type: str, image_size: int) -> None:
    for seed in range(5):
        clean, defective, mask = make_defect_sample(category, defect_type, image_size, np.random.default_rng(seed))
        assert clean.shape == defective.shape == (image_size, image_size, 3)
        assert clean.dtype == defective.dtype == np.uint8
        assert mask.shape == (image_size, image_size)
        assert mask.dtype == np.bool_
        change = np.abs(defective.astype(np.int16) - clean.astype(np.int16)).max(axis=-1)
        assert mask.any()
        assert mask.mean() < 0.5
        np.testing.assert_array_equal(change > 0, mask)
        assert change[mask].min() >= MIN_DEFECT_DELTA


def test_make_defect_sample_is_deterministic() -> None:
    first = make_defect_sample("brick", "patch", 64, np.random.default_rng(11))
    second = make_defect_sample("brick", "patch", 64, np.random.default_rng(11))
    for array_a, array_b in zip(first, second, strict=True):
        np.testing.assert_array_equal(array_a, array_b)


def test_loads_through_anomalib(small_root: Path) -> None:
    from anomalib.data import MVTecAD

    category = DEMO_CATEGORIES[0]
    datamodule = MVTecAD(root=small_root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    datamodule.setup()
    num_defective = SMALL["num_test_defect"] * len(DEMO_DEFECT_TYPES)
    assert len(datamodule.train_data) == SMALL["num_train"]
    assert len(datamodule.test_data) == SMALL["num_test_good"] + num_defective
    labels = []
    for index in range(len(datamodule.test_data)):
        item = datamodule.test_data[index]
        label = int(item.gt_label)
        labels.append(label)
        mask = item.gt_mask.numpy().astype(bool).squeeze()
        if label == 0:
            assert not mask.any()
        else:
            image_path = Path(item.image_path)
            mask_path = small_root / category / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
            np.testing.assert_array_equal(mask, np.asarray(Image.open(mask_path)) > 0)
    assert sorted(labels) == [0] * SMALL["num_test_good"] + [1] * num_defective


def test_idempotent(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path, categories=["gravel"], **SMALL)
    mtimes = {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}
    assert generate_demo_dataset(tmp_path, categories=["gravel"], **SMALL) == root
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()} == mtimes


def test_incomplete_dataset_is_regenerated(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path, categories=["gravel"], **SMALL)
    reference = _files(root)
    (root / "gravel" / "test" / "stain" / "000.png").unlink()
    generate_demo_dataset(tmp_path, categories=["gravel"], **SMALL)
    assert _files(root) == reference


def test_new_parameters_replace_previous_dataset(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, categories=["brick", "gravel"], **SMALL)
    generate_demo_dataset(tmp_path, categories=["grass"], **{**SMALL, "num_train": 1})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo_manifest.json", "grass"]
    assert len(list((tmp_path / "grass" / "train" / "good").iterdir())) == 1


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "brick").mkdir()
    with pytest.raises(FileExistsError, match="not created by the demo generator"):
        generate_demo_dataset(tmp_path, categories=["brick"], **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"categories": ["bottle"]}, r"Unknown demo categories \['bottle'\]; valid categories are brick"),
        ({"categories": []}, "at least one category"),
        ({"image_size": 31}, "image_size must be an integer >= 32"),
        ({"image_size": 64.0}, "image_size must be an integer"),
        ({"num_train": 0}, "num_train must be an integer >= 1"),
        ({"num_test_good": 0}, "num_test_good must be an integer >= 1"),
        ({"num_test_defect": -1}, "num_test_defect must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_bad_sample_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="valid defect types are"):
        make_defect_sample("brick", "crack", 64, rng)
    with pytest.raises(ValueError, match="valid categories are"):
        make_defect_sample("bottle", "stain", 64, rng)
