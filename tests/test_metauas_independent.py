# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The independent evaluation sets: shapes, labels, small exact defects, prompts that are other images."""

from __future__ import annotations

import numpy as np

from anomalib_uas.data.independent import (
    MATERIAL_DEFECT_KINDS,
    MATERIAL_FAMILIES,
    MIN_DELTA,
    _defect,
    independent_sets,
)


def test_independent_sets_have_small_defects_and_distinct_prompts() -> None:
    sets = independent_sets(image_size=128, num_prompts=2, num_normal=2, num_defective=4, seed=0)
    assert set(sets) == {"textures", "materials", "objects"}
    for categories in sets.values():
        assert len(categories) == 4
        for category in categories.values():
            assert category.prompts.shape == (2, 128, 128, 3)
            assert category.queries.shape == (6, 128, 128, 3)
            assert category.labels.tolist() == [0, 0, 1, 1, 1, 1]
            areas = category.masks.reshape(6, -1).sum(axis=1)
            assert (areas[:2] == 0).all()
            assert (areas[2:] > 0).all()
            assert (areas[2:] < 0.01 * 128 * 128).all()  # defects of a few pixels, at most about 13 px across
            for prompt in category.prompts:
                assert all(np.abs(prompt.astype(int) - query).mean() > 2 for query in category.queries)
    again = independent_sets(image_size=128, num_prompts=2, num_normal=2, num_defective=4, seed=0)
    for name, category in [("textures", "cells"), ("materials", "knit"), ("materials", "fibres")]:
        np.testing.assert_array_equal(again[name][category].queries, sets[name][category].queries)
        np.testing.assert_array_equal(again[name][category].masks, sets[name][category].masks)


def test_material_defects_change_exactly_their_mask() -> None:
    """Every material defect kind alters each of its mask pixels visibly and nothing outside the mask."""
    rng = np.random.default_rng(3)
    for family in MATERIAL_FAMILIES.values():
        clean = family(128, rng)
        for kind in MATERIAL_DEFECT_KINDS:
            query, mask = _defect(clean, rng, kind)
            change = np.abs(query.astype(int) - clean).max(axis=2)
            assert 0 < mask.sum() < 0.01 * 128 * 128, kind
            assert (change[~mask] == 0).all(), kind
            assert (change[mask] >= MIN_DELTA).all(), kind
