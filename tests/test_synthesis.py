# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Change-pair synthesis: determinism, exact masks, misaligned prompts, sources, validation and data loading."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader

from anomalib_uas.data.demo import DEMO_SOURCES
from anomalib_uas.synthesis import (
    CHANGE_KINDS,
    OFFLINE_SOURCES,
    ChangePair,
    ChangePairDataset,
    PairSynthesisConfig,
    load_source_images,
    offline_source_images,
    perlin_mask,
    perlin_noise,
)
from anomalib_uas.synthesis.pairs import LATTICE_LAYOUTS, _texture, _texture_style

SMALL = PairSynthesisConfig(image_size=64)


@pytest.fixture(scope="module")
def sources() -> list[np.ndarray]:
    return offline_source_images()


@pytest.fixture(scope="module")
def dataset(sources: list[np.ndarray]) -> ChangePairDataset:
    return ChangePairDataset(sources, length=1000, seed=7, config=SMALL)


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return np.rint(image.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


def assert_pair_format(pair: ChangePair, size: int) -> None:
    assert pair.prompt.shape == pair.query.shape == (3, size, size)
    assert pair.mask.shape == (size, size)
    for tensor in (pair.prompt, pair.query, pair.mask):
        assert tensor.dtype == torch.float32
        assert tensor.min() >= 0.0
        assert tensor.max() <= 1.0
    assert set(pair.mask.unique().tolist()) <= {0.0, 1.0}
    assert pair.kind in CHANGE_KINDS


def assert_same_pairs(actual: list[ChangePair], expected: list[ChangePair]) -> None:
    assert [pair.kind for pair in actual] == [pair.kind for pair in expected]
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a.prompt, b.prompt)
        assert torch.equal(a.query, b.query)
        assert torch.equal(a.mask, b.mask)


def test_same_seed_and_index_give_identical_pairs(sources: list[np.ndarray]) -> None:
    first = ChangePairDataset(sources, length=20, seed=3, config=SMALL)
    second = ChangePairDataset(sources, length=20, seed=3, config=SMALL)
    indices = (0, 5, 19, 5)
    assert_same_pairs([first[index] for index in indices], [second[index] for index in indices])


def test_different_seed_or_index_gives_different_pairs(sources: list[np.ndarray]) -> None:
    reference = ChangePairDataset(sources, length=20, seed=3, config=SMALL)
    other_seed = ChangePairDataset(sources, length=20, seed=4, config=SMALL)
    for index in range(5):
        assert not torch.equal(reference[index].query, other_seed[index].query)
        assert not torch.equal(reference[index].prompt, reference[index + 1].prompt)


@pytest.mark.parametrize("kind", CHANGE_KINDS)
def test_each_kind_changes_exactly_the_mask(dataset: ChangePairDataset, kind: str) -> None:
    for index in range(8):
        pair, clean = dataset.synthesize(index, kind=kind)
        assert_pair_format(pair, 64)
        assert pair.kind == kind
        query = as_uint8(pair.query)
        mask = pair.mask.numpy().astype(bool)
        difference = np.abs(query.astype(int) - clean.astype(int)).max(axis=-1)
        np.testing.assert_array_equal(difference > 0, mask)
        if kind == "none":
            assert not mask.any()
            np.testing.assert_array_equal(query, clean)
        else:
            assert mask.any()
            assert difference[mask].min() >= SMALL.min_change


def test_drawn_kinds_follow_the_probabilities(dataset: ChangePairDataset) -> None:
    counts = Counter(dataset[index].kind for index in range(300))
    assert set(counts) == set(CHANGE_KINDS)
    assert abs(counts["local"] / 300 - SMALL.p_local) < 0.1
    assert abs(counts["none"] / 300 - SMALL.p_none) < 0.1
    only_local = ChangePairDataset(dataset.images, 30, config=replace(SMALL, p_local=1.0, p_object=0.0, p_none=0.0))
    assert {only_local[index].kind for index in range(30)} == {"local"}


@pytest.mark.parametrize("kind", CHANGE_KINDS)
def test_prompt_is_a_misaligned_view_of_clean(dataset: ChangePairDataset, kind: str) -> None:
    for index in range(4):
        pair, clean = dataset.synthesize(index, kind=kind)
        assert not torch.equal(pair.prompt, pair.query)
        assert (pair.prompt - pair.query).abs().mean() > 1e-3
    still = PairSynthesisConfig(image_size=64, max_rotation=0.0, max_translate=0.0, scale_range=(1.0, 1.0))
    aligned = ChangePairDataset(dataset.images, 4, seed=1, config=replace(still, color_jitter=0.0))
    pair, clean = aligned.synthesize(0, kind=kind)
    np.testing.assert_allclose(pair.prompt.permute(1, 2, 0).numpy(), clean / 255.0, atol=1e-6)
    moved = ChangePairDataset(dataset.images, 4, seed=1, config=PairSynthesisConfig(image_size=64, color_jitter=0.0))
    pair, clean = moved.synthesize(0, kind=kind)
    assert np.abs(pair.prompt.permute(1, 2, 0).numpy() - clean / 255.0).mean() > 1e-3


def test_full_size_pair(sources: list[np.ndarray]) -> None:
    pair, clean = ChangePairDataset(sources, 2, seed=0).synthesize(1, kind="exchange")
    assert_pair_format(pair, 256)
    np.testing.assert_array_equal((as_uint8(pair.query) != clean).any(-1), pair.mask.numpy().astype(bool))


def test_offline_sources_exclude_the_evaluation_images(sources: list[np.ndarray]) -> None:
    assert len(sources) == len(OFFLINE_SOURCES) == 19
    for image in sources:
        assert image.dtype == np.uint8
        assert image.ndim == 3
        assert image.shape[2] == 3
    assert offline_source_images()[0] is sources[0]
    for name in DEMO_SOURCES.values():
        demo = np.asarray(getattr(skimage.data, name)())
        demo = np.repeat(demo[..., None], 3, axis=2) if demo.ndim == 2 else demo[..., :3]
        for image in sources:
            assert not (image.shape == demo.shape and np.array_equal(image, demo)), name
    for name in ("astronaut", "coffee", "retina"):
        assert any(np.array_equal(image, getattr(skimage.data, name)()) for image in sources)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"p_local": 0.5, "p_object": 0.5, "p_none": 0.5}, "sum to 1"),
        ({"p_local": -0.1, "p_object": 0.9, "p_none": 0.2}, "p_local"),
        ({"image_size": 16}, "image_size"),
        ({"scale_range": (1.1, 0.9)}, "scale_range"),
        ({"color_jitter": 1.0}, "color_jitter"),
        ({"max_translate": 0.7}, "max_translate"),
        ({"min_change": 0}, "min_change"),
        ({"perlin_scale_exponents": (3, 3)}, "perlin_scale_exponents"),
        ({"local_area": (0.0, 0.5)}, "local_area"),
        ({"blend_beta": (0.2, 1.0)}, "blend_beta"),
        ({"object_size": (0.5, 1.5)}, "object_size"),
        ({"p_pattern": 2.0}, "p_pattern"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PairSynthesisConfig(**changes)


def test_dataset_validation(sources: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="images is empty"):
        ChangePairDataset([], length=1)
    with pytest.raises(ValueError, match="length"):
        ChangePairDataset(sources, length=-1)
    with pytest.raises(ValueError, match="seed"):
        ChangePairDataset(sources, length=1, seed=-1)
    with pytest.raises(ValueError, match="shape"):
        ChangePairDataset([np.zeros((3, 8, 8, 2), dtype=np.uint8)], length=1)
    dataset = ChangePairDataset(sources, length=2, config=SMALL)
    with pytest.raises(IndexError, match="out of range"):
        dataset[2]
    with pytest.raises(ValueError, match="change kind"):
        dataset.synthesize(0, kind="scratch")


def test_any_image_type_and_anomaly_sources() -> None:
    rng = np.random.default_rng(0)
    images = [
        rng.random((50, 70)),
        rng.integers(0, 65536, (90, 40), dtype=np.uint16),
        rng.integers(0, 256, (40, 40, 4), dtype=np.uint8),
    ]
    stripes = [np.tile(np.array([0, 255], dtype=np.uint8).repeat(4), (32, 4))]
    dataset = ChangePairDataset(images, length=10, seed=2, config=SMALL, anomaly_sources=stripes)
    for kind in CHANGE_KINDS:
        pair, clean = dataset.synthesize(3, kind=kind)
        assert_pair_format(pair, 64)
        np.testing.assert_array_equal((as_uint8(pair.query) != clean).any(-1), pair.mask.numpy().astype(bool))


def test_load_source_images(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    Image.fromarray(np.full((20, 30), 30000, dtype=np.uint16)).save(nested / "deep16.png")
    rgba = np.zeros((12, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((2000, 100, 3), dtype=np.uint8)).save(tmp_path / "tall.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_source_images([tmp_path])
    assert [image.shape for image in images] == [(20, 30, 3), (12, 16, 3), (1024, 51, 3)]
    assert all(image.dtype == np.uint8 for image in images)
    np.testing.assert_array_equal(images[0], round(30000 / 65535 * 255))
    np.testing.assert_array_equal(images[1][0, 0], [200, 0, 0])
    assert load_source_images(tmp_path, max_side=None)[2].shape == (2000, 100, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source_images([tmp_path / "missing"])
    with pytest.raises(ValueError, match="No source folder"):
        load_source_images([])


def test_dataloader_workers_give_the_same_items(sources: list[np.ndarray]) -> None:
    dataset = ChangePairDataset(sources, length=6, seed=5, config=SMALL)
    serial = list(DataLoader(dataset, batch_size=None, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert_same_pairs(parallel, serial)


def test_batches_made_on_several_threads_equal_the_items_one_by_one(sources: list[np.ndarray]) -> None:
    dataset = ChangePairDataset(sources, length=8, seed=3, config=SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = dataset.__getitems__([5, 0, 7, 2])
        loaded = next(iter(DataLoader(dataset, batch_size=4, collate_fn=list)))  # fetches through __getitems__
    finally:
        torch.set_num_threads(threads)
    assert_same_pairs(batch, [dataset[index] for index in (5, 0, 7, 2)])
    assert_same_pairs(loaded, [dataset[index] for index in range(4)])


def test_perlin_noise_and_mask() -> None:
    noise = perlin_noise((64, 96), (4, 6), np.random.default_rng(0))
    assert noise.shape == (64, 96)
    assert noise.dtype == np.float32
    assert 0.05 < noise.std() < 0.5
    assert np.abs(noise).max() <= 0.75
    np.testing.assert_array_equal(noise, perlin_noise((64, 96), (4, 6), np.random.default_rng(0)))
    for seed in range(20):
        mask = perlin_mask((64, 64), np.random.default_rng(seed), threshold=0.7, area=(0.02, 0.3))
        assert 0.02 <= mask.mean() <= 0.3
    with pytest.raises(ValueError, match="scale_exponents"):
        perlin_mask((8, 8), np.random.default_rng(0), scale_exponents=(2, 1))
    with pytest.raises(ValueError, match="resolution"):
        perlin_noise((8, 8), (0, 1), np.random.default_rng(0))


def test_texture_pair_prompt_is_another_realization_of_the_query_texture() -> None:
    still = PairSynthesisConfig(
        image_size=64, p_realization=1.0, max_rotation=0.0, max_translate=0.0, scale_range=(1.0, 1.0), color_jitter=0.0
    )
    dataset = ChangePairDataset([np.zeros((80, 80, 3), np.uint8)], 6, seed=0, config=still)
    for index in range(6):
        pair, clean = dataset.synthesize(index, kind="none")
        prompt = pair.prompt.permute(1, 2, 0).numpy() * 255.0
        assert clean.any()  # a procedural texture, not the black source image
        assert np.abs(prompt - clean).mean() > 1.0  # not the same image: another realization
        assert np.abs(prompt.mean(axis=(0, 1)) - clean.mean(axis=(0, 1))).max() < 64.0  # of the same colours


@pytest.mark.parametrize("layout", LATTICE_LAYOUTS)
def test_lattice_realizations_share_the_period_but_not_the_pixels(layout: str) -> None:
    """Two realizations of one lattice style: same dominant spatial frequency, different phases."""
    rng = np.random.default_rng(0)
    style = _texture_style(rng) | {
        "style": "lattice",
        "layout": layout,
        "angle": 0.0,
        "crossing": np.pi / 2,
        "period": 8.0,
        "aspect": 1.0,
        "jitter": 0.05,
        "contrast": 1.0,
    }
    style["colours"] = np.array([[20, 20, 20], [230, 230, 230]], np.float32)
    peaks = []
    realizations = [_texture(style, (128, 128), rng) for _ in range(2)]
    for texture in realizations:
        spectrum = np.abs(np.fft.fft2(texture.mean(axis=2) - texture.mean()))
        spectrum[0, 0] = 0
        row, column = np.unravel_index(spectrum.argmax(), spectrum.shape)
        peaks.append((min(row, 128 - row), min(column, 128 - column)))  # conjugate peaks count as one
    assert peaks[0] == peaks[1]
    # threads every 8 px on 128 px are 16 cycles; a plain weave repeats every two threads: multiples of 8 cycles
    assert max(peaks[0]) > 0
    assert all(cycles % 8 == 0 for cycles in peaks[0])
    assert np.abs(realizations[0].astype(int) - realizations[1]).mean() > 20
