# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Thresholds with a finite-sample false-alarm guarantee, from normal images only.

The deployed image threshold is an order statistic of the scores of ``n`` normal images held out of the test set:
the ``k``-th smallest, ``s_(k)``; a new part alarms when its score is above it. If the held-out normals and the
new normal parts are independent draws of the same score distribution, the false-alarm rate of ``s_(k)`` on new
normal parts, ``P(S > s_(k))``, is at most ``1 - U_(k)`` with ``U_(k) ~ Beta(k, n + 1 - k)`` (equality for
continuous scores; ties only lower the rate). Hence

    P(false-alarm rate > a) <= P(U_(k) < 1 - a) = P(Binomial(n, 1 - a) >= k).

:func:`certified_threshold` takes the smallest ``k`` (the lowest threshold, the fewest misses) for which that
probability is at most ``1 - confidence``. It needs ``n >= log(1 - confidence) / log(1 - target_fpr)`` normals
(59 for 5 % at 95 %); with fewer, the threshold is the highest normal score, and the bound that is certified for it
(``1 - (1 - confidence) ** (1 / n)``) is reported with the number of normals the target needs. This is the
distribution-free (Wilks) tolerance bound, the training-conditional guarantee of split-conformal prediction.

The pixel threshold uses the same statistic on the largest map value of each held-out normal image: a new normal
part shows any masked pixel with probability at most the certified bound, with the same confidence.

:func:`decide` makes the decision a registered version deploys (:data:`DECISION_KEYS`): both thresholds, their
basis, a fixed colour range for the maps (from the smallest normal map value to as far above the pixel threshold,
which sits mid-scale) and a version digest. Clopper-Pearson intervals give the test-set rates their exact binomial
uncertainty.

Example:
    >>> found = certified_threshold(list(range(100)), target_fpr=0.05, confidence=0.95)
    >>> found.rank, found.certified
    (99, True)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "CALIBRATION_FILE",
    "DECISION_KEYS",
    "NORMAL_GROUPS",
    "CertifiedThreshold",
    "certified_threshold",
    "clopper_pearson",
    "decide",
    "exceedance_probability",
    "heatmap_png",
    "normals_needed",
    "read_calibration",
]

CALIBRATION_FILE = "calibration.json"  # what the calibrate stage writes per model (calibration/<model>/)
NORMAL_GROUPS = ("held_out_normal", "feedback_normal")  # the groups of the evaluate stage's normals.npz that calibrate
# What a registered version deploys; nothing in it depends on a test label.
DECISION_KEYS = ("image_threshold", "pixel_threshold", "threshold_basis", "threshold_version")


@dataclass(frozen=True)
class CertifiedThreshold:
    """An order-statistic threshold and what it guarantees.

    Args:
        threshold: The ``rank``-th smallest normal score; a score above it alarms.
        rank: ``k``, 1-based.
        normals: ``n``, the normal scores it was chosen from.
        target_fpr: The false-alarm rate to guarantee.
        confidence: The probability with which it is guaranteed.
        certified_fpr: The false-alarm rate that the threshold exceeds with probability at most ``1 - confidence``
            (at most ``target_fpr`` when ``certified``).
        certified: Whether ``certified_fpr <= target_fpr``.
        normals_needed: The normals the target needs at this confidence.
    """

    threshold: float
    rank: int
    normals: int
    target_fpr: float
    confidence: float
    certified_fpr: float
    certified: bool
    normals_needed: int

    def to_json(self) -> dict[str, float | int | bool]:
        """The fields as plain data.

        Returns:
            A dictionary.
        """
        return asdict(self)


def normals_needed(target_fpr: float, confidence: float) -> int:
    """The fewest normal images that certify ``target_fpr`` at ``confidence`` (with the highest normal score).

    Args:
        target_fpr: In ``(0, 1)``.
        confidence: In ``(0, 1)``.

    Returns:
        ``ceil(log(1 - confidence) / log(1 - target_fpr))``.
    """
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target_fpr) - 1e-12)


def exceedance_probability(rank: int, normals: int, fpr: float) -> float:
    """The largest probability that the ``rank``-th smallest of ``normals`` scores has a false-alarm rate above ``fpr``.

    Args:
        rank: ``k``, 1-based.
        normals: ``n``.
        fpr: The rate ``a``.

    Returns:
        ``P(Binomial(n, 1 - a) >= k)``.
    """
    return float(stats.binom.sf(rank - 1, normals, 1.0 - fpr))


def _certified_fpr(rank: int, normals: int, confidence: float) -> float:
    """The rate that the ``rank``-th order statistic exceeds with probability exactly ``1 - confidence``."""
    return float(1.0 - stats.beta.ppf(1.0 - confidence, rank, normals + 1 - rank))


def certified_threshold(
    scores: Sequence[float] | np.ndarray, target_fpr: float, confidence: float
) -> CertifiedThreshold:
    """The lowest order statistic of normal scores whose false-alarm rate is certified (see the module docstring).

    Args:
        scores: Scores of normal images held out of the test set (higher is more anomalous).
        target_fpr: The false-alarm rate to guarantee, in ``(0, 1)``.
        confidence: The probability of the guarantee, in ``(0, 1)``.

    Returns:
        The threshold; the highest score, and ``certified`` False, when there are too few normals.

    Raises:
        ValueError: Without scores, with a non-finite score, or a rate or confidence outside ``(0, 1)``.
    """
    if not 0.0 < target_fpr < 1.0 or not 0.0 < confidence < 1.0:
        msg = f"target_fpr ({target_fpr}) and confidence ({confidence}) must each lie strictly between 0 and 1"
        raise ValueError(msg)
    ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not len(ordered):
        msg = "a threshold needs the scores of held-out normal images; none were given"
        raise ValueError(msg)
    if not np.isfinite(ordered).all():
        msg = "the normal images' scores hold NaN or infinite values; the model's outputs cannot set a threshold"
        raise ValueError(msg)
    n = len(ordered)
    ranks = np.arange(1, n + 1)
    risk = stats.binom.sf(ranks - 1, n, 1.0 - target_fpr)
    allowed = ranks[risk <= 1.0 - confidence]
    rank = int(allowed[0]) if len(allowed) else n
    bound = _certified_fpr(rank, n, confidence)
    return CertifiedThreshold(
        threshold=float(ordered[rank - 1]),
        rank=rank,
        normals=n,
        target_fpr=float(target_fpr),
        confidence=float(confidence),
        certified_fpr=bound,
        certified=bool(len(allowed)),
        normals_needed=normals_needed(target_fpr, confidence),
    )


def clopper_pearson(events: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial rate.

    Args:
        events: Observed events (false alarms, misses).
        trials: Trials (normal, defective images).
        level: Coverage.

    Returns:
        ``(low, high)``; ``(nan, nan)`` without trials.
    """
    if trials <= 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    low = 0.0 if events == 0 else float(stats.beta.ppf(tail, events, trials - events + 1))
    high = 1.0 if events == trials else float(stats.beta.ppf(1.0 - tail, events + 1, trials - events))
    return low, high


def decide(normals: dict[str, np.ndarray], target_fpr: float, confidence: float) -> dict[str, Any]:
    """The deployed decision from normal images alone: thresholds, their basis and version.

    Args:
        normals: The normal images' ``group`` (``held_out_normal`` or ``feedback_normal``), ``pred_score``,
            ``map_max`` and ``map_min`` (``normals.npz`` of the evaluate stage).
        target_fpr: The false-alarm rate to guarantee.
        confidence: The probability of the guarantee.

    Returns:
        ``image_threshold``, ``pixel_threshold``, ``threshold_basis`` and ``threshold_version``.
    """
    image = certified_threshold(normals["pred_score"], target_fpr, confidence)
    pixel = certified_threshold(normals["map_max"], target_fpr, confidence)
    low = float(np.min(normals["map_min"]))
    high = max(2.0 * pixel.threshold - low, pixel.threshold + 1e-6)
    groups = np.asarray(normals["group"])
    decided = {
        "image_threshold": image.threshold,
        "pixel_threshold": pixel.threshold,
        "threshold_basis": {
            "method": "binomial order statistic of held-out normal images (distribution-free)",
            "image": image.to_json(),
            "pixel": pixel.to_json(),
            "normals": {
                "held_out": int((groups == "held_out_normal").sum()),
                "feedback": int((groups == "feedback_normal").sum()),
            },
            "heatmap_range": [low, high],
        },
    }
    version = hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:12]
    return {**decided, "threshold_version": version}


def read_calibration(calibration: Path) -> dict[str, Any]:
    """A model's calibration, or an empty one when the stage has not run.

    Args:
        calibration: The model's calibration folder.

    Returns:
        What ``calibration.json`` holds.
    """
    path = calibration / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def heatmap_png(anomaly_map: np.ndarray, heatmap_range: Sequence[float]) -> np.ndarray:
    """The 8-bit heatmap values of a raw anomaly map on a decision's fixed colour range (``heatmap_range``).

    Args:
        anomaly_map: Raw map values.
        heatmap_range: ``[lo, hi]``; ``lo`` and below become 0, ``hi`` and above 255.

    Returns:
        ``uint8`` values ``round(255 * clip((map - lo) / (hi - lo), 0, 1))`` (a step at ``lo`` when ``hi == lo``).
    """
    lo, hi = (float(value) for value in heatmap_range)
    unit = (np.asarray(anomaly_map, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
    return (np.clip(unit, 0.0, 1.0) * 255.0).round().astype(np.uint8)
