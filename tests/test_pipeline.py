# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""`dvc repro` of the real pipeline on a tiny params profile in a temporary git repository."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from pipeline_repo import make_repo, run_command, served_predictions, stages_run

pytestmark = pytest.mark.slow


def _tiny(params: dict[str, Any]) -> None:
    params["data"].update(categories=["brick", "grass"], image_size=64, train_normals=8, test_normals=4)
    params["evaluate"].update(image_size=64)
    # a threshold that about half the held-out normals exceed (the median of 7): the 3-step checkpoint's scores are
    # close to noise, so test normals above it (the false alarms the feedback test marks) do not hinge on one draw
    params["calibrate"] = {"target_fpr": 0.5, "confidence": 0.5}
    params["train"]["metauas"].update(image_size=64, max_steps=3, batch_size=2, num_pairs=8)


@pytest.fixture(scope="module")
def first_repro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """The repository after its first `dvc repro`, and that run's output."""
    root = tmp_path_factory.mktemp("project")
    env = make_repo(root, _tiny)
    return root, env, run_command(["dvc", "repro"], root, env)


@pytest.fixture
def project(first_repro: tuple[Path, dict[str, str], str]) -> tuple[Path, dict[str, str]]:
    """The reproduced repository: every test leaves it reproduced (a test that changes it puts it back)."""
    root, env, _ = first_repro
    return root, env


def test_repro_evaluates_skips_and_reports(first_repro: tuple[Path, dict[str, str], str]) -> None:
    root, env, output = first_repro
    per_model = {f"{stage}@metauas" for stage in ("weights", "evaluate", "calibrate", "register")}
    assert {"data", "report", "review", *per_model} <= stages_run(output)
    metrics = json.loads((root / "reports" / "metauas" / "metrics.json").read_text())
    assert metrics["skipped"] == 0
    assert set(metrics["categories"]) == {"brick", "grass"}
    for row in metrics["categories"].values():
        assert {"image_AUROC", "pixel_AUPRO", "ms_per_image"} <= set(row)
    saved = np.load(root / "predictions" / "metauas" / "brick" / "predictions.npz")
    assert saved["anomaly_map"].shape[1:] == (64, 64)
    assert len(saved["pred_score"]) == len(saved["gt_label"]) == len(saved["image_path"])
    for model in ("inctrl", "faprompt"):
        assert json.loads((root / "reports" / model / "metrics.json").read_text()) == {"skipped": 1}
        assert (
            "is skipped because files it needs"
            in json.loads((root / "predictions" / model / "evaluation.json").read_text())["skipped"]
        )
    report = (root / "reports" / "report.md").read_text()
    assert "| metauas | brick |" in report
    assert "skipped" in report
    page = (root / "reports" / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "<script" not in page
    assert "http" not in page.split("<body>")[1].split("weights:")[0]
    assert "metauas" in run_command(["dvc", "metrics", "show"], root, env)
    review = json.loads((root / "reports" / "review.json").read_text())
    assert review["uas-metauas-brick"]["samples"] == len(saved["pred_score"])

    calibration = json.loads((root / "calibration" / "metauas" / "calibration.json").read_text())
    decision = calibration["categories"]["brick"]["decision"]
    assert decision["threshold_basis"]["normals"] == {"held_out": 7, "feedback": 0}  # 8 train images, 1 prompt
    assert calibration["categories"]["brick"]["test"]["normal"] == 4
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("anomalib-uas-brick", "champion-metauas")
    assert champion.tags["uas.model"] == "metauas"
    assert champion.tags["uas.threshold_version"] == decision["threshold_version"]
    registered = json.loads((root / "registered" / "metauas" / "registered.json").read_text())
    assert registered["categories"]["brick"]["version"] == champion.version
    assert float(champion.tags["pixel_AUPRO"]) == pytest.approx(metrics["categories"]["brick"]["pixel_AUPRO"], abs=1e-6)
    experiment = client.get_experiment_by_name("anomalib-uas").experiment_id
    training = client.search_runs([experiment], "tags.`uas.stage` = 'train'")[0]
    assert training.data.params["train.metauas.max_steps"] == "3"
    assert training.data.metrics["train_minutes"] > 0
    status = json.loads((root / "checkpoints" / "metauas" / "status.json").read_text())
    assert status["mlflow_run_id"] == training.info.run_id
    assert "meta-trained offline" in status["description"]
    runs = client.search_runs([experiment], "tags.`uas.stage` = 'evaluate'")
    run = next(r for r in runs if r.data.tags.get("uas.model") == "metauas")
    assert run.data.metrics["brick.image_AUROC"] == pytest.approx(metrics["categories"]["brick"]["image_AUROC"])
    assert run.data.params["evaluate.k_shot"] == "1"
    assert run.data.tags["dvc.data.md5"]
    assert run.data.tags["mlflow.source.git.commit"]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"reports", "plots", "overlays"} <= artifacts
    overlays = [item.path for item in client.list_artifacts(run.info.run_id, "overlays")]
    assert overlays
    assert all(path.startswith("overlays/brick-") or path.startswith("overlays/grass-") for path in overlays)
    assert [item.path for item in client.list_artifacts(run.info.run_id, "plots")] == ["plots/roc.png"]
    report_run = client.search_runs([experiment], "tags.`uas.stage` = 'report'")[0]
    names = {item.path for item in client.list_artifacts(report_run.info.run_id, "report")}
    assert names == {"report/report.md", "report/report.html"}


def test_the_nearest_patch_model_runs_through_every_stage_and_bounds_the_champion(
    first_repro: tuple[Path, dict[str, str], str],
) -> None:
    """The baseline model, one folder plus its lines in params.yaml, is weighted, scored, registered and reviewed."""
    root, _, output = first_repro
    per_model = {f"{stage}@nearest_patch" for stage in ("weights", "evaluate", "calibrate", "register")}
    assert per_model <= stages_run(output)
    status = json.loads((root / "checkpoints" / "nearest_patch" / "status.json").read_text())
    assert status["description"] == "ImageNet efficientnet_lite0, no training"
    metrics = json.loads((root / "reports" / "nearest_patch" / "metrics.json").read_text())
    assert metrics["skipped"] == 0
    report = (root / "reports" / "report.md").read_text()
    review = json.loads((root / "reports" / "review.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for category in ("brick", "grass"):
        assert f"| nearest_patch | {category} |" in report
        saved = np.load(root / "predictions" / "nearest_patch" / category / "predictions.npz")
        assert ((saved["pred_score"] >= 0) & (saved["pred_score"] < 1)).all()
        assert review[f"uas-nearest_patch-{category}"]["samples"] == len(saved["pred_score"])
        baseline = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion-nearest_patch")
        assert baseline.tags["uas.runtime"] == "onnx", baseline.tags.get("uas.graph_check")
        champion = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion")
        assert float(champion.tags["pixel_AUPRO"]) >= metrics["categories"][category]["pixel_AUPRO"] - 5e-7  # tag: .6f


def test_second_repro_runs_nothing_and_a_param_reruns_only_dependents(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    # the feedback stage reads the FiftyOne database, which DVC cannot hash: it always runs, and its unchanged
    # output reruns nothing downstream
    assert stages_run(run_command(["dvc", "repro"], root, env)) == {"feedback"}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["k_shot"] = 2
    params["registry"]["register"] = False  # checked by the first repro; the later ones skip the ONNX exports
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(run_command(["dvc", "repro"], root, env))
    assert {"evaluate@metauas", "calibrate@metauas", "register@metauas", "report"} <= ran
    assert not {"data", "weights@metauas"} & ran


def test_a_new_target_recalibrates_registers_and_reviews_without_engine_test(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, env = project
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("anomalib-uas").experiment_id
    evaluations = len(client.search_runs([experiment], "tags.`uas.stage` = 'evaluate'"))
    before = json.loads((root / "calibration" / "metauas" / "calibration.json").read_text())["categories"]
    try:
        with _restored(root, tmp_path, "calibration", "registered", "reports", "review"):
            params = yaml.safe_load((root / "params.yaml").read_text())
            params["calibrate"]["target_fpr"] = 0.2
            params["registry"]["register"] = True
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            ran = stages_run(run_command(["dvc", "repro"], root, env))
            after = json.loads((root / "calibration" / "metauas" / "calibration.json").read_text())["categories"]
            summary = json.loads((root / "reports" / "review.json").read_text())
            record = (root / "registered" / "metauas" / "registered.json").read_text()
            count = len(client.search_model_versions("name='anomalib-uas-brick'"))
            run_command(["dvc", "repro", "-f", "-s", "register@metauas"], root, env)  # same inputs: no new version
            assert (root / "registered" / "metauas" / "registered.json").read_text() == record
            assert len(client.search_model_versions("name='anomalib-uas-brick'")) == count
    finally:  # the review datasets live in the database: build them again at the restored decisions
        run_command(["dvc", "repro", "-f", "-s", "review"], root, env)
    # registry.register is on again (the test before turned it off), so every register stage reads new params
    models = ("metauas", "inctrl", "faprompt", "nearest_patch")
    per_model = {f"{stage}@{model}" for stage in ("calibrate", "register") for model in models}
    assert ran == {"feedback", "report", "review", *per_model}
    assert len(client.search_runs([experiment], "tags.`uas.stage` = 'evaluate'")) == evaluations  # no Engine.test
    for category in ("brick", "grass"):
        decision = after[category]["decision"]
        assert decision["threshold_basis"]["image"]["target_fpr"] == 0.2
        assert decision["image_threshold"] >= before[category]["decision"]["image_threshold"]
        assert after[category]["previous"]["threshold_version"] == before[category]["decision"]["threshold_version"]
        versions = client.search_model_versions(f"name='anomalib-uas-{category}'")
        newest = max(
            (version for version in versions if version.tags["uas.model"] == "metauas"),
            key=lambda version: int(version.version),
        )
        assert newest.tags["uas.threshold_version"] == decision["threshold_version"]
        champion = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion-metauas")
        assert champion.version == newest.version  # equal metrics: the model's newest decision deploys
        assert summary[f"uas-metauas-{category}"]["FP"] == after[category]["test"]["FP"]


def _snapshot(root: Path) -> dict[str, str]:
    """Content hash of every stage output."""
    files = {}
    for folder in ("data/dataset", "checkpoints", "predictions", "reports"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(root))] = hashlib.md5(path.read_bytes()).hexdigest()
    return files


def _set(params: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        params = params[part]
    params[last] = value


# Every check a stage makes itself, and one parameter-schema error per stage (the schema's messages are tested one by
# one in test_params.py; they all reach `dvc repro` through the same `run_stage`).
FAILURES = [
    ("data", "data.dataset", "dmeo", "data.dataset = 'dmeo' is not allowed"),
    ("data", "data.dataset", "folder", "data.folder.normal_dir = 'datasets/mine/good' is not a folder"),
    ("data", "data.categories", ["nope"], "data.categories ['nope'] are not demo categories"),
    ("weights@metauas", "weights.metauas", "metauas-1024", "weights.metauas = 'metauas-1024' is neither"),
    ("weights@metauas", "weights.metauas", "metauas-512", "metauas-512.ckpt"),
    ("weights@metauas", "weights.metauas", "params.yaml", "params.yaml is not a MetaUAS checkpoint"),
    ("weights@inctrl", "weights.inctrl", "missing/inctrl.pyth", "weights.inctrl = 'missing/inctrl.pyth' is neither"),
    ("evaluate@metauas", "data.categories", ["nope"], "data.categories ['nope'] are not in data/dataset"),
    ("evaluate@metauas", "evaluate.k_shot", "two", "evaluate.k_shot = 'two' is not allowed"),
    ("report", "models", ["metauas", "yolo"], "models.1 = 'yolo' is not allowed"),
]


@pytest.mark.parametrize(("stage", "key", "value", "expected"), FAILURES, ids=[f"{f[0]}-{f[1]}" for f in FAILURES])
def test_bad_input_is_one_line_and_loses_nothing(
    project: tuple[Path, dict[str, str]], stage: str, key: str, value: Any, expected: str
) -> None:
    root, env = project
    original = (root / "params.yaml").read_text()
    before = _snapshot(root)
    params = yaml.safe_load(original)
    _set(params, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = subprocess.run(
            ["dvc", "repro", "--single-item", stage], cwd=root, env=env, capture_output=True, text=True, check=False
        )
    finally:
        (root / "params.yaml").write_text(original)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("uas ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert expected in errors[0]
    assert "Traceback" not in result.stderr
    assert _snapshot(root) == before


@contextlib.contextmanager
def _restored(root: Path, keep: Path, *paths: str) -> Iterator[None]:
    """Put ``dvc.lock``, ``params.yaml`` and ``paths`` back as they were: the next `dvc repro` has nothing to rerun."""
    paths = ("dvc.lock", "params.yaml", *paths)
    for path in paths:
        (shutil.copytree if (root / path).is_dir() else shutil.copy)(root / path, keep / path)
    try:
        yield
    finally:
        for path in paths:
            if (keep / path).is_dir():
                shutil.rmtree(root / path, ignore_errors=True)
                shutil.copytree(keep / path, root / path)
            else:
                shutil.copy(keep / path, root / path)


def test_a_trained_checkpoint_as_weights_source_needs_no_architecture(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, env = project
    checkpoints = root / "checkpoints" / "metauas"
    trained = tmp_path / "trained-metauas.pth"
    shutil.copy(checkpoints / "metauas.pth", trained)
    params = yaml.safe_load((root / "params.yaml").read_text())
    recipe = params["train"]["metauas"]
    params["weights"]["metauas"] = str(trained)
    with _restored(root, tmp_path, "checkpoints"):
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_command(["dvc", "repro", "--single-item", "weights@metauas"], root, env)
        status = json.loads((checkpoints / "status.json").read_text())
    assert status["status"] == "ready"
    assert status["kwargs"] == {key: recipe[key] for key in ("backbone", "fusion", "decoder_channels")}
    assert status["description"].endswith("trained at 64 px")
    assert status["checkpoint"] == "metauas.pth"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "params.yaml is empty"), ("data: [brick\n", "params.yaml is not valid YAML at line 2")],
)
def test_unreadable_params_fail_every_stage_cleanly(
    project: tuple[Path, dict[str, str]], text: str, expected: str
) -> None:
    root, env = project
    original = (root / "params.yaml").read_text()
    before = _snapshot(root)
    (root / "params.yaml").write_text(text)
    try:
        result = subprocess.run(
            ["python", "pipelines/evaluate.py", "metauas"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        (root / "params.yaml").write_text(original)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"uas evaluate: error: {expected}")
    assert _snapshot(root) == before


def test_feedback_normals_lower_the_false_positives_of_their_category(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from anomalib_uas.feedback import NORMAL_TAG
    from anomalib_uas.review import F, fo

    root, env = project
    calibration = root / "calibration" / "metauas" / "calibration.json"
    before = json.loads(calibration.read_text())["categories"]
    # the category with more false alarms gets the feedback, the other one none
    marked = max(before, key=lambda category: before[category]["test"]["FP"])
    dataset = fo.load_dataset(f"uas-metauas-{marked}")
    false_positives = dataset.match(F("eval") == "FP")
    assert len(false_positives) == before[marked]["test"]["FP"] > 0
    with _restored(root, tmp_path, "data/feedback", "predictions", "calibration", "registered", "reports", "review"):
        false_positives.tag_samples(NORMAL_TAG)
        try:
            _assert_feedback_is_used(root, env, before, marked)
        finally:  # the database is shared by the session: leave no marks for the other pipeline tests
            dataset.untag_samples(NORMAL_TAG)


def _assert_feedback_is_used(root: Path, env: dict[str, str], before: dict[str, Any], marked: str) -> None:
    (other,) = set(before) - {marked}
    evaluation = root / "predictions" / "metauas" / "evaluation.json"
    untouched = (root / "predictions" / "metauas" / other / "predictions.npz").read_bytes()
    alarms = before[marked]["test"]["FP"]

    ran = stages_run(run_command(["dvc", "repro"], root, env))
    assert {"feedback", "evaluate@metauas", "calibrate@metauas", "register@metauas", "report", "review"} <= ran
    assert not {"data", "weights@metauas"} & ran
    assert len(list((root / "data" / "feedback" / marked / "normal").iterdir())) == alarms
    provenance = json.loads((root / "data" / "feedback" / marked / "provenance.json").read_text())
    assert {mark["dataset"] for entry in provenance["normal"] for mark in entry["marks"]} == {f"uas-metauas-{marked}"}
    after = json.loads(evaluation.read_text())
    assert (after["evaluated"], after["reused"]) == ([marked], [other])  # the category with feedback only
    assert after["feedback"][marked] == {"normal": alarms, "hard": 0}
    calibrated = json.loads((root / "calibration" / "metauas" / "calibration.json").read_text())["categories"]
    prompted = sum("/feedback/" in path for path in after["prompt_paths"][marked])  # a prompt does not calibrate
    assert calibrated[marked]["decision"]["threshold_basis"]["normals"]["feedback"] == alarms - prompted
    assert calibrated[marked]["previous"]["FP"] == alarms
    assert calibrated[marked]["test"]["FP"] < alarms
    assert calibrated[other] == before[other]
    assert (root / "predictions" / "metauas" / other / "predictions.npz").read_bytes() == untouched
    saved = np.load(root / "predictions" / "metauas" / marked / "predictions.npz")
    tested = len(list((root / "data" / "dataset" / marked / "test").rglob("*.png")))
    assert len(saved["pred_score"]) == tested - alarms  # feedback images held out
    assert all(str(path).startswith(f"data/dataset/{marked}/test/") for path in saved["image_path"])
    report = (root / "reports" / "report.md").read_text()
    recalibration = report.split("Recalibration with feedback")[1]
    row = next(line for line in recalibration.splitlines() if line.startswith(f"| metauas | {marked} |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[4] == f"{alarms} -> {calibrated[marked]['test']['FP']}"  # false positives before and after
    assert stages_run(run_command(["dvc", "repro"], root, env)) == {"feedback"}


def test_push_pull_and_parameter_sweep(project: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = project
    remote = tmp_path / "store"
    run_command(["dvc", "remote", "add", "-d", "-f", "local", str(remote)], root, env)
    run_command(["dvc", "push"], root, env)
    assert any((remote / "files" / "md5").rglob("*"))
    shutil.rmtree(root / "data" / "dataset")
    run_command(["dvc", "pull"], root, env)
    assert sorted(p.name for p in (root / "data" / "dataset").iterdir()) == ["brick", "demo_manifest.json", "grass"]
    run_command(["git", "add", "-A"], root, env)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], root, env)
    # the sweep reruns evaluation; registering (an ONNX export per category) is tested above and skipped here
    run_command(
        ["dvc", "exp", "run", "-S", "evaluate.seed=1", "-S", "registry.register=false", "-n", "seed1"], root, env
    )
    experiments = run_command(["dvc", "exp", "show", "--json"], root, env)
    assert "seed1" in experiments


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file below ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_a_copy_whose_original_moved_away_reproduces_registers_and_serves_inside_itself(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    import sqlite3

    root, env = project
    copy, away = tmp_path / "copy", root.with_name(f"{root.name}-away")
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    root.rename(away)
    try:
        before = _tree(away)
        params = yaml.safe_load((copy / "params.yaml").read_text())
        params["evaluate"]["seed"] = 7  # evaluate again, and register: a new version logged in the copy
        params["registry"]["register"] = True
        (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        copy_env = {**env, "UAS_WEIGHTS_DIR": str(copy / "empty-cache")}
        assert "evaluate@metauas" in stages_run(run_command(["dvc", "repro"], copy, copy_env))
        image = sorted((copy / "data" / "dataset" / "brick" / "test").rglob("*.png"))[0]
        (row,) = served_predictions(["uas", "serve", "brick"], [image], copy, copy_env)
        assert 0 <= row["pred_score"] <= 1
        with contextlib.closing(sqlite3.connect(copy / "mlflow.db")) as database:
            columns = [("experiments", "artifact_location"), ("runs", "artifact_uri")]
            columns += [("model_versions", "storage_location"), ("logged_models", "artifact_location")]
            locations = [
                value
                for table, column in columns
                for (value,) in database.execute(f"SELECT {column} FROM {table}")
                if value and "mlartifacts" in value
            ]
        assert locations
        assert all(str(copy) in value and str(root) not in value for value in locations)
        assert not root.exists()  # nothing recreated at the original's place
        assert _tree(away) == before  # nothing written to the original
    finally:
        away.rename(root)
