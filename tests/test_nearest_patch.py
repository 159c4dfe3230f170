# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The nearest-patch model: its distances, prompts, Engine runs, weights stage files, export and parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_uas.models import NearestPatch, get_spec
from anomalib_uas.models.loading import load_model
from anomalib_uas.models.nearest_patch.torch_model import NearestPatchModel
from anomalib_uas.params import ParamsError, load_params
from anomalib_uas.serving.runtime import check_graph, export_graph
from anomalib_uas.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]


def _engine(path: Path) -> Engine:
    return Engine(default_root_dir=path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)


def _datamodule(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def network() -> NearestPatchModel:
    return NearestPatchModel("efficientnet_lite0", pretrained=True)


def test_a_query_equal_to_its_prompt_scores_near_zero_and_a_defect_peaks_where_it_is(
    network: NearestPatchModel,
) -> None:
    prompt = torch.randn(1, 3, 128, 128)
    query = prompt.clone()
    query[:, :, 60:72, 60:72] = 3.0
    network.set_prompts(prompt)
    output = network(torch.cat([prompt, query]))
    peak = divmod(int(output.anomaly_map[1].argmax()), 128)
    assert all(40 <= coordinate <= 92 for coordinate in peak)
    assert float(output.pred_score[0]) < 0.05 * float(output.pred_score[1])  # matmul-based distances: ~0, not 0


def test_scores_are_the_distances_relative_to_the_prompt_scale_in_their_order(network: NearestPatchModel) -> None:
    generator = torch.Generator().manual_seed(0)
    prompts, queries = torch.randn(2, 3, 64, 64, generator=generator), torch.randn(6, 3, 64, 64, generator=generator)
    network.set_prompts(prompts)
    output = network(queries)
    bank = network.encode_images(prompts).permute(0, 2, 3, 1).reshape(-1, network.prompt_bank.shape[1])
    features = network.encode_images(queries)
    patches = features.flatten(2).transpose(1, 2)
    distances = torch.stack([torch.cdist(patch, bank).amin(dim=1).amax() for patch in patches])
    scale = bank.norm(dim=1).mean()
    torch.testing.assert_close(output.pred_score, distances / (distances + scale), rtol=1e-4, atol=1e-5)
    assert ((output.anomaly_map >= 0) & (output.anomaly_map < 1)).all()


def test_engine_fit_draws_seeded_prompts_from_the_train_normals_and_test_reports_the_metrics(
    demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    drawn = []
    for seed in (3, 3, 4):
        model = NearestPatch(image_size=64, k_shot=2, seed=seed, visualizer=False)
        _engine(tmp_path / str(seed)).fit(model, datamodule=_datamodule(demo_root, demo_category))
        drawn.append(model.prompt_paths)
    assert drawn[0] == drawn[1] != drawn[2]
    assert all(len(paths) == 2 and all("/train/good/" in path for path in paths) for paths in drawn)
    results = _engine(tmp_path).test(model, datamodule=_datamodule(demo_root, demo_category), verbose=False)[0]
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"} <= set(results)
    assert 0.0 <= results["image_AUROC"] <= 1.0


def test_prompts_set_by_hand_replace_the_datamodule_draw(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    good = sorted((demo_root / demo_category / "train" / "good").iterdir())[-1]
    model = NearestPatch(image_size=64, visualizer=False)
    model.set_prompts([good])
    _engine(tmp_path).test(model, datamodule=_datamodule(demo_root, demo_category), verbose=False)
    assert model.prompt_paths == [str(good)]


def test_no_prompts_anywhere_is_one_clear_error() -> None:
    model = NearestPatch(image_size=64, visualizer=False)
    with pytest.raises(RuntimeError, match=r"NearestPatch has no prompt images.*few_shot_source"):
        model.encode_prompts()


def test_the_weights_stage_file_loads_the_same_model_and_other_files_are_refused(tmp_path: Path) -> None:
    spec, params = get_spec("nearest_patch"), load_params(REPO / "params.yaml")
    files = spec.fetch("imagenet", params, tmp_path / "weights", tmp_path)
    assert files.checkpoint == tmp_path / "nearest_patch.pth"
    loaded = load_model("nearest_patch", files.checkpoint, image_size=64)
    fresh = NearestPatch(image_size=64, pretrained=True, visualizer=False)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for model in (loaded, fresh):
        model.set_prompts(images[:1])
    torch.testing.assert_close(loaded.model(images).anomaly_map, fresh.model(images).anomaly_map, rtol=0, atol=0)
    assert spec.fetch(str(files.checkpoint), params, tmp_path, tmp_path / "unused").checkpoint == files.checkpoint

    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(WeightsError, match="not a nearest-patch checkpoint"):
        spec.fetch(str(other), params, tmp_path, tmp_path)
    with pytest.raises(WeightsError, match="neither 'imagenet' nor an existing checkpoint"):
        spec.fetch("missing.pth", params, tmp_path, tmp_path)
    with pytest.raises(WeightsError, match="nothing to train"):
        spec.train(params, tmp_path, tmp_path, False)
    with pytest.raises(WeightsError, match="pool=3, not 5"):
        load_model("nearest_patch", files.checkpoint, pool=5)


def test_the_exported_graph_gives_the_eager_outputs(network: NearestPatchModel, tmp_path: Path) -> None:
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    network.set_prompts(images[:1])
    export_graph(network, images, tmp_path)
    difference = check_graph(network, images, tmp_path)  # GraphMismatchError beyond the serving tolerance
    assert difference.images == 3


@pytest.mark.parametrize(
    ("section", "value", "problem"),
    [
        ("models_config", {"pool": 4}, r"models_config\.nearest_patch\.pool = 4 .*odd"),
        ("models_config", {"levels": [2, 7]}, r"models_config\.nearest_patch\.levels\.1 = 7"),
        ("train", {"max_steps": 10}, r"train\.nearest_patch = \{\.\.\.\} .*trains nothing"),
    ],
)
def test_bad_nearest_patch_parameters_are_one_line(section: str, value: dict, problem: str, tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[section]["nearest_patch"] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=problem) as error:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(error.value)
    assert re.search(problem, str(error.value))
