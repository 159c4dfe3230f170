# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt through anomalib's Engine on a tiny random CLIP: zero-shot test, training, checkpoints, export, CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib import LearningType
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_uas.data import AuxiliaryDataModule
from anomalib_uas.models.faprompt import FAPrompt
from anomalib_uas.models.faprompt.checkpoint import read_official

pytestmark = pytest.mark.slow

TINY = {"clip_model": "uas-tiny-ViT-L-14-336", "clip_pretrained": None, "image_size": 56, "visualizer": False}
METRICS = {"image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_F1Max", "pixel_AUPRO"}
REPO = Path(__file__).resolve().parents[1]


def _engine(path: Path, **kwargs: object) -> Engine:
    return Engine(
        default_root_dir=path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False, **kwargs
    )


def _test_data(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FAPrompt, Path, list[float]]:
    """Three Adam steps of auxiliary training on both demo categories through Engine.fit."""
    model = FAPrompt(**TINY, auxiliary_training=True, seed=3)
    assert model.learning_type == LearningType.ONE_CLASS
    before = [p.detach().clone() for p in model.model.prompt_learner.parameters()]
    clip_before = model.model.clip.visual.conv1.weight.detach().clone()
    datamodule = AuxiliaryDataModule(
        demo_root,
        categories=sorted(p.name for p in demo_root.iterdir() if p.is_dir()),
        train_batch_size=4,
        eval_batch_size=4,
    )
    engine = _engine(tmp_path_factory.mktemp("fit"), max_steps=3, limit_val_batches=1)
    engine.fit(model, datamodule=datamodule)
    after = list(model.model.prompt_learner.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert all(changed)
    assert torch.equal(model.model.clip.visual.conv1.weight, clip_before)
    losses = [float(v) for k, v in engine.trainer.callback_metrics.items() if k == "train_loss"]
    return model, Path(engine.best_model_path), losses


def test_zero_shot_engine_test_needs_no_normal_images(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    model = FAPrompt(**TINY)
    assert model.learning_type == LearningType.ZERO_SHOT
    # no training images at all: FAPrompt never looks at them
    root = tmp_path / "data"
    shutil.copytree(demo_root / demo_category, root / demo_category)
    for image in (root / demo_category / "train" / "good").glob("*.png"):
        image.unlink()
    results = _engine(tmp_path).test(model, datamodule=_test_data(root, demo_category), verbose=False)[0]
    assert set(results) == METRICS
    assert all(0.0 <= value <= 1.0 for value in results.values())


def test_training_checkpoint_holds_the_prompt_learner_only(
    trained: tuple[FAPrompt, Path, list[float]], demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    model, checkpoint, losses = trained
    assert checkpoint.is_file()
    assert losses
    assert all(np.isfinite(losses))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model_keys = {k for k in state if k.startswith("model.")}
    assert model_keys == {f"model.prompt_learner.{k}" for k in model.model.prompt_learner.state_dict()}

    # reload into a fresh model (other seed), through Engine.test with the checkpoint and load_from_checkpoint
    model.eval()
    first = _engine(tmp_path / "a").test(model, datamodule=_test_data(demo_root, demo_category), verbose=False)[0]
    fresh = FAPrompt(**TINY, auxiliary_training=True, seed=3)
    again = _engine(tmp_path / "b").test(
        fresh, datamodule=_test_data(demo_root, demo_category), ckpt_path=checkpoint, verbose=False
    )[0]
    assert again == pytest.approx(first, abs=1e-6)
    loaded = FAPrompt.load_from_checkpoint(checkpoint)
    for key, value in model.model.prompt_learner.state_dict().items():
        assert torch.equal(loaded.model.prompt_learner.state_dict()[key], value), key


def test_official_format_save_and_reload(trained: tuple[FAPrompt, Path, list[float]], tmp_path: Path) -> None:
    model = trained[0].eval()
    path = model.save_official_checkpoint(tmp_path / "epoch_1.pth")
    assert set(read_official(path)) >= {
        "ctx_pos",
        "ctx_neg",
        "tokenized_prompts_neg",
        "compound_prompt_projections.7.bias",
    }
    loaded = FAPrompt.from_official_checkpoint(path, seed=3, dap_patch_selection="topk", **TINY).eval()
    assert loaded.model.dap_patch_selection == "topk"
    assert FAPrompt.from_official_checkpoint(path, seed=3, **TINY).model.dap_patch_selection == "first"
    images = torch.randn(2, 3, 56, 56)
    expected, output = model.model(images), loaded.model(images)
    torch.testing.assert_close(output.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(output.pred_score, expected.pred_score)


def test_anomalib_cli_with_the_repo_config(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "anomalib.cli.cli", "test",
        "--config", str(REPO / "configs" / "faprompt.yaml"),
        "--data.root", str(demo_root), "--data.category", demo_category,
        "--model.clip_model", "uas-tiny-ViT-L-14-336", "--model.clip_pretrained", "null",
        "--model.image_size", "56",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pixel_AUPRO" in result.stdout
    assert (tmp_path / "results" / "FAPrompt" / "MVTecAD" / demo_category).is_dir()


def test_training_without_masks_is_rejected() -> None:
    model = FAPrompt(**TINY, auxiliary_training=True)

    class _Batch:
        image = torch.zeros(1, 3, 56, 56)
        gt_label = torch.zeros(1)
        gt_mask = None

    with pytest.raises(ValueError, match="pixel masks"):
        model.training_step(_Batch())
