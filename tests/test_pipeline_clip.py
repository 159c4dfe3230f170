# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The pipeline with the CLIP models: official-format files under ``weights/``, skip reasons, auxiliary training.

Tiny random CLIP configurations stand in for the real backbones, so that the official file formats and every
stage run for real without any download.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pipeline_repo import REPO, make_repo, run_command, stages_run

from anomalib_uas.review import fo  # fiftyone, imported through the package's metadata shim
from anomalib_uas.stages.status import Status

pytestmark = pytest.mark.slow

TINY_B = "uas-tiny-ViT-B-16-plus-240"
TINY_L = "uas-tiny-ViT-L-14-336"
FAPROMPT_SIZE = 112


def _write_official_files(weights: Path) -> dict[str, Path]:
    """Official-format files of tiny random models: InCTRL's checkpoint.pyth (CLIP inside), FAPrompt's epoch file
    and its separate CLIP file, and a CLIP-only file for InCTRL training."""
    from anomalib_uas.models.faprompt import FAPrompt
    from anomalib_uas.models.inctrl import InCTRL
    from anomalib_uas.models.inctrl.checkpoint import to_official

    inctrl = InCTRL(clip_model=TINY_B, clip_pretrained=None, visualizer=False)
    faprompt = FAPrompt(clip_model=TINY_L, clip_pretrained=None, image_size=FAPROMPT_SIZE, visualizer=False)
    files = {
        "inctrl": weights / "inctrl" / "2" / "checkpoint.pyth",
        "inctrl_clip": weights / "inctrl" / f"{TINY_B}.pt",
        "faprompt": weights / "faprompt" / "epoch_15.pth",
        "faprompt_clip": weights / "faprompt" / f"{TINY_L}.pt",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_official(inctrl.model), files["inctrl"])
    torch.save(inctrl.model.clip.state_dict(), files["inctrl_clip"])
    faprompt.save_official_checkpoint(files["faprompt"])
    torch.save(faprompt.model.clip.state_dict(), files["faprompt_clip"])
    return files


def _tiny_params(params: dict[str, Any]) -> dict[str, Any]:
    params["models"] = ["inctrl", "faprompt"]  # MetaUAS's branch is tested in test_pipeline.py
    params["data"].update(categories=["brick"], image_size=64)
    params["evaluate"].update(image_size=64)
    params["models_config"]["inctrl"]["clip_model"] = TINY_B
    params["models_config"]["faprompt"].update(clip_model=TINY_L, image_size=FAPROMPT_SIZE)
    return params


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _write_official_files(tmp_path_factory.mktemp("official") / "weights")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, official_files: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("project")
    weights = official_files["inctrl"].parents[2]
    arrived = {
        str(official_files[key].relative_to(weights)): official_files[key] for key in ("inctrl", "faprompt_clip")
    }
    return root, make_repo(root, _tiny_params, weights=arrived)  # the FAPrompt checkpoint arrives later


def _metrics(root: Path, model: str) -> dict[str, Any]:
    return json.loads((root / "reports" / model / "metrics.json").read_text())


def test_repro_evaluates_inctrl_from_the_official_file_and_skips_faprompt(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    assert (root / "weights" / "inctrl" / "2" / "checkpoint.pyth").is_file()
    output = run_command(["dvc", "repro"], root, env)
    assert {"weights@inctrl", "evaluate@inctrl", "weights@faprompt", "evaluate@faprompt", "review"} <= stages_run(
        output
    )
    metrics = _metrics(root, "inctrl")
    assert metrics["skipped"] == 0
    row = metrics["categories"]["brick"]
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO", "ms_per_image"} <= set(row)
    assert all(0.0 <= row[name] <= 1.0 for name in ("image_AUROC", "pixel_AUROC"))
    status = json.loads((root / "checkpoints" / "inctrl" / "status.json").read_text())
    assert status["kwargs"]["clip_model"] == TINY_B
    assert "weights/inctrl/2/checkpoint.pyth" in status["description"]
    evaluation = json.loads((root / "predictions" / "inctrl" / "evaluation.json").read_text())
    assert len(evaluation["prompt_paths"]["brick"]) == 1  # evaluate.k_shot
    assert "/train/good/" in evaluation["prompt_paths"]["brick"][0]
    saved = np.load(root / "predictions" / "inctrl" / "brick" / "predictions.npz")
    assert len(saved["pred_score"]) == len(saved["gt_label"]) > 0

    assert _metrics(root, "faprompt") == {"skipped": 1}
    reason = json.loads((root / "predictions" / "faprompt" / "evaluation.json").read_text())["skipped"]
    assert "weights/faprompt/epoch_15.pth" in reason
    assert "weights.faprompt" in reason
    assert "dvc repro" in reason
    report = (root / "reports" / "report.md").read_text()
    assert "| inctrl | brick |" in report
    assert "**faprompt** skipped: " in report
    review = json.loads((root / "reports" / "review.json").read_text())
    assert review["uas-inctrl-brick"]["samples"] == len(saved["pred_score"])
    dataset = fo.load_dataset("uas-inctrl-brick")
    query = dataset.first().id
    assert dataset.sort_by_similarity(query, k=2, brain_key="similarity").first().id == query

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("anomalib-uas").experiment_id
    runs = client.search_runs([experiment], "tags.`uas.stage` = 'evaluate'")
    run = next(r for r in runs if r.data.tags.get("uas.model") == "inctrl")
    assert run.data.metrics["brick.image_AUROC"] == pytest.approx(row["image_AUROC"])
    versions = client.search_model_versions("name='anomalib-uas-brick'")
    assert {v.tags["uas.model"] for v in versions} == {"inctrl"}
    _assert_registered_model_reproduces_the_evaluation(root, "inctrl", saved)


def _assert_registered_model_reproduces_the_evaluation(root: Path, model: str, saved: np.lib.npyio.NpzFile) -> None:
    """The registered pyfunc (``champion-<model>``) gives the raw scores and maps the evaluation recorded."""
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model(f"models:/anomalib-uas-brick@champion-{model}")
    paths = [str(root / path) for path in saved["image_path"][:2]]  # root / an absolute path = the path
    result = pyfunc.predict(pd.DataFrame({"image_path": paths}), params={"map_format": "array"})
    np.testing.assert_allclose(result["pred_score"], saved["pred_score"][:2], atol=1e-4)
    for index, encoded in enumerate(result["anomaly_map"]):
        np.testing.assert_allclose(np.array(json.loads(encoded)), saved["anomaly_map"][index], atol=2e-3)


def test_supplying_the_missing_file_evaluates_faprompt_on_the_next_repro(
    project: tuple[Path, dict[str, str]], official_files: dict[str, Path]
) -> None:
    root, env = project
    shutil.copy(official_files["faprompt"], root / "weights" / "faprompt" / "epoch_15.pth")
    ran = stages_run(
        run_command(["dvc", "repro"], root, env)
    )  # weights/faprompt is a dependency of FAPrompt's branch only
    faprompt = {f"{stage}@faprompt" for stage in ("weights", "evaluate", "calibrate", "register")}
    assert ran == {"feedback", "report", "review", *faprompt}  # feedback always runs
    metrics = _metrics(root, "faprompt")
    assert metrics["skipped"] == 0
    assert {"image_AUROC", "pixel_AUPRO"} <= set(metrics["categories"]["brick"])
    assert "skipped" not in json.loads((root / "predictions" / "faprompt" / "evaluation.json").read_text())
    saved = np.load(root / "predictions" / "faprompt" / "brick" / "predictions.npz")
    assert saved["anomaly_map"].shape[1:] == (FAPROMPT_SIZE, FAPROMPT_SIZE)
    report = (root / "reports" / "report.md").read_text()
    assert "| faprompt | brick |" in report
    assert "skipped" not in report
    assert "faprompt" in run_command(["dvc", "metrics", "show"], root, env)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name='anomalib-uas-brick'")
    assert {v.tags["uas.model"] for v in versions} == {"inctrl", "faprompt"}  # one registered model per category
    _assert_registered_model_reproduces_the_evaluation(root, "faprompt", saved)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UAS_OFFLINE", "1")
    monkeypatch.setenv("UAS_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _prepare(model: str, params: dict[str, Any], workdir: Path) -> Status:
    from anomalib_uas.stages import weights

    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return weights.main(model, workdir / "params.yaml", workdir / "weights" / model, workdir / "checkpoints" / model)


def test_missing_files_give_the_skip_reason_naming_each_file(workdir: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    inctrl = _prepare("inctrl", params, workdir)
    assert not inctrl.ready
    assert "weights/inctrl/2/checkpoint.pyth" in inctrl.reason
    assert "weights.inctrl" in inctrl.reason

    faprompt = _prepare("faprompt", params, workdir).reason
    for expected in (
        "weights/faprompt/epoch_15.pth",
        "weights.faprompt",
        "ViT-L-14-336px.pt",
        "weights/faprompt/ViT-L-14-336px.pt",
        str(workdir / "cache"),
        "UAS_WEIGHTS_DIR",
        "models_config.faprompt.clip_weights",
    ):
        assert expected in faprompt, expected
    assert json.loads((workdir / "checkpoints" / "faprompt" / "status.json").read_text())["reason"] == faprompt

    params["weights"]["inctrl"] = "train"
    reason = _prepare("inctrl", params, workdir).reason
    assert "datasets/auxiliary/bottle" in reason
    assert "train.inctrl.root" in reason
    assert "vit_b_16_plus_240-laion400m_e32-699c4b84.pt" in reason


@pytest.mark.parametrize(
    ("model", "key", "value", "expected"),
    [
        ("faprompt", "weights", "elsewhere/epoch_7.pth", "weights.faprompt = 'elsewhere/epoch_7.pth' is neither"),
        ("inctrl", "models_config", "nowhere/clip.pt", "models_config.inctrl.clip_weights = 'nowhere/clip.pt'"),
    ],
)
def test_a_path_set_by_the_user_that_does_not_exist_fails(
    workdir: Path, model: str, key: str, value: str, expected: str
) -> None:
    from anomalib_uas.weights import WeightsError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if key == "weights":
        params["weights"][model] = value
    else:
        params["models_config"][model]["clip_weights"] = value
        params["weights"][model] = "train"
    with pytest.raises(WeightsError, match=expected):
        _prepare(model, params, workdir)
    assert not (workdir / "checkpoints" / model).exists()


@pytest.mark.parametrize("model", ["inctrl", "faprompt"])
def test_auxiliary_training_feeds_the_evaluation(
    model: str, workdir: Path, official_files: dict[str, Path], demo_root: Path
) -> None:
    from anomalib_uas.models.loading import load_model

    params = _tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["weights"][model] = "train"
    params["models_config"][model]["clip_weights"] = str(official_files[f"{model}_clip"])
    categories = sorted(p.name for p in demo_root.iterdir() if p.is_dir())
    params["train"][model].update(root=str(demo_root), categories=categories, max_steps=2, batch_size=4)
    status = _prepare(model, params, workdir)
    assert status.ready, status.reason
    assert "trained on the auxiliary categories" in status.description
    assert mlflow.get_run(status.extra["mlflow_run_id"]).data.metrics["train_minutes"] > 0
    assert not (workdir / "checkpoints" / model / "training").exists()
    module = load_model(model, status.checkpoint_path, status.clip_weights_path, **status.kwargs)
    if model == "inctrl":
        from anomalib_uas.models.inctrl.checkpoint import TRAINED_PREFIXES
        from anomalib_uas.weights import load_state_dict

        trained = load_state_dict(status.checkpoint_path)
        assert trained
        assert all(key.startswith(TRAINED_PREFIXES) for key in trained)
        for key, value in trained.items():
            torch.testing.assert_close(module.model.state_dict()[key], value, atol=0, rtol=0)
    else:
        from anomalib_uas.models.faprompt.checkpoint import read_official

        learner = module.model.prompt_learner.state_dict()
        assert torch.equal(
            read_official(status.checkpoint_path)["ctx_pos"].reshape(learner["ctx_pos"].shape), learner["ctx_pos"]
        )
        untrained = read_official(official_files["faprompt"])["ctx_pos"]
        assert not torch.equal(untrained.reshape(learner["ctx_pos"].shape), learner["ctx_pos"])
