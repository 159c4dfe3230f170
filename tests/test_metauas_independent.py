# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The independent evaluation sets: shapes, labels, small exact defects, prompts that are other images."""

from __future__ import annotations

import numpy as np

from anomalib_uas.data.independent import independent_sets


def test_independent_sets_have_small_defects_and_distinct_prompts() -> None:
    sets = independent_sets(image_size=128, num_prompts=2, num_normal=2, num_defective=4, seed=0)
    assert set(sets) == {"textures", "objects"}
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
    np.testing.assert_array_equal(again["textures"]["cells"].queries, sets["textures"]["cells"].queries)
