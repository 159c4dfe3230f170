# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading reference images of any mode and choosing them reproducibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_uas.data.images import ImageFolderDataset, list_images, read_image
from anomalib_uas.models.components.references import seeded_choice


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("L", np.full((5, 7), 51, np.uint8)),
        ("RGBA", np.dstack([np.full((5, 7, 3), 51, np.uint8), np.zeros((5, 7), np.uint8)])),
        ("I;16", np.full((5, 7), 13107, np.uint16)),
    ],
)
def test_modes_are_converted_to_rgb(tmp_path: Path, mode: str, array: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    image = read_image(path)
    assert image.shape == (3, 5, 7)
    np.testing.assert_allclose(image.numpy(), 0.2, atol=1e-6)


def test_palette_image(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).convert("P").save(path)
    assert read_image(path).min() == 1.0


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", None])
def test_corrupt_or_truncated_file_names_the_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.png"
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.png"):
        read_image(path)


def test_list_images_folder_and_errors(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "sub/a.JPG", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["b.png", "a.JPG"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        list_images([tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="No image files"):
        list_images(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_seeded_choice_is_reproducible_and_seed_dependent() -> None:
    assert seeded_choice(50, 3, seed=1) == seeded_choice(50, 3, seed=1)
    assert len({tuple(seeded_choice(50, 3, seed=s)) for s in range(5)}) > 1
    with pytest.raises(ValueError, match="only 2"):
        seeded_choice(2, 3, seed=0)


def test_image_folder_dataset_keeps_16_bit_range(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8, 4), 128, np.uint8)).save(tmp_path / "rgba.png")
    dataset = ImageFolderDataset(tmp_path)
    values = {Path(item.image_path).name: item.image for item in dataset}
    np.testing.assert_allclose(values["deep.png"].numpy(), 30000 / 65535, atol=1e-6)
    assert values["rgba.png"].shape == (3, 8, 8)
