# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The README's flows, run as a user runs them, on the outputs the main job left in this checkout.

``.ci/run`` runs the main job exactly as the README says (``bash scripts/run.sh``, offline), then the README's test
command with ``UAS_ACCEPTANCE=1``, which selects these tests. They work on the checkout's own files (relative
paths, the trained checkpoint at its real size, ``mlflow.db``, the user's FiftyOne database) and change them as a
user would: reviewers' tags, feedback, further ``dvc repro`` runs. Without ``UAS_ACCEPTANCE=1`` they are skipped,
so that the suite never changes a developer's checkout unasked.

The tests run in file order, each on the state the previous one left.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from pipeline_repo import REPO, run_command, served_predictions, stages_run

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(
        os.environ.get("UAS_ACCEPTANCE") != "1",
        reason="acceptance tests run on the main job's outputs: bash scripts/run.sh, then UAS_ACCEPTANCE=1",
    ),
]

REVIEWED = {"tag": "reviewed-by-qa", "field": "defect_class", "value": "scratch", "note": "checked twice"}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """The user's environment: the default FiftyOne database and MLflow store of the checkout, offline."""
    user = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI",)}
    database = os.environ.get("UAS_USER_FIFTYONE_DATABASE_DIR")  # conftest moves the suite to a private database
    user.pop("FIFTYONE_DATABASE_DIR", None)
    if database:
        user["FIFTYONE_DATABASE_DIR"] = database
    user.update(UAS_OFFLINE="1", DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if not (REPO / "dvc.lock").is_file() or not (REPO / "reports" / "report.md").is_file():
        pytest.fail(f"No main-job outputs in {REPO}: run `bash scripts/run.sh` there first")
    return user


@pytest.fixture(scope="module")
def categories() -> list[str]:
    return yaml.safe_load((REPO / "params.yaml").read_text())["data"]["categories"]


def _fiftyone(code: str, env: dict[str, str]) -> Any:
    """Run FiftyOne code in the user's environment (their database); the code sets ``result``, returned as JSON."""
    script = "import json\nfrom anomalib_uas.review import F, fo\n" + textwrap.dedent(code)
    script += "\nprint(json.dumps(result))\n"
    output = run_command([sys.executable, "-c", script], REPO, env)
    return json.loads(output.strip().splitlines()[-1])


def _evaluation() -> dict[str, Any]:
    return json.loads((REPO / "predictions" / "metauas" / "evaluation.json").read_text())


def _calibration() -> dict[str, Any]:
    return json.loads((REPO / "calibration" / "metauas" / "calibration.json").read_text())["categories"]


def test_the_main_job_evaluated_registered_reported_and_reviewed(env: dict[str, str], categories: list[str]) -> None:
    metrics = json.loads((REPO / "reports" / "metauas" / "metrics.json").read_text())
    assert metrics["skipped"] == 0
    assert list(metrics["categories"]) == categories
    report = (REPO / "reports" / "report.md").read_text()
    assert all(f"| metauas | {category} |" in report for category in categories)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{REPO / 'mlflow.db'}")
    review = json.loads((REPO / "reports" / "review.json").read_text())
    calibration = _calibration()
    for category in categories:
        # the demo certifies 5 % at 95 % from its own normals, and the test rates respect the bound
        found = calibration[category]
        assert found["decision"]["threshold_basis"]["image"]["certified"], found["decision"]["threshold_basis"]
        assert found["test"]["within_bound"], found["test"]
        assert f"{100 * found['decision']['threshold_basis']['image']['certified_fpr']:.3g} %" in report
        champion = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion-metauas")
        assert champion.tags["uas.threshold_version"] == found["decision"]["threshold_version"]
        assert champion.tags["uas.runtime"] == "onnx", champion.tags.get("uas.graph_check")
        assert "of its range" in champion.tags["uas.graph_check"]
        saved = np.load(REPO / "predictions" / "metauas" / category / "predictions.npz")
        assert all(not Path(str(path)).is_absolute() for path in saved["image_path"])  # the pipeline's own paths
        assert review[f"uas-metauas-{category}"]["samples"] == len(saved["pred_score"])


def test_the_nearest_patch_baseline_ran_beside_metauas_and_the_champion_is_never_worse(
    env: dict[str, str], categories: list[str]
) -> None:
    """The training-free baseline is evaluated, registered and reviewed; the champion beats or equals it."""
    metric = yaml.safe_load((REPO / "params.yaml").read_text())["registry"]["champion_metric"]
    baseline = json.loads((REPO / "reports" / "nearest_patch" / "metrics.json").read_text())
    assert baseline["skipped"] == 0
    report = (REPO / "reports" / "report.md").read_text()
    review = json.loads((REPO / "reports" / "review.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{REPO / 'mlflow.db'}")
    for category in categories:
        assert f"| nearest_patch | {category} |" in report
        registered = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion-nearest_patch")
        assert registered.tags["uas.runtime"] == "onnx", registered.tags.get("uas.graph_check")
        champion = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion")
        assert float(champion.tags[metric]) >= baseline["categories"][category][metric] - 5e-7  # the tag has 6 decimals
        saved = np.load(REPO / "predictions" / "nearest_patch" / category / "predictions.npz")
        assert review[f"uas-nearest_patch-{category}"]["samples"] == len(saved["pred_score"])


def test_a_second_repro_runs_only_feedback(env: dict[str, str]) -> None:
    assert stages_run(run_command(["dvc", "repro"], REPO, env)) == {"feedback"}


def test_uas_predict_writes_its_outputs(env: dict[str, str], categories: list[str], tmp_path: Path) -> None:
    folder = Path("data") / "dataset" / categories[0] / "test"
    output = tmp_path / "inspection"
    printed = run_command(
        ["uas", "predict", str(folder), "--category", categories[0], "--output", str(output)], REPO, env
    )
    images = sorted((REPO / folder).rglob("*.png"))
    assert f"{len(images)} images scored" in printed
    with (output / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(images)
    assert not any(row["error"] for row in rows)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{REPO / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(f"anomalib-uas-{categories[0]}", "champion")  # whichever model
    version = champion.tags["uas.threshold_version"]
    for row in rows:
        assert (output / row["mask"]).is_file()
        assert (output / row["heatmap"]).is_file()
        assert row["threshold_version"] == version
    assert (output / "flagged.html").is_file()


def test_uas_serve_answers_with_the_evaluated_score(env: dict[str, str], categories: list[str]) -> None:
    category = categories[0]
    saved = np.load(REPO / "predictions" / "metauas" / category / "predictions.npz")
    image, evaluated = Path(str(saved["image_path"][-1])), float(saved["pred_score"][-1])
    (row,) = served_predictions(["uas", "serve", category, "--model", "metauas"], [REPO / image], REPO, env)
    assert row["pred_score"] == pytest.approx(evaluated, abs=1e-3)  # ONNX graph against Engine.test's eager forward
    decision = _calibration()[category]["decision"]
    assert row["pred_label"] == int(evaluated > decision["image_threshold"])
    assert row["threshold_version"] == decision["threshold_version"]


def _mark_one_sample(dataset: str, env: dict[str, str]) -> dict[str, Any]:
    return _fiftyone(
        f"""
        dataset = fo.load_dataset({dataset!r})
        sample = dataset.match(F("removed") == False).first()  # not a sample of another checkout
        sample.tags.append({REVIEWED["tag"]!r})
        sample.prediction[{REVIEWED["field"]!r}] = {REVIEWED["note"]!r}
        sample[{REVIEWED["field"]!r}] = {REVIEWED["value"]!r}
        sample.save()
        result = {{"filepath": sample.filepath, "count": len(dataset)}}
        """,
        env,
    )


def _reviewed_copies(dataset: str, filepath: str, env: dict[str, str]) -> dict[str, Any]:
    field = REVIEWED["field"]
    return _fiftyone(
        f"""
        dataset = fo.load_dataset({dataset!r})
        copies = dataset.match(F("filepath") == {filepath!r})
        result = {{
            "count": len(dataset),
            "copies": [
                {{"tags": s.tags, "removed": s.removed,
                  "field": s[{field!r}] if s.has_field({field!r}) else None,
                  "note": s.prediction[{field!r}] if s.prediction.has_field({field!r}) else None}}
                for s in copies
            ],
        }}
        """,
        env,
    )


def _assert_reviewed_once(state: dict[str, Any], count: int) -> None:
    assert state["count"] == count
    (copy,) = state["copies"]
    assert REVIEWED["tag"] in copy["tags"]
    assert (copy["field"], copy["note"], copy["removed"]) == (REVIEWED["value"], REVIEWED["note"], False)


@pytest.fixture(scope="module")
def reviewed(env: dict[str, str], categories: list[str]) -> dict[str, Any]:
    """One sample of the category without the most false alarms, tagged with a label attribute and a field."""
    calibration = _calibration()
    category = min(categories, key=lambda c: (calibration[c]["test"]["FP"], categories.index(c)))
    dataset = f"uas-metauas-{category}"
    return {"dataset": dataset, **_mark_one_sample(dataset, env)}


def test_reviewer_work_survives_a_forced_review_and_a_later_repro(
    env: dict[str, str], reviewed: dict[str, Any]
) -> None:
    assert stages_run(run_command(["dvc", "repro", "-f", "-s", "review"], REPO, env)) == {"review"}
    _assert_reviewed_once(_reviewed_copies(reviewed["dataset"], reviewed["filepath"], env), reviewed["count"])
    run_command(["dvc", "repro"], REPO, env)
    _assert_reviewed_once(_reviewed_copies(reviewed["dataset"], reviewed["filepath"], env), reviewed["count"])


def test_a_more_sensitive_target_recalibrates_without_engine_test(env: dict[str, str]) -> None:
    """A user asks for more sensitivity: a higher false-alarm target at a lower confidence lowers the thresholds.

    The certified demo thresholds leave few test false alarms; the next test marks some as normal.
    """
    before = _calibration()
    evaluation = (REPO / "predictions" / "metauas" / "evaluation.json").read_bytes()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["calibrate"] = {"target_fpr": 0.3, "confidence": 0.5}
    (REPO / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(run_command(["dvc", "repro"], REPO, env))
    assert {"calibrate@metauas", "register@metauas", "report", "review"} <= ran
    assert not {stage for stage in ran if stage.startswith(("evaluate@", "weights@", "data"))}
    assert (REPO / "predictions" / "metauas" / "evaluation.json").read_bytes() == evaluation  # no Engine.test
    after = _calibration()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{REPO / 'mlflow.db'}")
    for category, found in after.items():
        assert found["decision"]["image_threshold"] < before[category]["decision"]["image_threshold"]
        assert found["previous"]["threshold_version"] == before[category]["decision"]["threshold_version"]
        champion = client.get_model_version_by_alias(f"anomalib-uas-{category}", "champion-metauas")
        assert champion.tags["uas.threshold_version"] == found["decision"]["threshold_version"]  # served from now


def test_false_positives_marked_normal_leave_the_false_positive_count(
    env: dict[str, str], categories: list[str], reviewed: dict[str, Any]
) -> None:
    evaluation = _evaluation()
    before = _calibration()
    marked = max(categories, key=lambda c: (before[c]["test"]["FP"], -categories.index(c)))
    earlier = evaluation["feedback"][marked]["normal"]  # feedback normals from earlier marks stay
    alarms = before[marked]["test"]["FP"]
    assert alarms > 0, f"the test false alarms: { {c: before[c]['test']['FP'] for c in categories} }"
    tagged = _fiftyone(
        f"""
        from anomalib_uas.feedback import NORMAL_TAG
        view = fo.load_dataset("uas-metauas-{marked}").load_saved_view("false_positives")
        view.tag_samples(NORMAL_TAG)
        result = view.values("filepath")
        """,
        env,
    )
    assert len(tagged) == alarms
    ran = stages_run(run_command(["dvc", "repro"], REPO, env))
    assert {"feedback", "evaluate@metauas", "calibrate@metauas", "register@metauas", "report", "review"} <= ran
    assert not {"data", "weights@metauas"} & ran
    after = _evaluation()
    assert after["evaluated"] == [marked]
    assert after["feedback"][marked] == {"normal": earlier + alarms, "hard": 0}
    calibrated = _calibration()[marked]
    assert calibrated["previous"]["FP"] == alarms
    normals = before[marked]["decision"]["threshold_basis"]["normals"]
    prompted = sum("/feedback/" in path for path in after["prompt_paths"][marked])  # a prompt does not calibrate
    assert calibrated["decision"]["threshold_basis"]["normals"]["feedback"] == normals["feedback"] + alarms - prompted
    # the marked images are normals of the threshold now, out of the test set and out of the false positives; the
    # feedback normals also join the prompt pool, so the other test images are scored anew
    saved = np.load(REPO / "predictions" / "metauas" / marked / "predictions.npz")
    tested = {str((REPO / str(path)).resolve()) for path in saved["image_path"]}
    assert not tested & set(tagged)
    state = _fiftyone(
        f"""
        dataset = fo.load_dataset("uas-metauas-{marked}")
        result = {{"false_positives": dataset.load_saved_view("false_positives").values("filepath"),
                   "removed": dataset.load_saved_view("removed").values("filepath")}}
        """,
        env,
    )
    assert not set(state["false_positives"]) & set(tagged)
    assert set(tagged) <= set(state["removed"])
    assert len(state["false_positives"]) == calibrated["test"]["FP"]
    _assert_reviewed_once(_reviewed_copies(reviewed["dataset"], reviewed["filepath"], env), reviewed["count"])
    assert stages_run(run_command(["dvc", "repro"], REPO, env)) == {"feedback"}
