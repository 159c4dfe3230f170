# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""``uas predict`` on a small folder with a registered MetaUAS (real offline EfficientNet-Lite0 encoder, 64 px)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from decisions import fixed_decision
from PIL import Image

from anomalib_uas import registry, tracking
from anomalib_uas.cli import main
from anomalib_uas.models import MetaUAS
from anomalib_uas.models.metauas.checkpoint import to_official
from anomalib_uas.predict import COLUMNS, predict_folder
from anomalib_uas.review import predict_dataset_name

pytestmark = pytest.mark.slow

KWARGS = {"image_size": 64, "backbone": "efficientnet_lite0", "k_shot": 1, "prompt_strategy": "random", "seed": 0}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, demo_category: str) -> Iterator[dict]:
    """Version 1 at threshold 0.5; version 2, the champion, at the median score of the folder."""
    root = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous, cwd = os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)
    torch.manual_seed(0)
    torch.save(to_official(MetaUAS(pretrained_backbone=True, image_size=64).model), root / "metauas.pth")
    normal = sorted((demo_root / demo_category / "train" / "good").glob("*.png"))
    folder = root / "incoming"
    for path in sorted((demo_root / demo_category / "test").glob("*/*.png")):
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "broken.png").write_bytes(b"not an image")

    def register(threshold: float, metric: float) -> str:
        servable = registry.ServableModel(
            model="metauas",
            category=demo_category,
            checkpoint=root / "metauas.pth",
            prompt_paths=normal[:1],
            config={"model": "metauas", "category": demo_category, "kwargs": KWARGS,
                    **fixed_decision(threshold, 0.5)},
            example_image=normal[0],
        )  # fmt: skip
        with tracking.stage_run("evaluate", "metauas", {"evaluate": {"k_shot": 1}}):
            return registry.register_model(servable, {"pixel_AUPRO": metric}, "pixel_AUPRO").version

    first = register(0.5, 0.1)
    name = registry.registered_name(demo_category)
    images = sorted(str(p) for p in folder.glob("*/*.png"))
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{first}")
    scores = pyfunc.predict(pd.DataFrame({"image_path": images}), params={"map_format": "none"})["pred_score"]
    reference = dict(zip(images, scores.tolist(), strict=True))
    threshold = float(np.median(scores))
    second = register(threshold, 0.9)
    os.chdir(cwd)
    yield {"uri": uri, "root": root, "folder": folder, "name": name, "versions": (first, second),
           "reference": reference, "threshold": threshold}  # fmt: skip
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def test_a_version_that_changes_only_thresholds_reuses_the_graph(registered: dict) -> None:
    client = mlflow.MlflowClient(registered["uri"])
    first, second = (client.get_model_version(registered["name"], v) for v in registered["versions"])
    assert first.tags[registry.GRAPH_KEY_TAG] == second.tags[registry.GRAPH_KEY_TAG]
    assert registry.GRAPH_FROM_TAG not in first.tags
    assert second.tags[registry.GRAPH_FROM_TAG] == str(first.version)
    graphs = [
        Path(mlflow.artifacts.download_artifacts(f"models:/{registered['name']}/{v}/artifacts/graph/model.onnx"))
        for v in registered["versions"]
    ]
    assert graphs[0].read_bytes() == graphs[1].read_bytes()


def _rows(table: Path) -> list[dict[str, str]]:
    with table.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_table_maps_contact_sheet_and_review_dataset(registered: dict, demo_category: str) -> None:
    from anomalib_uas.review import fo

    output = registered["root"] / "out"
    command = [sys.executable, "-m", "anomalib_uas.cli", "predict", str(registered["folder"]), "--category",
               demo_category, "--output", str(output), "--review"]  # fmt: skip
    result = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert re.search(r"uas predict .*\d+/\d+ \[", result.stderr), "no progress bar"
    champion = f"models:/{registered['name']}/{registered['versions'][1]}"
    assert champion in result.stdout

    rows = _rows(output / "predictions.csv")
    assert tuple(rows[0]) == COLUMNS
    reference, threshold = registered["reference"], registered["threshold"]
    assert [row["path"] for row in rows] == sorted([*reference, str(registered["folder"] / "broken.png")])
    broken = next(row for row in rows if row["path"].endswith("broken.png"))
    assert "Cannot read" in broken["error"]
    assert broken["score"] == ""
    scored = [row for row in rows if not row["error"]]
    for row in scored:
        score = float(row["score"])
        assert score == pytest.approx(reference[row["path"]], abs=1e-5)
        assert float(row["threshold"]) == pytest.approx(threshold)
        assert row["threshold_version"] == fixed_decision(threshold, 0.5)["threshold_version"]
        assert row["label"] == ("anomaly" if score > threshold else "normal")
        mask = np.asarray(Image.open(output / row["mask"]))
        assert mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(output / row["heatmap"])).shape == (64, 64)
    flagged = sorted((row for row in scored if row["label"] == "anomaly"), key=lambda row: -float(row["score"]))
    assert 0 < len(flagged) < len(scored)

    page = (output / "flagged.html").read_text()
    shown = [float(value) for value in re.findall(r"<b>([0-9.]+)</b>", page)]
    assert shown == pytest.approx([float(row["score"]) for row in flagged], abs=1e-4)
    assert not re.search(r"(src|href)=\"https?:", page)  # offline: every image is embedded

    dataset = fo.load_dataset(predict_dataset_name(demo_category))
    try:
        assert len(dataset) == len(scored)
        assert set(dataset.values("model")) == {"metauas"}
        assert len(dataset.load_saved_view("flagged")) == len(flagged)
        sample = dataset.match(fo.ViewField("filepath") == scored[0]["path"]).first()
        assert sample.anomaly_score == pytest.approx(float(scored[0]["score"]))
        assert Path(sample.pred_mask.mask_path).is_file()
        sample.tags.append("feedback:normal")
        sample.save()
        predict_folder(registered["folder"], demo_category, output=output, review=True)  # scored again: updated
        assert len(dataset) == len(scored)
        assert "feedback:normal" in dataset[sample.id].tags
    finally:
        dataset.delete()


def test_predict_with_another_logged_model(registered: dict, demo_category: str, tmp_path: Path) -> None:
    uri = f"models:/{registered['name']}/{registered['versions'][0]}"
    result = predict_folder(registered["folder"], demo_category, checkpoint=uri, output=tmp_path)
    assert result.model_uri == uri
    rows = [row for row in _rows(result.csv) if not row["error"]]
    assert {float(row["threshold"]) for row in rows} == {0.5}


def test_predict_dot_never_scores_its_own_outputs_or_hidden_files(
    registered: dict, demo_category: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in sorted(registered["folder"].glob("*/*.png"))[:3]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    monkeypatch.chdir(folder)
    before = sorted(path.name for path in folder.iterdir())
    for _ in range(2):
        result = predict_folder(".", demo_category)
        assert (result.images, result.errors) == (3, 0)
    assert result.csv == tmp_path / "predict" / demo_category / "incoming" / "predictions.csv"
    assert sorted(path.name for path in folder.iterdir()) == before
    inside = predict_folder(".", demo_category, output=Path("review"))  # asked for: written, never scored
    assert inside.images == 3
    assert (folder / "review" / ".uas-predict").is_file()
    assert predict_folder(".", demo_category).images == 3


def test_an_image_over_the_predict_bound_names_the_predict_option(
    registered: dict, demo_category: str, tmp_path: Path
) -> None:
    result = predict_folder(registered["folder"], demo_category, output=tmp_path, max_megapixels=0.001)
    rows = _rows(result.csv)
    assert result.errors == len(rows) > 0
    images = [row for row in rows if not row["path"].endswith("broken.png")]
    assert all("the limit per row in process (uas predict --max-megapixels)" in row["error"] for row in images)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{root}/nowhere", "--category", "{category}"], "does not exist"),
        (["{root}/empty", "--category", "{category}"], "image"),
        (["{root}/incoming", "--category", "unknown"], "No registered model anomalib-uas-unknown@champion"),
        (["{root}/incoming", "--category", "{category}", "--model", "inctrl"], "@champion-inctrl"),
        (["{root}/incoming", "--category", "{category}", "--checkpoint", "{root}"], "neither a model URI"),
        (["{root}/incoming", "--category", "{category}", "--max-megapixels", "nan"], "--max-megapixels must be"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    registered: dict, demo_category: str, arguments: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    (registered["root"] / "empty").mkdir(exist_ok=True)
    argv = ["predict", *(a.format(root=registered["root"], category=demo_category) for a in arguments)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("uas predict: error:")
    assert message in error
    assert "\n" not in error


def test_missing_tracking_store_is_one_line(
    registered: dict, demo_category: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registered['root'] / 'nothing.db'}")
    assert main(["predict", str(registered["folder"]), "--category", demo_category]) == 2
    assert "No MLflow store" in capsys.readouterr().err
    assert not (registered["root"] / "nothing.db").exists()
