# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL through anomalib's Engine: few-shot test, prompt sources, auxiliary training, checkpoints, export, CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD, PredictDataset
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from anomalib_uas.data import AuxiliaryDataModule
from anomalib_uas.models.inctrl import InCTRL
from anomalib_uas.models.inctrl.checkpoint import TRAINED_PREFIXES

pytestmark = pytest.mark.slow

TINY = "uas-tiny-ViT-B-16-plus-240"
IMAGE_METRICS = {"image_AUROC", "image_AUPR", "image_F1Max"}
PIXEL_METRICS = {"pixel_AUROC", "pixel_AUPR", "pixel_F1Max", "pixel_AUPRO"}
REPO = Path(__file__).resolve().parents[1]


def _model(**kwargs: object) -> InCTRL:
    return InCTRL(clip_model=TINY, clip_pretrained=None, visualizer=False, **kwargs)


def _datamodule(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)


def _engine(path: Path, **kwargs: object) -> Engine:
    return Engine(
        default_root_dir=path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False, **kwargs
    )


@pytest.fixture(scope="module")
def fitted(demo_root: Path, demo_category: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[InCTRL, Path]:
    """A k=2 few-shot model after ``Engine.fit`` (validation only), with its checkpoint."""
    model = _model(k_shot=2)
    engine = _engine(tmp_path_factory.mktemp("inctrl_fit"))
    engine.fit(model, datamodule=_datamodule(demo_root, demo_category))
    return model, Path(engine.best_model_path)


def test_engine_test_few_shot_and_reload(
    fitted: tuple[InCTRL, Path], demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    model, checkpoint = fitted
    first = _engine(tmp_path / "a").test(model, datamodule=_datamodule(demo_root, demo_category), verbose=False)[0]
    assert set(first) == IMAGE_METRICS | PIXEL_METRICS
    assert all(0.0 <= value <= 1.0 for value in first.values())
    assert len(model.prompt_paths) == 2
    assert all("/train/good/" in path for path in model.prompt_paths)
    assert model.model.category == demo_category

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(key.startswith("model.clip.") for key in state)
    assert {key.split(".")[1] for key in state if key.startswith("model.")} == {
        "adapter",
        "diff_head",
        "diff_head_ref",
        "prompt_patches",
        "prompt_tokens",
        "text_features",
    }

    fresh = _model(k_shot=2)
    again = _engine(tmp_path / "b").test(
        fresh, datamodule=_datamodule(demo_root, demo_category), ckpt_path=checkpoint, verbose=False
    )[0]
    assert again == pytest.approx(first, abs=1e-6)

    loaded = InCTRL.load_from_checkpoint(checkpoint)
    torch.testing.assert_close(loaded.model.prompt_tokens, model.model.prompt_tokens, atol=0, rtol=0)
    torch.testing.assert_close(loaded.model.text_features, model.model.text_features, atol=0, rtol=0)
    assert loaded.model.category == demo_category
    images = torch.rand(2, 3, 240, 240)
    loaded.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images).pred_score, model.model(images).pred_score)


def test_prompts_are_seeded(demo_root: Path, demo_category: str, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule = _datamodule(demo_root, demo_category)
    datamodule.setup()
    chosen = []
    for seed in (3, 3, 0, 1):
        model = _model(k_shot=2, seed=seed)
        monkeypatch.setattr(model, "_datamodule", lambda: datamodule)
        model.collect_prompts()
        chosen.append(model.prompt_paths)
    assert chosen[0] == chosen[1]
    assert any(other != chosen[0] for other in chosen[2:])


def test_few_shot_sources_folder_list_and_official_prompt_files(
    demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    good = demo_root / demo_category / "train" / "good"
    paths = sorted(str(p) for p in good.glob("*.png"))
    by_folder = _model(k_shot=3, few_shot_source=str(good))
    images_folder = by_folder.source_prompts()
    by_list = _model(k_shot=3, few_shot_source=[p for p in paths if p in by_folder.prompt_paths])
    torch.testing.assert_close(by_list.source_prompts(), images_folder)

    # official format: a list of k transformed 3x240x240 tensors in <few_shot_dir>/<category>.pt
    prompt_dir = tmp_path / "fs_samples" / "3"
    prompt_dir.mkdir(parents=True)
    torch.save(list(images_folder), prompt_dir / f"{demo_category}.pt")
    by_file = _model(k_shot=3, few_shot_source=str(prompt_dir / f"{demo_category}.pt"))
    torch.testing.assert_close(by_file.source_prompts(), images_folder)

    queries = tmp_path / "queries"
    queries.mkdir()
    for path in sorted((demo_root / demo_category / "test").glob("*/*.png"))[:3]:
        shutil.copy(path, queries / f"{path.parent.name}_{path.name}")
    by_dir = _model(k_shot=3, few_shot_source=str(prompt_dir), category=demo_category)
    predictions = _engine(tmp_path / "predict").predict(by_dir, data_path=queries)
    assert sum(len(batch.pred_score) for batch in predictions) == 3
    assert all(batch.anomaly_map.shape[-2:] == (240, 240) for batch in predictions)
    assert by_dir.prompt_paths[0].endswith(f"{demo_category}.pt[0]")
    # without validation data the scores stay raw
    raw = by_dir.model.eval()(by_dir.pre_processor.transform(PredictDataset(queries)[0].image[None]))
    assert float(predictions[0].pred_score[0]) == pytest.approx(float(raw.pred_score[0]), abs=1e-6)

    with pytest.raises(FileNotFoundError, match="no prompt file"):
        _model(k_shot=3, few_shot_source=str(prompt_dir), category="other").source_prompts()
    torch.save([torch.zeros(3, 64, 64)] * 3, tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"\[3, 240, 240\]"):
        _model(k_shot=3, few_shot_source=str(tmp_path / "small.pt")).source_prompts()
    with pytest.raises(ValueError, match="fewer than k_shot=4"):
        _model(k_shot=4, few_shot_source=str(prompt_dir / f"{demo_category}.pt")).source_prompts()


class _LabelRecorder(Callback):
    def __init__(self) -> None:
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        del trainer, pl_module, batch_idx
        self.labels.append(sorted(batch.gt_label.int().tolist()))


def test_auxiliary_training_updates_only_trained_parts(demo_root: Path, tmp_path: Path) -> None:
    categories = sorted(p.name for p in demo_root.iterdir() if p.is_dir())
    datamodule = AuxiliaryDataModule(demo_root, categories=categories, train_batch_size=4, eval_batch_size=4)
    model = _model(k_shot=2, auxiliary_training=True)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    recorder = _LabelRecorder()
    engine = _engine(tmp_path, max_steps=3, limit_val_batches=1, callbacks=[recorder])
    engine.fit(model, datamodule=datamodule)
    assert recorder.labels == [[0, 0, 1, 1]] * 3
    after = model.model.state_dict()
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"adapter", "diff_head", "diff_head_ref"}
    assert model.trainer.callback_metrics["train_loss"] > 0

    checkpoint = Path(engine.best_model_path)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model_keys = {key.removeprefix("model.") for key in state if key.startswith("model.")}
    assert {key for key in model_keys if state[f"model.{key}"].numel()} == {
        key for key in model.model.state_dict() if key.startswith(TRAINED_PREFIXES)
    }  # plus the empty prompt and text buffers
    assert checkpoint.stat().st_size < 2e6

    # the trained parts serve a few-shot model on an unseen category
    few_shot = _model(k_shot=2, weights=str(checkpoint))
    for key, value in after.items():
        if key.startswith(TRAINED_PREFIXES):
            torch.testing.assert_close(few_shot.model.state_dict()[key], value, atol=0, rtol=0)
    results = _engine(tmp_path / "test").test(few_shot, datamodule=_datamodule(demo_root, categories[1]), verbose=False)
    assert set(results[0]) >= IMAGE_METRICS


def test_anomalib_cli_with_the_repo_config(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "anomalib.cli.cli", "test",
        "--config", str(REPO / "configs" / "inctrl.yaml"),
        "--data.root", str(demo_root), "--data.category", demo_category,
        "--model.clip_model", TINY, "--model.clip_pretrained", "null",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_AUROC" in result.stdout
    assert (tmp_path / "results" / "InCTRL" / "MVTecAD" / demo_category).is_dir()


def test_auxiliary_training_needs_anomalies_in_the_train_split(
    demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    model = _model(k_shot=2, auxiliary_training=True)
    with pytest.raises(ValueError, match="AuxiliaryDataModule"):
        _engine(tmp_path, max_steps=1).fit(model, datamodule=_datamodule(demo_root, demo_category))


def test_missing_prompts_give_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "queries"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "a.png")
    with pytest.raises(RuntimeError, match="no prompt images"):
        _engine(tmp_path).predict(_model(), data_path=folder)
