# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS through anomalib's Engine: test, checkpoints, predict, export and the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD, PredictDataset, Visa
from anomalib.engine import Engine
from PIL import Image

from anomalib_uas.data import ImageFolderDataset
from anomalib_uas.models import MetaUAS
from anomalib_uas.models.components.transforms import AlignCornersResize
from anomalib_uas.models.metauas.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow

METRICS = {"image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_F1Max", "pixel_AUPRO"}
REPO = Path(__file__).resolve().parents[1]


def _datamodule(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)


def _engine(path: Path) -> Engine:
    return Engine(default_root_dir=path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)


@pytest.fixture(scope="module")
def normal_pool(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pool = tmp_path_factory.mktemp("pool")
    for good in sorted(demo_root.glob("*/train/good")):
        shutil.copytree(good, pool / good.parents[1].name)
    return pool


@pytest.mark.parametrize(("strategy", "k_shot"), [("random", 1), ("random", 2), ("retrieval", 2), ("pool", 1)])
def test_engine_test_with_every_prompt_strategy(
    demo_root: Path, demo_category: str, normal_pool: Path, tmp_path: Path, strategy: str, k_shot: int
) -> None:
    source = str(normal_pool) if strategy == "pool" else None
    model = MetaUAS(image_size=64, k_shot=k_shot, prompt_strategy=strategy, few_shot_source=source, visualizer=False)
    results = _engine(tmp_path).test(model, datamodule=_datamodule(demo_root, demo_category), verbose=False)[0]
    assert set(results) == METRICS
    assert all(0.0 <= value <= 1.0 for value in results.values())
    bank = model.model.prompt_bank[0]
    expected = {"random": k_shot, "retrieval": 4, "pool": 8}[strategy]
    assert bank.shape[0] == expected


def test_engine_test_with_folder_and_visa_datamodules(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    category = demo_root / demo_category
    defects = sorted(p.name for p in (category / "test").iterdir() if p.name != "good")
    folder = Folder(
        name=demo_category,
        root=category,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        mask_dir=[f"ground_truth/{d}" for d in defects],
        val_split_mode="same_as_test",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )
    visa_root = tmp_path / "visa"
    split = visa_root / "visa_pytorch" / demo_category
    shutil.copytree(category / "train", split / "train")
    shutil.copytree(category / "test" / "good", split / "test" / "good")
    for defect in defects:
        for image in (category / "test" / defect).glob("*.png"):
            (split / "test" / "bad").mkdir(parents=True, exist_ok=True)
            (split / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, split / "test" / "bad" / f"{defect}_{image.name}")
            mask = category / "ground_truth" / defect / f"{image.stem}_mask.png"
            shutil.copy(mask, split / "ground_truth" / "bad" / f"{defect}_{image.stem}.png")
    visa = Visa(root=visa_root, category=demo_category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    for datamodule in (folder, visa):
        model = MetaUAS(image_size=64, visualizer=False)
        results = _engine(tmp_path / type(datamodule).__name__).test(model, datamodule=datamodule, verbose=False)[0]
        assert set(results) == METRICS


def test_predict_with_the_robust_image_dataset(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(tmp_path / "deep.png")
    model = MetaUAS(image_size=64, few_shot_source=str(demo_root / demo_category / "train" / "good"), visualizer=False)
    predictions = _engine(tmp_path).predict(model, dataset=ImageFolderDataset(tmp_path / "deep.png"))
    assert predictions[0].anomaly_map.shape[-2:] == (64, 64)


def test_random_prompts_are_reproducible(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    banks = []
    for seed in (3, 3, 0, 1, 2):
        model = MetaUAS(image_size=64, seed=seed, visualizer=False)
        _engine(tmp_path).test(model, datamodule=_datamodule(demo_root, demo_category), verbose=False)
        banks.append(model.model.prompt_bank[0])
    torch.testing.assert_close(banks[0], banks[1], rtol=0, atol=0)
    assert any(not torch.equal(banks[0], other) for other in banks[2:])


def test_checkpoint_save_and_reload_restore_prompts_and_metrics(
    demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    model = MetaUAS(image_size=64, prompt_strategy="retrieval", k_shot=2, visualizer=False)
    engine = _engine(tmp_path / "fit")
    engine.fit(model, datamodule=_datamodule(demo_root, demo_category))
    checkpoint = Path(engine.best_model_path)
    assert checkpoint.is_file()
    first = engine.test(model, datamodule=_datamodule(demo_root, demo_category), verbose=False)[0]

    fresh = MetaUAS(image_size=64, prompt_strategy="retrieval", k_shot=2, visualizer=False, seed=99)
    again = _engine(tmp_path / "reload").test(
        fresh, datamodule=_datamodule(demo_root, demo_category), ckpt_path=checkpoint, verbose=False
    )[0]
    assert again == pytest.approx(first, abs=1e-6)

    loaded = MetaUAS.load_from_checkpoint(checkpoint)
    torch.testing.assert_close(loaded.model.prompt_bank_0, model.model.prompt_bank_0, rtol=0, atol=0)
    assert isinstance(loaded.pre_processor.transform.transforms[0], AlignCornersResize)
    assert loaded.pre_processor.transform.transforms[0].size == [64, 64]


def test_predict_on_a_folder_with_given_prompt_images(demo_root: Path, demo_category: str, tmp_path: Path) -> None:
    prompts = demo_root / demo_category / "train" / "good"
    queries = sorted((demo_root / demo_category / "test").glob("*/*.png"))
    folder = tmp_path / "queries"
    folder.mkdir()
    for path in queries:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    model = MetaUAS(image_size=64, few_shot_source=str(prompts), visualizer=False)
    predictions = _engine(tmp_path).predict(model, data_path=folder)
    scores = torch.cat([batch.pred_score for batch in predictions])
    assert len(scores) == len(queries)
    assert all(batch.anomaly_map.shape[-2:] == (64, 64) for batch in predictions)
    assert all(batch.pred_label is not None and batch.pred_mask is not None for batch in predictions)
    # without validation data the scores stay the raw sigmoid maxima
    raw = model.model.eval()(model.pre_processor.transform(PredictDataset(folder)[0].image[None]))
    assert float(predictions[0].pred_score[0]) == pytest.approx(float(raw.pred_score[0]), abs=1e-6)


def _cli_test(demo_root: Path, demo_category: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "anomalib.cli.cli", "test",
        "--config", str(REPO / "configs" / "metauas.yaml"),
        "--data.root", str(demo_root), "--data.category", demo_category,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=cwd)


def test_anomalib_cli_with_the_repo_config_runs_the_offline_checkpoint(
    demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    missing = _cli_test(demo_root, demo_category, tmp_path)
    assert missing.returncode != 0
    assert "uas weights metauas" in " ".join((missing.stdout + missing.stderr).split())
    torch.manual_seed(0)
    trained = MetaUAS(image_size=64, fusion="absdiff", decoder_channels=(32, 16, 16, 16, 8))
    save_checkpoint(trained.model, tmp_path / "checkpoints" / "metauas" / "metauas.pth", image_size=64)
    result = _cli_test(demo_root, demo_category, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pixel_AUPRO" in result.stdout
    assert (tmp_path / "results" / "MetaUAS" / "MVTecAD" / demo_category).is_dir()


def test_retrieval_predictions_name_the_prompt_of_each_query(
    demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    prompts = demo_root / demo_category / "train" / "good"
    queries = sorted(prompts.glob("*.png"))[:2]
    folder = tmp_path / "queries"
    folder.mkdir()
    for path in queries:
        shutil.copy(path, folder / path.name)
    model = MetaUAS(image_size=64, prompt_strategy="retrieval", few_shot_source=str(prompts), visualizer=False)
    predictions = _engine(tmp_path).predict(model, data_path=folder)
    explanations = [text for batch in predictions for text in batch.explanation]
    assert explanations == [f"prompt: {path}" for path in queries]  # each normal image retrieves itself


@pytest.mark.parametrize("size", [100, 0])
def test_image_size_not_a_multiple_of_32_is_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        MetaUAS(image_size=size)


def _query_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "queries"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "a.png")
    return folder


def test_missing_prompts_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no prompt images"):
        _engine(tmp_path).predict(MetaUAS(image_size=64, visualizer=False), data_path=_query_folder(tmp_path))


def test_pool_strategy_needs_a_source() -> None:
    with pytest.raises(ValueError, match="few_shot_source"):
        MetaUAS(prompt_strategy="pool")


def test_corrupt_prompt_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "prompt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match=r"prompt\.png"):
        _engine(tmp_path).predict(
            MetaUAS(image_size=64, few_shot_source=str(tmp_path / "prompt.png"), visualizer=False),
            data_path=_query_folder(tmp_path),
        )
