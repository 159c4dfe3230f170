# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The false-alarm guarantee of the calibrated thresholds, by simulation, and the calibrate stage on its files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from anomalib_uas.calibration import (
    certified_threshold,
    clopper_pearson,
    decide,
    exceedance_probability,
    normals_needed,
)
from anomalib_uas.stages import StageError
from anomalib_uas.stages.calibrate import main as calibrate

REPO = Path(__file__).resolve().parents[1]
DRAWS = 4000


def _share_exceeding(
    rng: np.random.Generator, normals: int, target: float, confidence: float, sample, survival
) -> tuple[float, int]:
    """Share of calibration draws whose threshold's true false-alarm rate exceeds the target, and the rank used."""
    exceeded, ranks = 0, set()
    for _ in range(DRAWS):
        found = certified_threshold(sample(rng, normals), target, confidence)
        ranks.add(found.rank)
        exceeded += survival(found.threshold) > target
    assert len(ranks) == 1  # the rank depends on n, the target and the confidence only
    return exceeded / DRAWS, ranks.pop()


@pytest.mark.parametrize(
    ("normals", "target", "confidence", "distribution"),
    [
        (63, 0.05, 0.95, "normal"),
        (200, 0.05, 0.95, "exponential"),
        (500, 0.02, 0.9, "normal"),
        (120, 0.1, 0.99, "exponential"),
    ],
)
def test_the_false_alarm_rate_exceeds_the_target_at_most_one_minus_confidence_of_the_time(
    normals: int, target: float, confidence: float, distribution: str
) -> None:
    rng = np.random.default_rng(normals)
    law = stats.norm(loc=0.3, scale=0.1) if distribution == "normal" else stats.expon(scale=0.2)
    share, rank = _share_exceeding(
        rng, normals, target, confidence, lambda r, n: law.rvs(size=n, random_state=r), law.sf
    )
    exact = exceedance_probability(rank, normals, target)
    error = 4 * math.sqrt(exact * (1 - exact) / DRAWS) + 1 / DRAWS
    assert exact <= 1 - confidence
    assert share <= 1 - confidence + error
    assert share == pytest.approx(exact, abs=error)  # the statistic is the one the theory says, not a looser one
    assert exceedance_probability(rank - 1, normals, target) > 1 - confidence  # and the lowest such rank


def test_ties_only_lower_the_false_alarm_rate() -> None:
    """Scores on a coarse grid (many ties): the guarantee still holds."""
    rng = np.random.default_rng(7)
    levels = np.arange(20) / 20
    weights = np.linspace(1, 3, 20)
    weights /= weights.sum()

    def survival(threshold: float) -> float:
        return float(weights[levels > threshold + 1e-12].sum())

    share, _ = _share_exceeding(rng, 80, 0.05, 0.95, lambda r, n: r.choice(levels, size=n, p=weights), survival)
    assert share <= 0.05 + 4 * math.sqrt(0.05 * 0.95 / DRAWS)


def test_too_few_normals_use_the_highest_score_and_state_the_bound_they_certify() -> None:
    found = certified_threshold([0.3, 0.1, 0.7, 0.2, 0.5, 0.4, 0.6], target_fpr=0.05, confidence=0.95)
    assert (found.threshold, found.rank, found.normals, found.certified) == (0.7, 7, 7, False)
    assert found.normals_needed == 59 == normals_needed(0.05, 0.95)
    assert found.certified_fpr == pytest.approx(1 - 0.05 ** (1 / 7))
    assert exceedance_probability(7, 7, found.certified_fpr) == pytest.approx(0.05)
    # 58 normals do not certify 5 % at 95 %, 59 do, with the highest score
    assert not certified_threshold(np.arange(58.0), 0.05, 0.95).certified
    assert certified_threshold(np.arange(59.0), 0.05, 0.95).rank == 59
    rng = np.random.default_rng(3)
    share, _ = _share_exceeding(rng, 7, found.certified_fpr, 0.95, lambda r, n: r.uniform(size=n), lambda t: 1 - t)
    assert share <= 0.05 + 4 * math.sqrt(0.05 * 0.95 / DRAWS)


@pytest.mark.parametrize(
    ("scores", "target", "confidence", "message"),
    [
        ([], 0.05, 0.95, "none were given"),
        ([0.1, float("nan")], 0.05, 0.95, "NaN or infinite"),
        ([0.1], 0.0, 0.95, "strictly between 0 and 1"),
        ([0.1], 0.05, 1.0, "strictly between 0 and 1"),
    ],
)
def test_bad_scores_or_settings_are_refused(
    scores: list[float], target: float, confidence: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        certified_threshold(scores, target, confidence)


def test_clopper_pearson_intervals() -> None:
    assert clopper_pearson(0, 16) == (0.0, pytest.approx(1 - 0.025 ** (1 / 16)))
    assert clopper_pearson(16, 16) == (pytest.approx(0.025 ** (1 / 16)), 1.0)
    low, high = clopper_pearson(3, 20)
    assert stats.binom.sf(2, 20, low) == pytest.approx(0.025)
    assert stats.binom.cdf(3, 20, high) == pytest.approx(0.025)
    assert all(math.isnan(value) for value in clopper_pearson(0, 0))


def test_the_decision_depends_on_the_normals_alone() -> None:
    normals = {
        "group": np.array(["held_out_normal"] * 60 + ["feedback_normal"] * 3),
        "pred_score": np.linspace(0.0, 0.62, 63),
        "map_max": np.linspace(0.2, 0.82, 63),
        "map_min": np.full(63, 0.05),
    }
    decision = decide(normals, 0.05, 0.95)
    assert decision["image_threshold"] == pytest.approx(0.62)  # 63 normals: the highest certifies 5 % at 95 %
    assert decision["pixel_threshold"] == pytest.approx(0.82)
    assert decision["threshold_basis"]["normals"] == {"held_out": 60, "feedback": 3}
    assert decision["threshold_basis"]["heatmap_range"] == pytest.approx([0.05, 1.59])
    assert decision["threshold_basis"]["image"]["certified"]
    assert decide(normals, 0.05, 0.95) == decision
    assert decide(normals, 0.1, 0.95)["threshold_version"] != decision["threshold_version"]


def _category(folder: Path, rng: np.random.Generator, normals: int, feedback: int = 0) -> None:
    folder.mkdir(parents=True)
    labels = np.array([0] * 16 + [1] * 12, dtype=np.uint8)
    scores = np.where(labels == 1, rng.uniform(0.5, 1.0, labels.size), rng.uniform(0.0, 0.6, labels.size))
    maps = rng.uniform(0, 0.5, (labels.size, 8, 8)).astype(np.float16)
    np.savez_compressed(
        folder / "predictions.npz",
        image_path=np.array([f"test/{i:03d}.png" for i in range(labels.size)]),
        gt_label=labels,
        pred_score=scores.astype(np.float32),
        anomaly_map=maps,
        gt_mask=maps > 0.4,
    )
    groups = ["held_out_normal"] * normals + ["feedback_normal"] * feedback + ["feedback_hard"] * 2
    np.savez_compressed(
        folder / "normals.npz",
        image_path=np.array([f"train/{i:03d}.png" for i in range(len(groups))]),
        group=np.array(groups),
        pred_score=np.concatenate([rng.uniform(0.0, 0.6, normals + feedback), [0.55, 0.9]]).astype(np.float32),
        map_max=rng.uniform(0.3, 0.5, len(groups)).astype(np.float32),
        map_min=rng.uniform(0.0, 0.1, len(groups)).astype(np.float32),
    )


@pytest.fixture
def evaluated(tmp_path: Path) -> tuple[Path, Path]:
    """A params file and a model's evaluate-stage outputs for two categories (63 and 7 held-out normals)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["categories"] = ["brick", "grass"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    predictions = tmp_path / "predictions" / "metauas"
    rng = np.random.default_rng(0)
    _category(predictions / "brick", rng, 63)
    _category(predictions / "grass", rng, 6, feedback=1)
    feedback = {"brick": {"normal": 0, "hard": 2}, "grass": {"normal": 1, "hard": 2}}
    (predictions / "evaluation.json").write_text(json.dumps({"weights": "test", "feedback": feedback}))
    return tmp_path / "params.yaml", predictions


def test_shuffled_test_labels_leave_every_decision_byte_identical(evaluated: tuple[Path, Path], tmp_path: Path) -> None:
    params, predictions = evaluated
    first = calibrate("metauas", params, predictions, tmp_path / "calibration-a")
    for category in ("brick", "grass"):
        path = predictions / category / "predictions.npz"
        saved = dict(np.load(path))
        saved["gt_label"] = np.random.default_rng(1).permutation(saved["gt_label"])
        saved["gt_mask"] = np.random.default_rng(2).permutation(saved["gt_mask"])
        np.savez_compressed(path, **saved)
    second = calibrate("metauas", params, predictions, tmp_path / "calibration-b")
    for category in ("brick", "grass"):
        decided = [json.dumps(result["categories"][category]["decision"]) for result in (first, second)]
        assert decided[0] == decided[1]
        assert first["categories"][category]["test"] != second["categories"][category]["test"]


def test_the_stage_states_the_guarantee_test_rates_and_feedback(evaluated: tuple[Path, Path], tmp_path: Path) -> None:
    params, predictions = evaluated
    result = calibrate("metauas", params, predictions, tmp_path / "calibration")
    assert json.loads((tmp_path / "calibration" / "calibration.json").read_text()) == result
    brick, grass = result["categories"]["brick"], result["categories"]["grass"]
    scored = np.load(predictions / "brick" / "normals.npz")
    held_out = scored["pred_score"][scored["group"] == "held_out_normal"]
    assert brick["decision"]["image_threshold"] == pytest.approx(float(held_out.max()))
    assert brick["decision"]["threshold_basis"]["image"]["certified"]
    assert not grass["decision"]["threshold_basis"]["image"]["certified"]
    assert grass["decision"]["threshold_basis"]["normals"] == {"held_out": 6, "feedback": 1}
    saved = np.load(predictions / "brick" / "predictions.npz")
    alarms = saved["pred_score"] > brick["decision"]["image_threshold"]
    assert brick["test"]["FP"] == int((alarms & (saved["gt_label"] == 0)).sum())
    assert brick["test"]["FN"] == int((~alarms & (saved["gt_label"] == 1)).sum())
    low, high = brick["test"]["false_alarm_ci"]
    assert low <= brick["test"]["false_alarm_rate"] <= high
    assert brick["feedback"] == {"normal": 0, "hard": 2, "normal_alarms": 0, "hard_missed": 1}
    assert brick["previous"] is None


def test_a_changed_decision_keeps_the_previous_rate_for_before_and_after(
    evaluated: tuple[Path, Path], tmp_path: Path
) -> None:
    params, predictions = evaluated
    output = tmp_path / "calibration"
    before = calibrate("metauas", params, predictions, output)["categories"]["brick"]
    changed = yaml.safe_load(params.read_text())
    changed["calibrate"] = {"target_fpr": 0.2, "confidence": 0.9}
    params.write_text(yaml.safe_dump(changed))
    after = calibrate("metauas", params, predictions, output)["categories"]["brick"]
    assert after["decision"]["image_threshold"] < before["decision"]["image_threshold"]
    assert after["previous"] == {
        "threshold_version": before["decision"]["threshold_version"],
        "image_threshold": before["decision"]["image_threshold"],
        "false_alarm_rate": before["test"]["false_alarm_rate"],
        "FP": before["test"]["FP"],
    }
    again = calibrate("metauas", params, predictions, output)["categories"]["brick"]
    assert again["previous"] == after["previous"]  # an unchanged decision keeps the comparison


def test_a_category_without_normals_is_one_line_and_keeps_the_previous_output(
    evaluated: tuple[Path, Path], tmp_path: Path
) -> None:
    params, predictions = evaluated
    output = tmp_path / "calibration"
    calibrate("metauas", params, predictions, output)
    kept = (output / "calibration.json").read_bytes()
    path = predictions / "grass" / "normals.npz"
    saved = dict(np.load(path))
    keep = saved["group"] == "feedback_hard"
    np.savez_compressed(path, **{key: value[keep] for key, value in saved.items()})
    with pytest.raises(StageError, match="grass: no normal image outside the test set and the prompts"):
        calibrate("metauas", params, predictions, output)
    assert (output / "calibration.json").read_bytes() == kept
    shutil.rmtree(predictions)
    with pytest.raises(StageError, match=r"run `dvc repro evaluate@metauas` first"):
        calibrate("metauas", params, predictions, output)
