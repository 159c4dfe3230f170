# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FiftyOne review datasets on the real embedded database: persistence of the reviewer's work, the App in headless
Chromium, and an App launch that leaves no process behind."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
from PIL import Image

from anomalib_uas.evaluation import evaluate_model
from anomalib_uas.models import MetaUAS
from anomalib_uas.review import (
    HEATMAP_COLORSCALE,
    NEAR_THRESHOLD_MIN,
    SAVED_VIEWS,
    F,
    build_review_dataset,
    canonical_path,
    deployed_decision,
    fo,
    launch_review,
    media_stem,
    near_threshold_band,
    serve_review,
)
from anomalib_uas.stages import review as review_stage
from anomalib_uas.stages.status import Status

pytestmark = pytest.mark.slow


def _decision(
    image_threshold: float,
    pixel_threshold: float = 0.5,
    heatmap_range: tuple[float, float] = (0.0, 1.0),
    version: str = "0123456789ab",
) -> dict:
    """A deployed decision as the calibrate stage writes it (``categories[c]["decision"]`` of calibration.json)."""
    basis = {"threshold": image_threshold, "rank": 3, "normals": 3, "target_fpr": 0.05, "confidence": 0.95,
             "certified_fpr": 0.63, "certified": False, "normals_needed": 59}  # fmt: skip
    return {
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "threshold_version": version,
        "threshold_basis": {
            "image": basis,
            "pixel": {**basis, "threshold": pixel_threshold},
            "normals": {"held_out": 3, "feedback": 0},
            "heatmap_range": list(heatmap_range),
        },
    }


@pytest.fixture(scope="module")
def evaluation(demo_root: Path, demo_category: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluation")
    evaluate_model(
        lambda category: MetaUAS(image_size=64, visualizer=False),
        demo_root,
        [demo_category],
        output_dir=root / "results",
        predictions_dir=root / "predictions",
    )
    return root / "predictions" / demo_category / "predictions.npz"


@pytest.fixture(scope="module")
def review(evaluation: Path, demo_category: str):
    saved = np.load(evaluation)
    threshold = float(np.median(saved["pred_score"][saved["gt_label"] == 0]))  # half the normal images are FPs
    embeddings = np.random.default_rng(0).normal(size=(len(saved["pred_score"]), 8))
    dataset = build_review_dataset(
        "metauas", demo_category, evaluation, _decision(threshold),
        embeddings=embeddings, prompt_paths=["prompt.png"], mlflow_run_id="run-1",
        rebuild=True,  # the pipeline tests of this session may have left a dataset of that name
    )  # fmt: skip
    yield dataset, saved, threshold
    dataset.delete()


def test_fp_and_fn_counts_match_an_independent_count(review) -> None:
    dataset, saved, threshold = review
    predicted = saved["pred_score"] > threshold
    normal = saved["gt_label"] == 0
    counts = dataset.count_values("eval")
    assert counts.get("FP", 0) == int((predicted & normal).sum())
    assert counts.get("FN", 0) == int((~predicted & ~normal).sum())
    assert counts.get("FP", 0) + counts.get("FN", 0) > 0
    assert len(dataset) == len(saved["pred_score"])


def test_saved_views_are_sorted(review) -> None:
    dataset, _, _ = review
    assert set(SAVED_VIEWS) <= set(dataset.list_saved_views())
    fp_scores = dataset.load_saved_view("false_positives").values("anomaly_score")
    fn_scores = dataset.load_saved_view("false_negatives").values("anomaly_score")
    assert fp_scores == sorted(fp_scores, reverse=True)
    assert fn_scores == sorted(fn_scores)
    worst = dataset.load_saved_view("worst_pixel_f1").values("pixel_f1")
    assert worst == sorted(worst)
    assert len(worst) > 0


def test_labels_masks_heatmaps_and_provenance(review) -> None:
    dataset, saved, threshold = review
    sample = dataset.first()
    index = list(saved["image_path"]).index(sample.filepath)
    score = float(saved["pred_score"][index])
    assert sample.anomaly_score == pytest.approx(score, abs=1e-6)
    expected = score if sample.prediction.label == "anomaly" else 1 - score
    assert sample.prediction.confidence == pytest.approx(expected, abs=1e-6)
    assert (sample.prediction.label == "anomaly") == (score > threshold)
    truth = np.asarray(Image.open(sample.gt_mask.mask_path)) > 0
    np.testing.assert_array_equal(truth, saved["gt_mask"][index])
    assert Path(sample.anomaly_map.map_path).is_file()
    assert dataset.info["mlflow_run_id"] == "run-1"
    assert dataset.info["prompt_images"] == ["prompt.png"]
    assert dataset.info["threshold_version"] == "0123456789ab"


def test_similarity_search_uses_the_given_embeddings(review) -> None:
    dataset, _, _ = review
    query = dataset.first().id
    similar = dataset.sort_by_similarity(query, k=3, brain_key="similarity")
    assert len(similar) == 3
    assert similar.first().id == query


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _grid_screenshot(url: str, path: Path) -> int:
    """Open the App in headless Chromium, wait for the sample grid and save a screenshot; return the tile count."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={path.parent / ('profile-' + path.stem)}"):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(url)
        count_tiles = "return document.querySelectorAll('[data-cy=looker]').length"
        deadline = time.monotonic() + 60
        while driver.execute_script(count_tiles) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        driver.save_screenshot(str(path))
        return int(driver.execute_script(count_tiles))
    finally:
        driver.quit()


def test_app_serves_the_false_positive_view(review, tmp_path: Path) -> None:
    dataset, _, _ = review
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("Debian's chromium and chromium-driver are needed for the App test: apt-get install them")
    port = _free_port()
    with launch_review(dataset.name, port=port, view="false_positives"):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base, timeout=5) as response:
                    assert "<html" in response.read().decode().lower()
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        false_positives = len(dataset.load_saved_view("false_positives"))
        assert false_positives > 0
        tiles = _grid_screenshot(f"{base}/datasets/{dataset.name}?view=false-positives", tmp_path / "fp.png")
        assert tiles == false_positives, f"the App shows {tiles} tiles for {false_positives} false positives"
        assert len(dataset) > false_positives  # so the tiles are the view's samples, not the whole dataset


def test_unknown_dataset_or_view_is_a_clear_error(review) -> None:
    dataset, _, _ = review
    with pytest.raises(ValueError, match="No review dataset"), launch_review("uas-nothing-here"):
        pass
    with pytest.raises(ValueError, match="no saved view"), launch_review(dataset.name, view="nope"):
        pass


def _subset(saved: np.lib.npyio.NpzFile, keep: np.ndarray, path: Path, shift: float = 0.0) -> Path:
    arrays = {key: saved[key][keep] for key in saved.files}
    arrays["pred_score"] = arrays["pred_score"] + shift
    np.savez(path, **arrays)
    return path


def test_reviewer_work_survives_re_runs_and_removed_images_go_to_a_view(
    evaluation: Path, demo_category: str, tmp_path: Path
) -> None:
    saved = np.load(evaluation)
    threshold = float(np.median(saved["pred_score"]))
    arguments = {"decision": _decision(threshold), "media_dir": tmp_path / "media"}
    dataset = build_review_dataset("persist", demo_category, evaluation, **arguments)
    try:
        normal = dataset.match(F("ground_truth.label") == "normal")
        marked, dropped = normal.first(), normal.skip(1).first()
        marked.tags.append("feedback:normal")
        marked["reviewer_label"] = fo.Classification(label="scratch-free")
        marked["comment"] = "texture, not a defect"
        marked.prediction.tags.append("checked")
        marked.save()
        ids = set(dataset.values("id"))

        dataset = build_review_dataset("persist", demo_category, evaluation, **arguments)  # same predictions
        marked.reload()
        assert set(dataset.values("id")) == ids
        assert "feedback:normal" in marked.tags
        assert marked.reviewer_label.label == "scratch-free"
        assert marked.comment == "texture, not a defect"
        assert marked.prediction.tags == ["checked"]

        keep = np.array([path != dropped.filepath for path in saved["image_path"]])  # one image left the predictions
        changed = _subset(saved, keep, tmp_path / "changed.npz", shift=0.01)
        dataset = build_review_dataset("persist", demo_category, changed, **arguments)
        marked.reload()
        assert "feedback:normal" in marked.tags
        assert marked.reviewer_label.label == "scratch-free"
        assert marked.prediction.tags == ["checked"]
        index = list(saved["image_path"]).index(marked.filepath)
        assert marked.anomaly_score == pytest.approx(float(saved["pred_score"][index]) + 0.01, abs=1e-6)
        assert len(dataset) == len(ids)
        assert dataset.load_saved_view("removed").values("filepath") == [dropped.filepath]
        counts = dataset.count_values("eval")
        assert sum(n for key, n in counts.items() if key is not None) == int(keep.sum())  # removed: not evaluated
        assert dropped.id not in dataset.load_saved_view("false_positives").values("id")
        assert Path(dataset[dropped.id].anomaly_map.map_path).is_file()

        dataset = build_review_dataset("persist", demo_category, changed, rebuild=True, **arguments)
        assert len(dataset) == int(keep.sum())
        assert dataset.match_tags("feedback:normal").count() == 0
        assert len(dataset.load_saved_view("removed")) == 0
    finally:
        dataset.delete()


def test_datasets_built_before_keyed_samples_keep_their_tags(evaluation: Path, demo_category: str) -> None:
    saved = np.load(evaluation)
    dataset = fo.Dataset(f"uas-legacy-{demo_category}", persistent=True)  # the layout of earlier versions
    dataset.add_samples([fo.Sample(filepath=str(path)) for path in saved["image_path"]])
    sample = dataset.first()
    sample.tags.append("feedback:hard")
    sample.save()
    try:
        dataset = build_review_dataset("legacy", demo_category, evaluation, _decision(0.5))
        assert len(dataset) == len(saved["image_path"])
        assert dataset.match_tags("feedback:hard").count() == 1
    finally:
        dataset.delete()


def _open_event_stream(port: int, dataset: str) -> http.client.HTTPConnection:
    """Hold the App's event stream open, as a browser tab does."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"initializer": {"dataset": dataset}, "events": ["state_update"], "subscription": "test"})
    connection.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.read1(16)
    return connection


@pytest.mark.parametrize("stop", ["timeout", "sigint"])
def test_launch_leaves_no_process_behind(review, stop: str) -> None:
    dataset, _, _ = review
    port = _free_port()
    command = [sys.executable, "-m", "anomalib_uas.cli", "review", "--launch", dataset.name, "--port", str(port)]
    command += ["--timeout", "8" if stop == "timeout" else "600"]
    process = subprocess.Popen(command, env=os.environ.copy(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                stream = _open_event_stream(port, dataset.name)
                break
            except OSError:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "the App did not come up"
                time.sleep(0.5)
        started = psutil.Process(process.pid).children(recursive=True)
        assert any("--51-service" in child.cmdline() for child in started)
        if stop == "sigint":
            process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, process.stderr.read()
        stream.close()
        _, alive = psutil.wait_procs(started, timeout=2)
        assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_ctrl_c_while_the_app_starts_is_not_lost(review, monkeypatch: pytest.MonkeyPatch) -> None:
    # FiftyOne polls its starting server inside bare `except:` blocks: a Ctrl-C landing there raises nothing
    dataset, _, _ = review
    launch = fo.launch_app

    def launch_swallowing_a_ctrl_c(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:  # as FiftyOne's bare excepts do
            pass
        return launch(*args, **kwargs)

    monkeypatch.setattr(fo, "launch_app", launch_swallowing_a_ctrl_c)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    handler = signal.getsignal(signal.SIGINT)
    start = time.monotonic()
    serve_review(dataset.name, port=_free_port(), timeout=120)
    assert time.monotonic() - start < 60, "serving went on after the Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is handler
    _, alive = psutil.wait_procs([c for c in psutil.Process().children(recursive=True) if c.pid not in before], 2)
    assert not alive


def test_canonical_path_and_media_stem_agree_across_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "data" / "brick" / "test" / "crack" / "000.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    (tmp_path / "linked").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    spellings = [
        "data/brick/test/crack/000.png",
        str(image),
        "data/brick/../brick/test/crack/000.png",
        "linked/brick/test/crack/000.png",
        str(tmp_path / "linked" / "brick" / "test" / "crack" / "000.png"),
    ]
    assert {canonical_path(path) for path in spellings} == {str(image.resolve())}
    assert len({media_stem(path) for path in spellings}) == 1
    assert media_stem(spellings[0]).startswith("crack-000-")


def _respelled(saved: np.lib.npyio.NpzFile, path: Path, spell) -> Path:
    """A copy of the predictions whose image paths are spelled differently."""
    arrays = {key: saved[key] for key in saved.files}
    arrays["image_path"] = np.array([spell(str(image)) for image in saved["image_path"]])
    np.savez(path, **arrays)
    return path


def _false_positive(dataset) -> object:
    """The normal sample with the highest score: a false positive at the median threshold of the normals."""
    return dataset.match(F("ground_truth.label") == "normal").sort_by("anomaly_score", reverse=True).first()


def _assert_one_reviewed_sample(dataset, reviewed, count: int) -> None:
    """One sample per image, the reviewed one in the false positives, no removed sample."""
    assert len(dataset) == count
    filepaths = dataset.values("filepath")
    assert len(set(filepaths)) == count
    assert dataset.match(F("filepath") == reviewed.filepath).values("id") == [reviewed.id]
    assert reviewed.removed is False
    assert len(dataset.load_saved_view("removed")) == 0
    false_positives = dataset.load_saved_view("false_positives")
    assert reviewed.id in false_positives.values("id")
    assert len(set(false_positives.values("filepath"))) == len(false_positives)


def test_relative_absolute_and_symlinked_image_paths_are_one_sample(
    evaluation: Path, demo_root: Path, demo_category: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dvc runs the stages from the repository root: the predictions hold paths relative to it
    saved = np.load(evaluation)
    root = demo_root.parent
    monkeypatch.chdir(root)
    relative = _respelled(saved, tmp_path / "relative.npz", lambda path: os.path.relpath(path, root))
    assert not Path(str(np.load(relative)["image_path"][0])).is_absolute()
    absolute = _respelled(saved, tmp_path / "absolute.npz", lambda path: str(Path(path).absolute()))
    (tmp_path / "linked").symlink_to(root, target_is_directory=True)
    linked = _respelled(
        saved,
        tmp_path / "linked.npz",
        lambda path: str(tmp_path / "linked" / demo_root.name / ".." / os.path.relpath(path, root)),
    )
    assert all(Path(str(path)).is_file() for path in np.load(linked)["image_path"])
    threshold = float(np.median(saved["pred_score"][saved["gt_label"] == 0]))
    arguments = {"decision": _decision(threshold), "media_dir": tmp_path / "media"}
    count = len(saved["image_path"])
    dataset = build_review_dataset("relpaths", demo_category, relative, rebuild=True, **arguments)
    try:
        marked = _false_positive(dataset)
        assert Path(marked.filepath).is_absolute()
        marked.tags.append("feedback:normal")
        marked.prediction["note"] = "texture"
        marked["comment"] = "not a defect"
        marked.save()
        heatmap = marked.anomaly_map.map_path

        for predictions in (relative, absolute, linked):
            dataset = build_review_dataset("relpaths", demo_category, predictions, **arguments)
            marked.reload()
            _assert_one_reviewed_sample(dataset, marked, count)
            assert marked.tags == ["feedback:normal"]
            assert marked.prediction["note"] == "texture"
            assert marked.comment == "not a defect"
            assert marked.filepath == canonical_path(marked.filepath)
            assert marked.anomaly_map.map_path == heatmap  # the same PNG for every spelling
            assert len(list((tmp_path / "media" / "map").iterdir())) == count
    finally:
        dataset.delete()


@pytest.mark.parametrize("reviewed", ["original", "copy", "both"])
def test_duplicates_left_by_earlier_versions_are_merged_into_the_reviewed_copy(
    evaluation: Path, demo_category: str, tmp_path: Path, reviewed: str
) -> None:
    saved = np.load(evaluation)
    threshold = float(np.median(saved["pred_score"][saved["gt_label"] == 0]))
    arguments = {"decision": _decision(threshold), "media_dir": tmp_path / "media"}
    model = f"dupes-{reviewed}"
    dataset = build_review_dataset(model, demo_category, evaluation, rebuild=True, **arguments)
    try:
        # the state the old bug left: every image twice, the first copy removed, a fresh untagged copy after it
        copies = [
            fo.Sample(
                filepath=sample.filepath,
                model=model,
                category=demo_category,
                anomaly_score=sample.anomaly_score,
                ground_truth=fo.Classification(label=sample.ground_truth.label),
                prediction=fo.Classification(label=sample.prediction.label, confidence=sample.prediction.confidence),
                removed=False,
            )
            for sample in dataset
        ]
        originals = dataset.values("id")
        original = _false_positive(dataset)
        copy = dataset[dataset.add_samples(copies)[originals.index(original.id)]]
        dataset.set_values("removed", dict.fromkeys(originals, True), key_field="id")
        if reviewed in ("original", "both"):
            original.tags.append("feedback:normal")
            original.prediction["note"] = "texture"
            original["comment"] = "not a defect"
            original.save()
        if reviewed in ("copy", "both"):
            copy.tags.append("checked")
            copy.prediction.tags.append("seen")
            copy["second_look"] = "agreed"
            copy.save()
        assert len(dataset) == 2 * len(copies)
        kept = copy if reviewed == "copy" else original

        shifted = _subset(saved, np.ones(len(copies), dtype=bool), tmp_path / "shifted.npz", shift=0.01)
        dataset = build_review_dataset(model, demo_category, shifted, **arguments)
        kept.reload()
        _assert_one_reviewed_sample(dataset, kept, len(copies))
        index = list(saved["image_path"]).index(kept.filepath)
        assert kept.anomaly_score == pytest.approx(float(saved["pred_score"][index]) + 0.01, abs=1e-6)
        if reviewed in ("original", "both"):
            assert "feedback:normal" in kept.tags
            assert kept.prediction["note"] == "texture"
            assert kept.comment == "not a defect"
        if reviewed in ("copy", "both"):
            assert "checked" in kept.tags
            assert "seen" in kept.prediction.tags
            assert kept.second_look == "agreed"
        if reviewed == "both":
            assert kept.tags == ["feedback:normal", "checked"]
        assert dataset.match_tags(["feedback:normal", "checked"]).values("id") == [kept.id]
    finally:
        dataset.delete()


def _synthetic(
    folder: Path, scores: list[float], labels: list[int], maps: list[np.ndarray] | None = None, side: int = 4
) -> Path:
    """Predictions of made-up images (the files exist), with the given scores, labels and float16 maps."""
    count = len(scores)
    maps = maps if maps is not None else [np.full((side, side), 0.1 * (i % 10)) for i in range(count)]
    paths = []
    for index, label in enumerate(labels):
        path = folder / "images" / ("defect" if label else "good") / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((side, side, 3), 40 * (index % 6), dtype=np.uint8)).save(path)
        paths.append(str(path))
    masks = np.zeros((count, side, side), dtype=bool)
    masks[np.asarray(labels, dtype=bool), : side // 2, : side // 2] = True
    predictions = folder / "predictions.npz"
    np.savez(
        predictions,
        image_path=np.array(paths),
        gt_label=np.asarray(labels, dtype=np.int64),
        pred_score=np.asarray(scores, dtype=np.float32),
        anomaly_map=np.stack(maps).astype(np.float16),
        gt_mask=masks,
    )
    return predictions


def _png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_labels_and_masks_are_drawn_above_the_deployed_thresholds(tmp_path: Path) -> None:
    at, above = 0.5, float(np.nextafter(np.float32(0.5), np.float32(1)))
    heat = np.zeros((4, 4))
    heat[0, 0] = 0.5  # exactly the pixel threshold: not masked
    heat[0, 1] = float(np.nextafter(np.float16(0.5), np.float16(1)))  # the next float16 above it: masked
    predictions = _synthetic(tmp_path, [at, above], [0, 1], [heat, heat])
    decision = _decision(0.5, pixel_threshold=0.5, version="feedbeefcafe")
    dataset = build_review_dataset("deployed", "synthetic", predictions, decision, media_dir=tmp_path / "media")
    try:
        by_score = dataset.sort_by("anomaly_score")
        assert by_score.values("prediction.label") == ["normal", "anomaly"]  # a score at the threshold is normal
        masked = _png(by_score.first().pred_mask.mask_path) > 0
        expected = np.zeros((4, 4), dtype=bool)
        expected[0, 1] = True
        np.testing.assert_array_equal(masked, expected)
        info = dataset.info
        assert info["threshold_version"] == "feedbeefcafe"
        assert (info["image_threshold"], info["pixel_threshold"]) == (0.5, 0.5)
        assert info["threshold_basis"] == decision["threshold_basis"]
        assert info["heatmap_range"] == [0.0, 1.0]
    finally:
        dataset.delete()


def test_a_decision_without_its_heatmap_range_is_refused() -> None:
    decision = _decision(0.5)
    del decision["threshold_basis"]["heatmap_range"]
    with pytest.raises(ValueError, match="heatmap_range"):
        deployed_decision(decision)
    with pytest.raises(ValueError, match="lo <= hi"):
        deployed_decision(_decision(0.5, heatmap_range=(1.0, 0.0)))


def test_heatmaps_share_one_fixed_colour_range(tmp_path: Path) -> None:
    # a normal image whose map stays low and a defect whose map goes far above the threshold: per-image min-max
    # scaling would paint both maxima 255
    quiet = np.tile(np.linspace(0.0, 0.5, 4), (4, 1))
    loud = np.tile(np.linspace(0.0, 2.0, 4), (4, 1))
    quiet[3, 3] = loud[3, 3] = 0.25  # one raw value in both images
    predictions = _synthetic(tmp_path, [0.1, 0.9], [0, 1], [quiet, loud])
    decision = _decision(0.5, pixel_threshold=0.5, heatmap_range=(0.0, 1.0))  # the pixel threshold mid-scale
    dataset = build_review_dataset("fixedrange", "synthetic", predictions, decision, media_dir=tmp_path / "media")
    try:
        quiet_sample, loud_sample = dataset.sort_by("anomaly_score")
        shown = {}
        for sample, raw in ((quiet_sample, quiet), (loud_sample, loud)):
            assert sample.anomaly_map.range == [0, 255]
            shown[sample.id] = png = _png(sample.anomaly_map.map_path)
            stored = raw.astype(np.float16).astype(np.float64)
            np.testing.assert_array_equal(png, (np.clip(stored, 0.0, 1.0) * 255).round().astype(np.uint8))
        quiet_png, loud_png = shown[quiet_sample.id], shown[loud_sample.id]
        assert quiet_png.max() == 128  # its largest value is the pixel threshold: mid-scale, not full heat
        assert loud_png.max() == 255
        assert quiet_png[3, 3] == loud_png[3, 3] == 64  # the same raw value, the same colour
    finally:
        dataset.delete()


def test_the_app_shows_the_heatmap_and_keeps_the_reviewers_settings(tmp_path: Path) -> None:
    predictions = _synthetic(tmp_path, [0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1])
    arguments = {"decision": _decision(0.5), "media_dir": tmp_path / "media"}
    dataset = build_review_dataset("appconfig", "synthetic", predictions, rebuild=True, **arguments)
    try:
        config = fo.load_dataset(dataset.name).app_config  # as stored
        assert {"ground_truth", "prediction", "anomaly_map"} <= set(config.active_fields.paths)
        assert not config.active_fields.exclude
        scales = [scale for scale in config.color_scheme.colorscales if scale["path"] == "anomaly_map"]
        assert [scale["list"] for scale in scales] == [HEATMAP_COLORSCALE]
        assert config.color_scheme.color_by == "value"

        sample = dataset.first()
        sample["verdict"] = fo.Classification(label="scratch")  # a reviewer's label field
        sample.save()
        dataset.app_config.color_scheme.opacity = 0.3  # a reviewer's App setting
        dataset.app_config.color_scheme.color_by = "field"
        dataset.save()
        dataset = build_review_dataset("appconfig", "synthetic", predictions, **arguments)
        config = fo.load_dataset(dataset.name).app_config
        assert {"ground_truth", "prediction", "anomaly_map", "verdict"} <= set(config.active_fields.paths)
        assert config.color_scheme.opacity == pytest.approx(0.3)
        assert config.color_scheme.color_by == "field"
        assert [scale["path"] for scale in config.color_scheme.colorscales].count("anomaly_map") == 1
    finally:
        dataset.delete()


def test_near_threshold_band_takes_the_nearest_ranks_on_each_side() -> None:
    tiny = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert near_threshold_band(tiny, 0.44) == (0.2, 0.7, NEAR_THRESHOLD_MIN)
    assert near_threshold_band(tiny, 0.4) == (0.2, 0.7, NEAR_THRESHOLD_MIN)  # a score at the threshold is below it
    assert near_threshold_band(tiny, 0.05) == (0.05, 0.3, NEAR_THRESHOLD_MIN)  # nothing below: the threshold
    assert near_threshold_band(tiny[:2], 5.0) == (0.1, 5.0, NEAR_THRESHOLD_MIN)  # fewer than m: all of them
    real = np.arange(400) / 400  # 5 % of 400: 20 per side
    lower, upper, per_side = near_threshold_band(real, 0.5)
    assert per_side == 20
    assert ((real >= lower) & (real <= 0.5)).sum() == 20
    assert ((real > 0.5) & (real <= upper)).sum() == 20


def test_near_threshold_view_holds_the_current_samples_nearest_to_the_threshold(tmp_path: Path) -> None:
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.45]  # the last one leaves on the second run
    labels = [0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0]
    first = _synthetic(tmp_path / "first", scores, labels)
    arguments = {"decision": _decision(0.44), "media_dir": tmp_path / "media"}
    dataset = build_review_dataset("near", "synthetic", first, rebuild=True, **arguments)
    try:
        near = dataset.load_saved_view("near_threshold")
        # 0.4, 0.3, 0.2 at or below 0.44; 0.45, 0.5, 0.6 above it
        assert near.values("anomaly_score") == pytest.approx([0.45, 0.4, 0.5, 0.3, 0.6, 0.2])
        leaving = near.first().id

        saved = np.load(first)
        second = tmp_path / "second.npz"
        np.savez(second, **{key: saved[key][:-1] for key in saved.files})
        dataset = build_review_dataset("near", "synthetic", second, **arguments)
        near = dataset.load_saved_view("near_threshold")
        assert near.values("anomaly_score") == pytest.approx([0.4, 0.5, 0.3, 0.6, 0.2, 0.7])  # nearest first
        assert leaving not in near.values("id")
        assert dataset.load_saved_view("removed").values("id") == [leaving]
        assert dataset.info["near_threshold"]["per_side"] == NEAR_THRESHOLD_MIN
        assert dataset.info["near_threshold"]["scores"] == pytest.approx([0.2, 0.7])
    finally:
        dataset.delete()


def test_the_stage_reviews_at_the_calibrated_decision_and_skips_uncalibrated_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    category = "stagecheck"
    models = ["calibrated", "uncalibrated", "unready"]
    params = SimpleNamespace(models=models, data=SimpleNamespace(categories=[category]))
    monkeypatch.setattr(review_stage, "load_params", lambda path: params)
    monkeypatch.setattr(review_stage, "read_status", lambda folder: Status(folder, ready=folder.name != "unready"))
    monkeypatch.setattr(review_stage, "model_kwargs", lambda model, status, params: {})
    monkeypatch.setattr(review_stage, "load_model", lambda *args, **kwargs: object())
    monkeypatch.setattr(review_stage, "embeddings", lambda module, paths: np.eye(len(paths), 4))
    predictions, calibration = tmp_path / "predictions", tmp_path / "calibration"
    for model in models[:2]:
        _synthetic(predictions / model / category, [0.2, 0.3, 0.6, 0.7], [0, 0, 0, 1])
        evaluation = {"weights": "", "mlflow_run_id": "run-9", "prompt_paths": {category: ["prompt.png"]}}
        (predictions / model / "evaluation.json").write_text(json.dumps(evaluation))  # no thresholds any more
    (calibration / "calibrated").mkdir(parents=True)
    (calibration / "uncalibrated").mkdir()
    calibrated = {"model": "calibrated", "skipped": None, "categories": {category: {"decision": _decision(0.5)}}}
    (calibration / "calibrated" / "calibration.json").write_text(json.dumps(calibrated))
    skipped = {"model": "uncalibrated", "skipped": "too few normals", "categories": {}}
    (calibration / "uncalibrated" / "calibration.json").write_text(json.dumps(skipped))
    summary = tmp_path / "reports" / "review.json"
    paths = ["--params", str(tmp_path / "params.yaml"), "--checkpoints", str(tmp_path / "checkpoints"),
             "--predictions", str(predictions), "--calibration", str(calibration), "--media", str(tmp_path / "media"),
             "--summary", str(summary)]  # fmt: skip
    name = f"uas-calibrated-{category}"
    try:
        assert review_stage.cli(paths) == 0
        # at the deployed threshold 0.5 the normal image scored 0.6 is the one false alarm; the defect is found
        assert json.loads(summary.read_text()) == {name: {"FP": 1, "FN": 0, "samples": 4}}
        assert fo.load_dataset(name).info["threshold_version"] == "0123456789ab"
        assert not fo.dataset_exists(f"uas-uncalibrated-{category}")

        (calibration / "uncalibrated" / "calibration.json").unlink()  # a ready model must have been calibrated
        assert review_stage.cli(paths) == 2
        assert json.loads(summary.read_text()) == {name: {"FP": 1, "FN": 0, "samples": 4}}  # left as it was
    finally:
        for model in models:
            if fo.dataset_exists(f"uas-{model}-{category}"):
                fo.delete_dataset(f"uas-{model}-{category}")
