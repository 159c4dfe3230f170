# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""`dvc repro` of the real pipeline on a tiny params profile in a temporary git repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from pipeline_repo import make_repo, run_command, stages_run

pytestmark = pytest.mark.slow


def _tiny(params: dict[str, Any]) -> None:
    params["data"].update(categories=["brick", "grass"], image_size=64)
    params["evaluate"].update(image_size=64)
    params["train"]["metauas"].update(image_size=64, max_steps=3, batch_size=2, num_pairs=8)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("project")
    return root, make_repo(root, _tiny)


def test_repro_evaluates_skips_and_reports(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    output = run_command(["dvc", "repro"], root, env)
    assert {"data", "weights@metauas", "evaluate@metauas", "report", "review"} <= stages_run(output)
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
        assert json.loads((root / "reports" / model / "skipped.json").read_text())["reason"]
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

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("anomalib-uas-brick", "champion")
    assert champion.tags["uas.model"] == "metauas"
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


def test_second_repro_runs_nothing_and_a_param_reruns_only_dependents(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    assert stages_run(run_command(["dvc", "repro"], root, env)) == set()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["k_shot"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(run_command(["dvc", "repro"], root, env))
    assert "evaluate@metauas" in ran
    assert "report" in ran
    assert not {"data", "weights@metauas"} & ran


def test_missing_weights_are_skipped_with_the_fix(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["weights"]["metauas"] = "metauas-512"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_command(["dvc", "repro"], root, env)
    reason = json.loads((root / "reports" / "metauas" / "skipped.json").read_text())["reason"]
    assert "metauas-512.ckpt" in reason
    assert "UAS_WEIGHTS_DIR" in reason
    assert "weights/metauas/metauas-512.ckpt" in reason
    assert "**metauas** skipped" in (root / "reports" / "report.md").read_text()


def test_push_pull_and_parameter_sweep(project: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = project
    run_command(["dvc", "repro"], root, env)
    remote = tmp_path / "store"
    run_command(["dvc", "remote", "add", "-d", "-f", "local", str(remote)], root, env)
    run_command(["dvc", "push"], root, env)
    assert any((remote / "files" / "md5").rglob("*"))
    shutil.rmtree(root / "data" / "dataset")
    run_command(["dvc", "pull"], root, env)
    assert sorted(p.name for p in (root / "data" / "dataset").iterdir()) == ["brick", "demo_manifest.json", "grass"]
    run_command(["git", "add", "-A"], root, env)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], root, env)
    run_command(["dvc", "exp", "run", "-S", "evaluate.seed=1", "-n", "seed1"], root, env)
    experiments = run_command(["dvc", "exp", "show", "--json"], root, env)
    assert "seed1" in experiments
