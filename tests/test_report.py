# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The report reads calibration.json: bounds, intervals, recalibration, score histograms and error thumbnails."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from PIL import Image

from anomalib_uas.curves import write_curves
from anomalib_uas.figures import error_thumbnails, overlays, score_histogram
from anomalib_uas.params import METRICS, load_params
from anomalib_uas.report import render_report
from anomalib_uas.stages.report import cli

REPO = Path(__file__).resolve().parents[1]
SKIP_REASON = "InCTRL is skipped because files it needs are missing: weights/inctrl/<checkpoint>.pyth"
WEIGHTS = "metauas trained <offline> & checked"
# Per category: (defect folder, file, label, score, map peak) of the test images. The image thresholds are 0.5
# (brick) and 0.7 (grass): brick has two false positives (good/001 above good/003) and one miss (crack/001).
TEST_SET = {
    "brick": [
        ("good", "000.png", 0, 0.1, 0.2),
        ("good", "001.png", 0, 0.9, 0.9),
        ("good", "002.png", 0, 0.2, 0.3),
        ("good", "003.png", 0, 0.8, 0.7),
        ("crack", "000.png", 1, 0.95, 0.95),
        ("crack", "001.png", 1, 0.3, 0.4),
        ("hole", "000.png", 1, 0.85, 0.8),
    ],
    "grass": [
        ("good", "000.png", 0, 0.2, 0.1),
        ("good", "001.png", 0, 0.3, 0.2),
        ("cut", "000.png", 1, 0.9, 0.9),
        ("cut", "001.png", 1, 0.95, 0.9),
    ],
}


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((24, 32, 3), shade, dtype=np.uint8)
    pixels[6:12, 8:20] = 255 - shade
    Image.fromarray(pixels).save(path)


def _predictions(root: Path, category: str) -> dict[str, np.ndarray]:
    paths, labels, scores, maps, masks = [], [], [], [], []
    for index, (defect, name, label, score, peak) in enumerate(TEST_SET[category]):
        path = root / "data" / category / "test" / defect / name
        _png(path, 40 + 25 * index)
        heat = np.full((8, 8), 0.05, dtype=np.float32)
        heat[2:5, 3:6] = peak
        mask = np.zeros((8, 8), dtype=bool)
        mask[2:5, 3:6] = bool(label)
        paths.append(str(path))
        labels.append(label)
        scores.append(score)
        maps.append(heat)
        masks.append(mask)
    return {
        "image_path": np.array(paths),
        "gt_label": np.array(labels),
        "pred_score": np.array(scores, dtype=np.float32),
        "anomaly_map": np.array(maps, dtype=np.float16),
        "gt_mask": np.array(masks),
    }


def _basis(threshold: float, normals: int, certified_fpr: float, certified: bool) -> dict[str, Any]:
    return {
        "threshold": threshold,
        "rank": normals,
        "normals": normals,
        "target_fpr": 0.05,
        "confidence": 0.95,
        "certified_fpr": certified_fpr,
        "certified": certified,
        "normals_needed": 59,
    }


def _category(
    image: float, held_out: int, feedback: int, certified_fpr: float, test: dict[str, Any], previous: Any
) -> dict[str, Any]:
    normals = held_out + feedback
    certified = certified_fpr <= 0.05
    return {
        "decision": {
            "image_threshold": image,
            "pixel_threshold": 0.5,
            "threshold_version": f"{held_out:012d}",
            "threshold_basis": {
                "image": _basis(image, normals, certified_fpr, certified),
                "pixel": _basis(0.5, normals, certified_fpr, certified),
                "normals": {"held_out": held_out, "feedback": feedback},
                "heatmap_range": [0.0, 1.0],
            },
        },
        "test": test,
        "feedback": {"normal": feedback, "hard": 1, "normal_alarms": 0, "hard_missed": 1},
        "previous": previous,
        "f1": {"image_threshold": 0.82, "pixel_threshold": 0.61},
    }


CALIBRATION = {
    "model": "metauas",
    "skipped": None,
    "target_fpr": 0.05,
    "confidence": 0.95,
    "categories": {
        "brick": _category(
            0.5,
            60,
            2,
            0.0472,
            {
                "normal": 4,
                "defective": 3,
                "FP": 2,
                "FN": 1,
                "false_alarm_rate": 0.5,
                "false_alarm_ci": [0.0676, 0.9324],
                "miss_rate": 1 / 3,
                "miss_ci": [0.0084, 0.9057],
                "within_bound": False,
            },
            {"threshold_version": "0123456789ab", "image_threshold": 0.45, "false_alarm_rate": 0.75, "FP": 3},
        ),
        "grass": _category(
            0.7,
            7,
            0,
            1 - 0.05 ** (1 / 7),
            {
                "normal": 2,
                "defective": 2,
                "FP": 0,
                "FN": 0,
                "false_alarm_rate": 0.0,
                "false_alarm_ci": [0.0, 0.8419],
                "miss_rate": 0.0,
                "miss_ci": [0.0, 0.8419],
                "within_bound": True,
            },
            None,
        ),
    },
    "mean": {"false_alarm_rate": 0.25, "miss_rate": 1 / 6},
}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _skipped(root: Path, model: str) -> None:
    _write_json(root / "reports" / model / "metrics.json", {"skipped": 1})
    _write_json(root / "predictions" / model / "evaluation.json", {"skipped": SKIP_REASON})
    _write_json(
        root / "calibration" / model / "calibration.json", {"model": model, "skipped": SKIP_REASON, "categories": {}}
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Outputs of evaluate and calibrate: metauas evaluated on brick and grass, inctrl skipped."""
    saved = {category: _predictions(tmp_path, category) for category in TEST_SET}
    rows = []
    for offset, (category, content) in enumerate(saved.items()):
        folder = tmp_path / "predictions" / "metauas" / category
        folder.mkdir(parents=True)
        np.savez_compressed(folder / "predictions.npz", **content)
        held_out = CALIBRATION["categories"][category]["decision"]["threshold_basis"]["normals"]
        groups = ["held_out_normal"] * held_out["held_out"] + ["feedback_normal"] * held_out["feedback"]
        groups.append("feedback_hard")
        scores = np.linspace(0.0, 0.45 + 0.2 * offset, len(groups), dtype=np.float32)
        np.savez_compressed(
            folder / "normals.npz",
            image_path=np.array([f"data/{category}/train/good/{i:03d}.png" for i in range(len(groups))]),
            group=np.array(groups),
            pred_score=scores,
            map_max=scores,
            map_min=np.zeros_like(scores),
        )
        rows.append({"category": category, **dict.fromkeys(METRICS, 0.5 + 0.1 * offset), "ms_per_image": 12.0})
    write_curves(
        tmp_path / "reports" / "metauas",
        list(saved),
        [content["pred_score"] for content in saved.values()],
        [content["gt_label"] for content in saved.values()],
        rows,
    )
    columns = [*METRICS, "ms_per_image"]
    metrics = {
        "skipped": 0,
        "categories": {row["category"]: {c: row[c] for c in columns} for row in rows},
        "mean": {c: float(np.mean([row[c] for row in rows])) for c in columns},
    }
    _write_json(tmp_path / "reports" / "metauas" / "metrics.json", metrics)
    _write_json(
        tmp_path / "predictions" / "metauas" / "evaluation.json",
        {
            "weights": WEIGHTS,
            "mlflow_run_id": "run-1",
            "prompt_paths": {category: [f"data/{category}/train/good/000.png"] for category in TEST_SET},
            "feedback": {"brick": {"normal": 2, "hard": 1}, "grass": {"normal": 0, "hard": 1}},
            "fingerprints": {},
            "evaluated": list(TEST_SET),
            "reused": [],
        },
    )
    _write_json(tmp_path / "calibration" / "metauas" / "calibration.json", CALIBRATION)
    _skipped(tmp_path, "inctrl")
    return tmp_path


@pytest.fixture
def rendered(project: Path) -> tuple[str, str]:
    return render_report(["metauas", "inctrl"], project / "reports", project / "predictions", project / "calibration")


def _rows(markdown: str, title: str) -> dict[str, list[str]]:
    """The rows of a Markdown table under a heading, as ``"model/category" -> cells after them``."""
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    cells = [[cell.strip() for cell in row] for row in rows[1:]]
    return {f"{row[0]}/{row[1]}": row[2:] for row in cells}


def test_markdown_states_the_bound_and_whether_it_is_certified(rendered: tuple[str, str]) -> None:
    markdown, _ = rendered
    rows = _rows(markdown, "Deployed decision: thresholds from normal images only")
    assert rows["metauas/brick"] == [
        "62 (60 + 2)",
        "0.5",
        "4.72 %",
        "5 % at 95 % confidence",
        "yes",
        "0.5",
        "4.72 %",
        "000000000060",
    ]
    assert rows["metauas/grass"][:5] == [
        "7 (7 + 0)",
        "0.7",
        "34.8 %",
        "5 % at 95 % confidence",
        "no: needs 59 normals, has 7; certifies 34.8 % now",
    ]
    assert not any(key.startswith("inctrl/") for key in rows)
    assert len(rows) == 2


def test_markdown_has_test_rates_with_intervals_and_the_rates_before_and_after(rendered: tuple[str, str]) -> None:
    markdown, _ = rendered
    rates = _rows(markdown, "Test rates at the deployed thresholds")
    assert rates["metauas/brick"] == ["2 / 4 = 50 % [6.76 %, 93.2 %]", "1 / 3 = 33.3 % [0.84 %, 90.6 %]", "no"]
    assert rates["metauas/grass"] == ["0 / 2 = 0 % [0 %, 84.2 %]", "0 / 2 = 0 % [0 %, 84.2 %]", "yes"]
    recalibrated = _rows(markdown, "Recalibration with feedback")
    assert recalibrated["metauas/brick"] == ["0.45 -> 0.5", "75 % -> 50 %", "3 -> 2", "2 / 1", "0", "1"]
    assert recalibrated["metauas/grass"] == ["n/a -> 0.7", "n/a -> 0 %", "n/a -> 0", "0 / 1", "0", "1"]
    f1 = _rows(markdown, "Evaluation figures: F1-optimal thresholds (uses test labels)")
    assert f1["metauas/brick"] == ["0.82", "0.5", "0.61", "0.5"]
    header = next(line for line in markdown.splitlines() if line.startswith("| model | category | image_AUROC"))
    columns = [cell.strip() for cell in header.split("|")[1:-1]]
    brick = next(line for line in markdown.splitlines() if line.startswith("| metauas | brick | 0.500 |"))
    cells = [cell.strip() for cell in brick.split("|")[1:-1]]
    assert cells[columns.index("false_alarm_rate")] == "0.500"
    assert cells[columns.index("miss_rate")] == "0.333"
    assert cells[columns.index("ms_per_image")] == "12.000"
    mean = next(line for line in markdown.splitlines() if line.startswith("| metauas | **mean** |"))
    assert [cell.strip() for cell in mean.split("|")[1:-1]][columns.index("false_alarm_rate")] == "0.250"
    assert "data:image" not in markdown


def test_rates_without_test_images_of_a_class_read_n_a(project: Path) -> None:
    """The calibrate stage writes NaN rates and intervals (JSON ``NaN``) when a class has no test image."""
    calibration = json.loads((project / "calibration" / "metauas" / "calibration.json").read_text())
    test = calibration["categories"]["grass"]["test"]
    test.update(normal=0, false_alarm_rate=float("nan"), false_alarm_ci=[float("nan"), float("nan")])
    calibration["mean"]["false_alarm_rate"] = float("nan")
    _write_json(project / "calibration" / "metauas" / "calibration.json", calibration)
    markdown, _ = render_report(["metauas"], project / "reports", project / "predictions", project / "calibration")
    assert _rows(markdown, "Test rates at the deployed thresholds")["metauas/grass"][0] == "0 / 0 = n/a [n/a, n/a]"
    mean = next(line for line in markdown.splitlines() if line.startswith("| metauas | **mean** |"))
    assert "| n/a |" in mean


def test_a_skipped_model_is_listed_with_its_reason(rendered: tuple[str, str]) -> None:
    markdown, page = rendered
    assert "| inctrl | (skipped) |" in markdown
    assert f"- **inctrl** skipped: {SKIP_REASON}" in markdown
    assert "inctrl / " not in page
    assert "<td>inctrl</td><td colspan=" in page
    assert "weights/inctrl/&lt;checkpoint&gt;.pyth" in page


def _figures(page: str, kind: str) -> list[str]:
    return re.findall(rf"<figure data-kind='{kind}'>.*?<figcaption>(.*?)</figcaption></figure>", page)


def test_thumbnails_are_exactly_the_false_positives_and_misses(rendered: tuple[str, str]) -> None:
    _, page = rendered
    brick, grass = page.split("<h3>metauas / brick</h3>")[1].split("<h3>metauas / grass</h3>")
    assert _figures(brick, "false positives") == ["good/001.png (score 0.9)", "good/003.png (score 0.8)"]
    assert _figures(brick, "misses") == ["crack/001.png (score 0.3)"]
    assert "<h4>False positives: 2</h4>" in brick
    assert "<h4>Misses: 1</h4>" in brick
    assert _figures(grass, "false positives") == []
    assert _figures(grass, "misses") == []
    assert grass.count(">none</p>") == 2
    assert brick.count("class='histogram'") == grass.count("class='histogram'") == 1
    assert "<script" not in page
    assert "<link" not in page
    assert "http" not in page.split("<body>")[1].split("weights:")[0]
    assert html.escape(WEIGHTS) in page
    assert WEIGHTS not in page


def test_thumbnails_keep_the_clearest_errors_within_the_limit(project: Path) -> None:
    saved = dict(np.load(project / "predictions" / "metauas" / "brick" / "predictions.npz"))
    false_positives, misses = error_thumbnails(saved, 0.05, 0.5, (0.0, 1.0), limit=2)
    assert (false_positives.kind, false_positives.total) == ("false positives", 4)
    assert [(name, round(score, 3)) for name, score, _ in false_positives.images] == [
        ("good/001.png", 0.9),
        ("good/003.png", 0.8),
    ]
    assert (misses.kind, misses.total, misses.images) == ("misses", 0, [])
    _, misses = error_thumbnails(saved, 0.99, 0.5, (0.0, 1.0), limit=2)
    assert [name for name, _, _ in misses.images] == ["crack/001.png", "hole/000.png"]
    assert misses.total == 3
    at_good_003, at_crack_000 = float(saved["pred_score"][3]), float(saved["pred_score"][4])
    false_positives, _ = error_thumbnails(saved, at_good_003, 0.5, (0.0, 1.0))  # a score at the threshold is normal
    assert [name for name, _, _ in false_positives.images] == ["good/001.png"]
    _, misses = error_thumbnails(saved, at_crack_000, 0.5, (0.0, 1.0))
    assert [name for name, _, _ in misses.images] == ["crack/001.png", "hole/000.png", "crack/000.png"]
    with Image.open(io.BytesIO(false_positives.images[0][2])) as thumbnail:
        assert thumbnail.format == "PNG"
        assert thumbnail.width <= 400
        assert thumbnail.height <= 200


def test_maps_share_one_colour_range(project: Path) -> None:
    """Two false positives with equal scores whose maps differ by a factor: fixed colours tell them apart."""
    saved = dict(np.load(project / "predictions" / "metauas" / "brick" / "predictions.npz"))
    pair = {key: value[[1, 1]].copy() for key, value in saved.items()}
    pair["anomaly_map"][1] = pair["anomaly_map"][1] / 2
    (fixed,) = [entry for entry in error_thumbnails(pair, 0.5, 2.0, (0.0, 1.0)) if entry.kind == "false positives"]
    assert fixed.total == 2
    assert fixed.images[0][2] != fixed.images[1][2]
    pair["gt_label"][:] = 1
    folder = project / "scaled" / "brick"
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "predictions.npz", **pair)
    scaled = overlays(folder.parent)  # the evaluate stage's overlays scale each map to its own range
    assert len(scaled) == 2
    assert scaled[0][2] == scaled[1][2]


def test_histogram_is_a_small_png() -> None:
    png = score_histogram({"a": np.array([0.1, 0.2]), "b": np.array([]), "c": np.array([0.9])}, 0.5, "x")
    with Image.open(io.BytesIO(png)) as histogram:
        assert histogram.format == "PNG"
        assert 200 < histogram.width <= 450
        assert histogram.height <= 250


def test_stage_writes_both_reports_and_logs_them(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = load_params(REPO / "params.yaml").models
    if "metauas" not in models:
        pytest.skip("params.yaml lists no metauas")
    for model in models:
        if model != "metauas":
            _skipped(project, model)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(project)
    mlflow.set_tracking_uri(uri)
    out = project / "out"
    argv = ["--params", str(REPO / "params.yaml"), "--calibration", "calibration"]
    argv += ["--markdown", str(out / "report.md"), "--html", str(out / "report.html")]
    assert cli(argv) == 0
    markdown = (out / "report.md").read_text()
    assert "no: needs 59 normals, has 7; certifies 34.8 % now" in markdown
    assert "class='thumbnail'" in (out / "report.html").read_text()
    run = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("anomalib-uas").experiment_id], "tags.`uas.stage` = 'report'"
    )[0]
    names = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert names == {"report/report.md", "report/report.html"}


def _browser(profile: Path) -> Any:
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("headless Chromium needs Debian's chromium and chromium-driver: apt-get install them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


def test_browser_shows_the_histograms_and_the_error_thumbnails(rendered: tuple[str, str], tmp_path: Path) -> None:
    _, page = rendered
    report = tmp_path / "report.html"
    report.write_text(page)
    driver = _browser(tmp_path / "profile")
    try:
        driver.get(report.as_uri())
        deadline = time.monotonic() + 15
        while driver.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
            time.sleep(0.1)
        images = driver.execute_script(
            "return [...document.images].map(i => ({kind: i.className, alt: i.alt, complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
        )
        captions = driver.execute_script(
            "const caption = kind => [...document.querySelectorAll(`figure[data-kind='${kind}'] figcaption`)]"
            ".map(e => e.textContent);"
            "return {fp: caption('false positives'), miss: caption('misses'),"
            " none: [...document.querySelectorAll('p.none')].map(e => e.dataset.kind)}"
        )
    finally:
        driver.quit()
    kinds = [image["kind"] for image in images]
    assert kinds.count("histogram") == 2
    assert kinds.count("thumbnail") == 3
    assert kinds.count("roc") == 1
    for image in images:
        assert image["complete"], image["alt"]
        assert image["width"] > 0, image["alt"]
        assert image["height"] > 0, image["alt"]
        assert image["shown"] > 0, image["alt"]
    assert [image["alt"] for image in images if image["kind"] == "thumbnail"] == [
        "metauas / brick: good/001.png",
        "metauas / brick: good/003.png",
        "metauas / brick: crack/001.png",
    ]
    assert captions["fp"] == ["good/001.png (score 0.9)", "good/003.png (score 0.8)"]
    assert captions["miss"] == ["crack/001.png (score 0.3)"]
    assert captions["none"] == ["false positives", "misses"]
