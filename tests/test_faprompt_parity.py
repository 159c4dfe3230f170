# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt reproduces the official implementation's outputs on the shared parity fixture (both DAP modes).

The fixture's synthetic weights are written the way a user receives them: the prompt learner as an official
``{"prompt_learner": ...}`` checkpoint and the CLIP weights as a separate state_dict in OpenAI key names. Both go
through :meth:`FAPrompt.from_official_checkpoint`; the public pre-processing and forward produce the outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from anomalib_uas.models.faprompt import FAPrompt
from anomalib_uas.models.faprompt.torch_model import FAPromptOutput, anomaly_maps_and_scores

pytestmark = pytest.mark.slow

MAP_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}
SCORE_TOLERANCE = {"atol": 1e-5, "rtol": 0.0}
VARIANTS = {"first": "official", "topk": "paper_topk"}


@pytest.fixture(scope="module")
def official_files(
    tmp_path_factory: pytest.TempPathFactory, parity_dir: Path, parity_weights: ModuleType
) -> Iterator[tuple[Path, Path]]:
    spec = parity_weights.load_spec(parity_dir / "faprompt" / "spec.json")
    state_dict = parity_weights.make_state_dict(spec, seed=0)
    folder = tmp_path_factory.mktemp("faprompt")
    learner = {k.removeprefix("prompt_learner."): v for k, v in state_dict.items() if k.startswith("prompt_learner.")}
    clip = {k.removeprefix("clip."): v for k, v in state_dict.items() if k.startswith("clip.")}
    del state_dict
    torch.save({"prompt_learner": learner}, folder / "epoch_15.pth")
    torch.save(clip, folder / "ViT-L-14-336px.pt")
    del clip
    yield folder / "epoch_15.pth", folder / "ViT-L-14-336px.pt"
    for path in folder.iterdir():
        path.unlink()


@pytest.mark.parametrize("selection", ["first", "topk"])
def test_official_checkpoint_reproduces_official_outputs(
    official_files: tuple[Path, Path], parity_dir: Path, selection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = np.load(parity_dir / "faprompt" / "inputs.npz")
    expected = np.load(parity_dir / "faprompt" / "expected.npz")
    variant = VARIANTS[selection]
    checkpoint, clip = official_files
    kwargs = {} if selection == "first" else {"dap_patch_selection": selection}  # "first" is the loader default
    model = FAPrompt.from_official_checkpoint(checkpoint, clip_weights=clip, visualizer=False, **kwargs).eval()
    assert model.model.dap_patch_selection == selection

    # the public pre-processing of the [0, 1] image gives the official normalised input
    query = torch.from_numpy(inputs["query_u8"]).permute(0, 3, 1, 2).float() / 255
    image = model.pre_processor.transform(query)
    np.testing.assert_allclose(image.numpy(), inputs["image"], atol=1e-6)

    recorded: list[FAPromptOutput] = []
    compute = model.model.compute

    def record(images: torch.Tensor) -> FAPromptOutput:
        output = compute(images)
        recorded.append(output)
        return output

    monkeypatch.setattr(model.model, "compute", record)  # record-only: the public forward runs unchanged
    with torch.no_grad():
        output = model.model(image)
    (passes,) = recorded
    details = anomaly_maps_and_scores(passes, model.model.grid, (518, 518), sigma=10.0)

    def grid(probs: torch.Tensor) -> np.ndarray:
        return probs[0].T.reshape(2, 37, 37).numpy()

    errors = {
        "sim_static_37": (grid(passes.static_probs), expected[f"{variant}__sim_static_37"]),
        "sim_prior_37": (grid(passes.prior_probs), expected[f"{variant}__sim_prior_37"]),
        "anomaly_map_prefilter": (
            details["anomaly_map_prefilter"][0].numpy(),
            expected[f"{variant}__anomaly_map_prefilter"],
        ),
        "anomaly_map": (output.anomaly_map[0].numpy(), expected[f"{variant}__anomaly_map"]),
        "p_text": (details["p_text"].numpy(), expected[f"{variant}__p_text"].reshape(1)),
        "max1": (details["max1"].numpy(), expected[f"{variant}__max1"].reshape(1)),
        "max2": (details["max2"].numpy(), expected[f"{variant}__max2"].reshape(1)),
        "image_score": (output.pred_score.numpy(), expected[f"{variant}__image_score"].reshape(1)),
    }
    print(
        f"\nFAPrompt parity ({selection}): "
        + ", ".join(f"{k} {np.abs(a - b).max():.2e}" for k, (a, b) in errors.items())
    )
    for name, (ours, theirs) in errors.items():
        tolerance = MAP_TOLERANCE if ours.size > 1 else SCORE_TOLERANCE
        np.testing.assert_allclose(ours, theirs, err_msg=name, **tolerance)
    assert passes.prior_indices[0].tolist() == expected[f"{variant}__dap_used_indices"].tolist()
    np.testing.assert_allclose(passes.prior[0].numpy(), expected[f"{variant}__dap_bias"], atol=1e-4, rtol=1e-4)
