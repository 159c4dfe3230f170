# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL reproduces the official implementation's outputs on the shared parity fixture (k = 2 and k = 4).

The synthetic weights are written as an official checkpoint (the full state_dict of the authors' module, frozen
CLIP included), loaded with the public :meth:`InCTRL.from_official_checkpoint` and run through the public
pre-processing and forward.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from anomalib_uas.models.inctrl import InCTRL

SCORES = ("final_score", "img_ref_score", "patch_ref_map", "text_score", "fg_score", "hl_score", "holistic_map")
TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}
FEATURE_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def official_model(tmp_path_factory: pytest.TempPathFactory, parity_dir: Path, parity_weights: ModuleType) -> InCTRL:
    spec = parity_weights.load_spec(parity_dir / "inctrl" / "spec.json")
    path = tmp_path_factory.mktemp("inctrl") / "checkpoint.pyth"
    torch.save(parity_weights.make_state_dict(spec, seed=0), path)
    model = InCTRL.from_official_checkpoint(path, category="bottle", visualizer=False).eval()
    path.unlink()
    return model


@pytest.fixture(scope="module")
def fixture_arrays(parity_dir: Path) -> tuple[dict, dict]:
    inputs = np.load(parity_dir / "inctrl" / "inputs.npz")
    expected = np.load(parity_dir / "inctrl" / "expected.npz")
    return dict(inputs), dict(expected)


def _images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


def test_preprocessing_and_features_match(official_model: InCTRL, fixture_arrays: tuple[dict, dict]) -> None:
    inputs, expected = fixture_arrays
    transform = official_model.pre_processor.transform
    query = transform(_images(inputs["query_u8"]))
    np.testing.assert_allclose(query.numpy(), inputs["query_normalized"], atol=1e-6, rtol=0)
    tokens, patches = official_model.model.encode_images(query[:1])
    np.testing.assert_allclose(tokens[0].numpy(), expected["q0_visual_token"], **FEATURE_TOLERANCE)
    np.testing.assert_allclose(
        patches[0].numpy(), expected["q0_visual_patch_tokens_L7_L9_L11"][:, 1:], **FEATURE_TOLERANCE
    )
    official_model.model.set_category(str(inputs["category"]))
    text = official_model.model.text_features.numpy()
    np.testing.assert_allclose(text, expected["k2__text_features"][0], **FEATURE_TOLERANCE)


@pytest.mark.parametrize("k_shot", [2, 4])
def test_official_checkpoint_reproduces_official_outputs(
    official_model: InCTRL, fixture_arrays: tuple[dict, dict], k_shot: int
) -> None:
    inputs, expected = fixture_arrays
    transform = official_model.pre_processor.transform
    query = transform(_images(inputs["query_u8"]))
    official_model.model.set_prompts(transform(_images(inputs["normals_u8"][:k_shot])))
    official_model.model.set_category(str(inputs["category"]))

    output = official_model.model(query)  # the public forward, both queries in one batch
    np.testing.assert_allclose(output.pred_score.numpy(), expected[f"k{k_shot}__final_score"], **TOLERANCE)
    patch_map = expected[f"k{k_shot}__patch_ref_map"].reshape(2, 1, 15, 15)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(patch_map), size=(240, 240), mode="bilinear")
    np.testing.assert_allclose(output.anomaly_map.numpy(), upsampled[:, 0].numpy(), **TOLERANCE)

    with torch.no_grad():
        scores = official_model.model.score(query)
    for name in SCORES:
        np.testing.assert_allclose(
            getattr(scores, name).numpy(), expected[f"k{k_shot}__{name}"], **TOLERANCE, err_msg=name
        )
