# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``calibrate@<model>``: the deployed thresholds, from normal images only, with their stated guarantee.

It reads what ``evaluate@<model>`` saved (``<predictions>/<category>/normals.npz`` and ``predictions.npz``) and
writes ``<calibration>/calibration.json``; it runs no model. Per category:

* ``decision``: what every consumer deploys (the registered version, ``uas serve``, ``uas predict``, the FiftyOne
  masks). The image threshold is the order statistic of the held-out normal images' scores whose false-alarm rate
  on new normal parts exceeds ``calibrate.target_fpr`` with probability at most ``1 - calibrate.confidence``; the
  pixel threshold is the same statistic of each normal image's largest map value, so that a new normal part shows a
  masked pixel no more often (:mod:`anomalib_uas.calibration`). Too few normals: the highest normal score, with the
  bound it does certify and the number of normals the target needs. ``heatmap_range`` is the fixed colour range of
  the maps (the smallest normal map value to as far above the pixel threshold), ``threshold_version`` a digest of
  the rest. No test label reaches the decision.
* ``test``: the decision's false alarms and misses on the test set with 95 % Clopper-Pearson intervals, and whether
  the false-alarm rate is consistent with the certified bound; ``feedback``: feedback normals still alarming, hard
  cases still missed; ``previous``: the last different decision's threshold and test false-alarm rate (feedback
  normals recalibrate); ``f1``: the F1-optimal thresholds on the test labels, as evaluation figures only.

The output is replaced only when every category was calibrated; a category without any normal image outside the
test set and the prompts is one line naming the fix.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalib_uas.calibration import CALIBRATION_FILE, NORMAL_GROUPS, clopper_pearson, decide, read_calibration
from anomalib_uas.curves import error_rates, thresholds
from anomalib_uas.params import MODEL_NAMES, CalibrateParams, load_params
from anomalib_uas.stages import StageError, run_stage
from anomalib_uas.stages.outputs import replacing, write_json

__all__ = ["calibrate_category", "cli", "main"]


def main(model: str, params_file: Path, predictions: Path, calibration: Path) -> dict[str, Any]:
    """Calibrate every category of one model.

    Args:
        model: Model name.
        params_file: ``params.yaml`` (``calibrate``, ``data.categories``).
        predictions: The model's predictions folder (``predictions/<model>``).
        calibration: The model's calibration folder (``calibration/<model>``), replaced on success.

    Returns:
        What ``calibration.json`` holds.

    Raises:
        StageError: The evaluation's outputs are missing, or a category has no normal image to calibrate on.
    """
    params = load_params(params_file)
    evaluation_file = predictions / "evaluation.json"
    if not evaluation_file.is_file():
        msg = f"{evaluation_file} is missing: run `dvc repro evaluate@{model}` first"
        raise StageError(msg)
    evaluation = json.loads(evaluation_file.read_text())
    previous = read_calibration(calibration).get("categories", {})
    result: dict[str, Any] = {"model": model, "skipped": evaluation.get("skipped")}
    if result["skipped"] is None:
        settings = params.calibrate
        categories = {
            category: calibrate_category(
                predictions / category, settings, previous.get(category), evaluation["feedback"][category]
            )
            for category in params.data.categories
        }
        result.update(
            target_fpr=settings.target_fpr,
            confidence=settings.confidence,
            categories=categories,
            mean={
                rate: float(np.nanmean([found["test"][rate] for found in categories.values()]))
                for rate in ("false_alarm_rate", "miss_rate")
            },
        )
    else:
        result["categories"] = {}
    with replacing(calibration) as (staging,):
        staging.mkdir()
        write_json(staging / CALIBRATION_FILE, result)
    return result


def calibrate_category(
    folder: Path, settings: CalibrateParams, previous: dict[str, Any] | None, feedback: dict[str, int]
) -> dict[str, Any]:
    """The decision of one category and how it does on the test set.

    Args:
        folder: The category's predictions folder (``normals.npz``, ``predictions.npz``).
        settings: ``calibrate`` parameters.
        previous: The category's previous calibration, if any.
        feedback: The counts of feedback normals and hard cases.

    Returns:
        ``decision``, ``test``, ``feedback``, ``previous`` and ``f1`` (see the module docstring).

    Raises:
        StageError: No normal image outside the test set and the prompts.
    """
    scored = dict(np.load(folder / "normals.npz"))
    normal = np.isin(scored["group"], NORMAL_GROUPS)
    if not normal.any():
        msg = (
            f"{folder.name}: no normal image outside the test set and the prompts to set thresholds on: add normal "
            "images to train/good (or mark false positives feedback:normal in review)"
        )
        raise StageError(msg)
    normals = {key: value[normal] for key, value in scored.items()}
    decision = decide(normals, settings.target_fpr, settings.confidence)
    saved = np.load(folder / "predictions.npz")
    labels, scores = saved["gt_label"], saved["pred_score"]
    rates = error_rates(labels, scores, decision["image_threshold"])
    tested_normals, tested_defects = int((labels == 0).sum()), int((labels == 1).sum())
    false_alarm_ci = clopper_pearson(rates["FP"], tested_normals)
    bound = decision["threshold_basis"]["image"]["certified_fpr"]
    test = {
        "normal": tested_normals,
        "defective": tested_defects,
        **rates,
        "false_alarm_ci": list(false_alarm_ci),
        "miss_ci": list(clopper_pearson(rates["FN"], tested_defects)),
        "within_bound": bool(not tested_normals or false_alarm_ci[0] <= bound),
    }
    groups, scores_out = scored["group"], scored["pred_score"]
    alarms = scores_out > decision["image_threshold"]
    earlier = None
    if previous is not None:
        if previous["decision"]["threshold_version"] != decision["threshold_version"]:
            earlier = {
                "threshold_version": previous["decision"]["threshold_version"],
                "image_threshold": previous["decision"]["image_threshold"],
                "false_alarm_rate": previous["test"]["false_alarm_rate"],
                "FP": previous["test"]["FP"],
            }
        else:
            earlier = previous.get("previous")
    f1 = thresholds(saved)
    return {
        "decision": decision,
        "test": test,
        "feedback": {
            **feedback,
            "normal_alarms": int((alarms & (groups == "feedback_normal")).sum()),
            "hard_missed": int((~alarms & (groups == "feedback_hard")).sum()),
        },
        "previous": earlier,
        "f1": {"image_threshold": f1["image_threshold"], "pixel_threshold": f1["pixel_threshold"]},
    }


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas calibrate MODEL``: set the model's thresholds from the normal images its evaluation scored.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas calibrate", description="Thresholds from normal images only.")
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--predictions", type=Path, help="The model's predictions (predictions/MODEL).")
    parser.add_argument("--calibration", type=Path, help="Output folder (calibration/MODEL).")

    def run(args: argparse.Namespace) -> str:
        model = args.model
        result = main(
            model,
            args.params,
            args.predictions or Path("predictions") / model,
            args.calibration or Path("calibration") / model,
        )
        if result["skipped"] is not None:
            return f"{model}: skipped ({result['skipped']})"
        return "\n".join(_summary(category, found) for category, found in result["categories"].items())

    return run_stage("calibrate", parser, run, argv)


def _summary(category: str, found: dict[str, Any]) -> str:
    image, test = found["decision"]["threshold_basis"]["image"], found["test"]
    guarantee = f"certified false-alarm rate <= {image['certified_fpr']:.3f} at {image['confidence']:.0%}"
    if not image["certified"]:
        guarantee += f" (the target {image['target_fpr']} needs {image['normals_needed']} normals)"
    return (
        f"{category}: threshold {found['decision']['image_threshold']:.4f} from {image['normals']} normals, "
        f"{guarantee}; test false alarms {test['FP']}/{test['normal']}, misses {test['FN']}/{test['defective']}"
    )
