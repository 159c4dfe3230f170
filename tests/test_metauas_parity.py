# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS reproduces the official implementation's outputs on the shared parity fixture."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from anomalib_uas.models import MetaUAS

TOLERANCES = {256: {"atol": 3e-5, "rtol": 1e-4}, 512: {"atol": 1e-4, "rtol": 1e-4}}


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory: pytest.TempPathFactory, parity_dir: Path, parity_weights: ModuleType) -> Path:
    spec = parity_weights.load_spec(parity_dir / "metauas" / "spec.json")
    path = tmp_path_factory.mktemp("metauas") / "metauas.ckpt"
    torch.save(parity_weights.make_state_dict(spec, seed=0), path)
    return path


@pytest.mark.parametrize(("size", "suffix"), [(256, ""), (512, "_512")])
def test_official_checkpoint_reproduces_official_outputs(
    official_checkpoint: Path, parity_dir: Path, size: int, suffix: str
) -> None:
    inputs = np.load(parity_dir / "metauas" / "inputs.npz")
    expected = np.load(parity_dir / "metauas" / "expected.npz")
    model = MetaUAS.from_official_checkpoint(official_checkpoint, image_size=size).eval()

    query = torch.from_numpy(inputs[f"query_image{suffix}"])
    prompt = torch.from_numpy(inputs[f"prompt_image{suffix}"])
    transform = model.pre_processor.transform
    output = model.model(transform(query), transform(prompt))

    np.testing.assert_allclose(output.anomaly_map.numpy(), expected[f"anomaly_map{suffix}"][:, 0], **TOLERANCES[size])
    np.testing.assert_allclose(output.pred_score.numpy(), expected[f"image_score{suffix}"], **TOLERANCES[size])
    assert np.abs(output.anomaly_map.numpy() - expected[f"anomaly_map{suffix}"][:, 0]).mean() < 1e-6


def test_cached_prompt_bank_equals_prompt_per_query(official_checkpoint: Path, parity_dir: Path) -> None:
    inputs = np.load(parity_dir / "metauas" / "inputs.npz")
    expected = np.load(parity_dir / "metauas" / "expected.npz")
    model = MetaUAS.from_official_checkpoint(official_checkpoint, image_size=256).eval()
    transform = model.pre_processor.transform
    for pair in range(2):
        model.model.set_prompts(transform(torch.from_numpy(inputs["prompt_image"][pair : pair + 1])))
        output = model.model(transform(torch.from_numpy(inputs["query_image"][pair : pair + 1])))
        np.testing.assert_allclose(
            output.anomaly_map[0].numpy(), expected["anomaly_map"][pair, 0], atol=3e-5, rtol=1e-4
        )
