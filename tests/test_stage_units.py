# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Fast unit tests of the pieces the stages are made of: output swap, curves, thresholds, skip reasons, registry."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from anomalib_uas.curves import error_rates, f1_threshold, thresholds, write_curves
from anomalib_uas.models.components.clip_files import ClipModelFiles
from anomalib_uas.stages.outputs import replacing
from anomalib_uas.weights import WeightsError, WeightsNotFoundError


def test_outputs_are_replaced_only_on_success(tmp_path: Path) -> None:
    folder, file = tmp_path / "out", tmp_path / "metrics.json"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    file.write_text("old")

    def fail_halfway() -> None:
        with replacing(folder, file) as (staged_folder, staged_file):
            staged_folder.mkdir()
            (staged_folder / "new.txt").write_text("new")
            staged_file.write_text("new")
            msg = "boom"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="boom"):
        fail_halfway()
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    assert file.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "out"]  # no staging left behind
    with replacing(folder, file) as (staged_folder, staged_file):
        staged_folder.mkdir()
        (staged_folder / "new.txt").write_text("new")
        staged_file.write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]
    assert file.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "out"]


def test_an_output_the_stage_did_not_write_fails_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="wrote none of"), replacing(target):
        pass
    assert target.read_text() == "old"


def test_f1_threshold_separates_and_handles_one_class() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    threshold = f1_threshold(labels, scores)
    assert 0.3 < threshold <= 0.7
    assert ((scores >= threshold) == labels.astype(bool)).all()
    assert f1_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5


def test_pixel_threshold_on_maps() -> None:
    maps = np.zeros((2, 8, 8), dtype=np.float16)
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps[1, 2:4, 2:4], masks[1, 2:4, 2:4] = 0.9, True
    found = thresholds(
        {"gt_label": np.array([0, 1]), "pred_score": np.array([0.2, 0.8]), "anomaly_map": maps, "gt_mask": masks}
    )
    assert found["image_threshold"] == pytest.approx(0.8)
    assert found["pixel_threshold"] == pytest.approx(0.9, abs=1e-3)


def test_curves_are_lf_csv_and_skip_one_class_categories(tmp_path: Path) -> None:
    write_curves(
        tmp_path,
        ["a", "b"],
        [np.array([0.1, 0.9, 0.4]), np.array([0.5, 0.6])],
        [np.array([0, 1, 0]), np.array([0, 0])],
        [{"category": "a", "image_AUROC": 1.0}],
    )
    rows = list(csv.DictReader((tmp_path / "roc.csv").open()))
    assert {row["category"] for row in rows} == {"a"}
    assert rows[0] == {"category": "a", "fpr": "0.000000", "tpr": "0.000000"}
    assert b"\r\n" not in (tmp_path / "pr.csv").read_bytes()
    bars = list(csv.DictReader((tmp_path / "per_category.csv").open()))
    assert bars == [{"category": "a", "image_AUROC": "1.000000", **dict.fromkeys(list(bars[0])[2:], "")}]
    write_curves(tmp_path / "skipped", ["a"])
    assert (tmp_path / "skipped" / "roc.csv").read_text() == "category,fpr,tpr\n"


def test_skip_reason_names_every_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_uas.params import ClipConfig

    monkeypatch.setenv("UAS_OFFLINE", "1")
    monkeypatch.setenv("UAS_WEIGHTS_DIR", str(tmp_path / "cache"))
    files = ClipModelFiles("faprompt", "ViT-L-14-336", "openai", "epoch_15.pth", "the authors' epoch file")
    checkpoint, problem = files.find_checkpoint("official", tmp_path / "weights")
    clip, clip_problem = files.find_clip(ClipConfig(), tmp_path / "weights", download=True)
    assert checkpoint is None
    assert clip is None
    reason = str(files.missing([problem, clip_problem]))
    assert reason.startswith("faprompt is skipped because files it needs are not on this machine: (1) ")
    for expected in ("epoch_15.pth", "weights.faprompt", "ViT-L-14-336px.pt", "UAS_WEIGHTS_DIR", "dvc repro"):
        assert expected in reason
    assert isinstance(files.missing([problem]), WeightsNotFoundError)
    with pytest.raises(WeightsError, match=r"weights\.faprompt = 'nope\.pth' is neither"):
        files.find_checkpoint("nope.pth", tmp_path)


def test_a_text_file_as_inctrl_checkpoint_is_one_line(tmp_path: Path) -> None:
    from anomalib_uas.models.inctrl import InCTRL

    text = tmp_path / "checkpoint.pyth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(WeightsError) as caught:
        InCTRL.from_official_checkpoint(text, clip_model="uas-tiny-ViT-B-16-plus-240")
    assert "\n" not in str(caught.value)
    assert f"Cannot read checkpoint {text}" in str(caught.value)


@pytest.fixture
def registry_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def test_champion_is_the_best_finite_metric_and_its_models_newest_decision(
    registry_store: mlflow.MlflowClient,
) -> None:
    from anomalib_uas.registry import update_champion, version_of

    client, name = registry_store, "anomalib-uas-unit"
    client.create_registered_model(name)

    def add(model: str, value: float) -> str:
        version = client.create_model_version(name, source="file:///nowhere", tags={"uas.model": model}).version
        client.set_model_version_tag(name, version, "pixel_AUPRO", f"{value:.6f}")
        return version

    nan = add("metauas", math.nan)
    assert update_champion(name, "pixel_AUPRO") is None
    assert version_of(name, "champion") is None
    first = add("metauas", 0.5)
    assert update_champion(name, "pixel_AUPRO") == first
    recalibrated = add("metauas", 0.5)  # the same model at an equal metric: its newer decision deploys
    assert update_champion(name, "pixel_AUPRO") == recalibrated
    assert version_of(name, "champion-metauas") == recalibrated
    add("inctrl", 0.5)  # another model's equal metric takes no alias from the holder
    add("inctrl", math.inf)
    assert update_champion(name, "pixel_AUPRO") == recalibrated
    better = add("inctrl", 0.7)
    assert update_champion(name, "pixel_AUPRO") == better
    worse = add("metauas", 0.4)
    assert update_champion(name, "pixel_AUPRO") == better
    assert version_of(name, "champion-metauas") == recalibrated != worse
    assert version_of(name, "champion-inctrl") == better
    assert nan not in {version_of(name, alias) for alias in ("champion", "champion-metauas", "champion-inctrl")}


def test_a_metric_tag_edited_to_text_is_skipped_with_a_warning(
    registry_store: mlflow.MlflowClient, caplog: pytest.LogCaptureFixture
) -> None:
    from anomalib_uas.registry import update_champion, version_of

    client, name = registry_store, "anomalib-uas-unit"
    client.create_registered_model(name)
    versions = [
        client.create_model_version(name, "file:///nowhere", tags={"uas.model": "metauas"}).version for _ in "ab"
    ]
    client.set_model_version_tag(name, versions[0], "pixel_AUPRO", "0.900000")
    assert update_champion(name, "pixel_AUPRO") == versions[0]
    client.set_model_version_tag(name, versions[0], "pixel_AUPRO", "0.9 (checked by hand)")  # edited in the UI
    client.set_model_version_tag(name, versions[1], "pixel_AUPRO", "0.500000")
    with caplog.at_level("WARNING", logger="anomalib_uas.registry"):
        assert update_champion(name, "pixel_AUPRO") == versions[1]  # a later registration still chooses
    assert version_of(name, "champion-metauas") == versions[1]
    assert [record.getMessage() for record in caplog.records] == [
        f"Version {versions[0]} of {name} has pixel_AUPRO tag '0.9 (checked by hand)', which is not a number: "
        "it cannot become champion until the tag is fixed"
    ]


def test_serving_an_unregistered_category_is_one_line(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_uas.cli", "serve", "nope"],
        capture_output=True,
        text=True,
        env={**env, "HOME": str(tmp_path)},
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("uas serve: error: no registered model anomalib-uas-nope@")
    assert "Traceback" not in result.stderr


def test_error_rates_of_a_threshold() -> None:
    rates = error_rates(np.array([0, 0, 0, 0, 1, 1]), np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.4]), 0.5)
    assert rates == {"FP": 1, "FN": 1, "false_alarm_rate": 0.25, "miss_rate": 0.5}


def test_feedback_normals_join_each_models_own_few_shot_source(tmp_path: Path) -> None:
    import yaml

    from anomalib_uas.models import get_spec
    from anomalib_uas.params import load_params
    from anomalib_uas.stages.evaluate import build_arguments
    from anomalib_uas.stages.evaluation_inputs import Feedback

    def images(folder: Path, names: list[str]) -> list[str]:
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"")
        return [str(folder / name) for name in names]

    train = images(tmp_path / "dataset" / "brick" / "train" / "good", ["000.png", "001.png"])
    pool = images(tmp_path / "pool", ["a.png", "b.png", "c.png"])  # MetaUAS's many-category pool
    marked = images(tmp_path / "feedback", ["000.png"])
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["evaluate"].update(prompt_strategy="pool", few_shot_source=str(tmp_path / "pool"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    evaluate = load_params(tmp_path / "params.yaml").evaluate

    def arguments(model: str, feedback: Feedback) -> dict:
        spec = get_spec(model)
        return build_arguments(spec, spec.evaluation_kwargs(evaluate), tmp_path / "dataset", "brick", feedback)

    with_feedback, without = Feedback(normal=marked, hard=[]), Feedback(normal=[], hard=[])
    assert arguments("metauas", with_feedback)["few_shot_source"] == [*pool, *marked]
    assert arguments("inctrl", with_feedback)["few_shot_source"] == [*train, *marked]  # not MetaUAS's pool
    assert arguments("nearest_patch", with_feedback)["few_shot_source"] == [*train, *marked]
    assert arguments("metauas", without)["few_shot_source"] == str(tmp_path / "pool")
    assert "few_shot_source" not in arguments("inctrl", without)
    assert arguments("faprompt", with_feedback) == get_spec("faprompt").evaluation_kwargs(evaluate)
