# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The registry belongs to its repository: a copy (``cp -a``) logs, registers and serves inside itself, and a
version serves only the graph it was registered with (real sqlite store, MetaUAS at 64 px on the offline
EfficientNet-Lite0 encoder)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from decisions import fixed_decision
from mlflow.utils.file_utils import local_file_uri_to_path

from anomalib_uas import registry, tracking
from anomalib_uas.cli import main
from anomalib_uas.data import DEMO_CATEGORIES
from anomalib_uas.models import MetaUAS
from anomalib_uas.models.metauas.checkpoint import to_official
from anomalib_uas.predict import load_scorer
from anomalib_uas.serving.pyfunc import GRAPH_DIGESTS
from anomalib_uas.serving.runtime import GraphFileError
from anomalib_uas.weights import sha256sum

pytestmark = pytest.mark.slow

KWARGS = {"image_size": 64, "backbone": "efficientnet_lite0", "k_shot": 1, "prompt_strategy": "random", "seed": 0}
ARTIFACT_COLUMNS = [
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
]


def _open(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in ``repo`` as its commands do: in its folder, on the store there (the default tracking URI)."""
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what mlflow.set_tracking_uri exports; undone after the test
    mlflow.set_tracking_uri(uri)


def _register(repo: Path, demo_root: Path, category: str, metric: float, threshold: float = 0.5) -> str:
    normal = sorted((demo_root / category / "train" / "good").glob("*.png"))
    queries = sorted((demo_root / category / "test").glob("*/*.png"))
    servable = registry.ServableModel(
        model="metauas",
        category=category,
        checkpoint=repo / "checkpoints" / "metauas.pth",
        prompt_paths=normal[:1],
        config={"model": "metauas", "category": category, "kwargs": KWARGS,
                **fixed_decision(threshold, 0.5)},
        example_image=queries[0],
        check_images=(queries[-1],),
    )  # fmt: skip
    with tracking.stage_run("evaluate", "metauas", {"evaluate": {"k_shot": 1}}):
        return registry.register_model(servable, {"pixel_AUPRO": metric}, "pixel_AUPRO").version


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    """A repository whose store registers MetaUAS for two categories (version 1 of each)."""
    repo = tmp_path_factory.mktemp("original") / "repo"
    (repo / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(to_official(MetaUAS(pretrained_backbone=True, image_size=64).model), repo / "checkpoints/metauas.pth")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _open(repo, monkeypatch)
        for category in DEMO_CATEGORIES[:2]:
            _register(repo, demo_root, category, metric=0.5)
    return repo


def _copy(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def _stored_graph(name: str, version: str) -> Path:
    storage = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    return Path(local_file_uri_to_path(storage)) / "artifacts" / "graph" / "model.onnx"


def _text_cells(database: Path) -> Iterator[tuple[str, str, str]]:
    """``(table, column, value)`` of every text cell of a sqlite database."""
    with closing(sqlite3.connect(database)) as connection:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]:
                for (value,) in connection.execute(f"SELECT {column} FROM {table}"):
                    if isinstance(value, str):
                        yield table, column, value


def _score(uri: str, image: Path) -> float:
    frame = pd.DataFrame({"image": [image.read_bytes()]})
    return float(mlflow.pyfunc.load_model(uri).predict(frame, params={"map_format": "none"})["pred_score"].iloc[0])


def test_a_copied_repository_logs_registers_and_serves_inside_itself(
    original: Path, tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    category = DEMO_CATEGORIES[0]
    name, image = registry.registered_name(category), sorted((demo_root / category / "test").glob("*/*.png"))[0]
    copy = _copy(original, tmp_path / "copy")
    moved = original.rename(original.with_name("moved"))  # the original is gone: nothing of the copy may lead there
    before = _tree(moved)
    try:
        _open(copy, monkeypatch)
        second = _register(copy, demo_root, category, metric=0.9, threshold=0.4)
        scorer, uri = load_scorer(category)  # `uas predict`'s opener: the champion, now the copy's own version
        first = _score(f"models:/{name}/1", image)  # registered in the original, served from the copy
        graph_from = mlflow.MlflowClient().get_model_version(name, second).tags[registry.GRAPH_FROM_TAG]
        graph = _stored_graph(name, second)
        config = json.loads((graph.parents[1] / "config.json").read_text())
    finally:
        written = original.exists()  # something of the copy led there
        if written:
            original.rename(tmp_path / "written")
        moved.rename(original)  # the original, as the other tests find it
    assert not written, f"the copy wrote into {original}: {sorted(_tree(tmp_path / 'written'))[:5]}"
    assert _tree(original) == before, "the original's files changed"
    assert uri == f"models:/{name}/{second}"
    assert graph_from == "1"  # version 1's graph was read from the copy's artifacts and reused
    assert config[GRAPH_DIGESTS] == {"model.onnx": sha256sum(graph)}
    assert graph.is_relative_to(copy / "mlartifacts")
    served = scorer.predict(pd.DataFrame({"image": [image.read_bytes()]}), params={"map_format": "none"})
    assert served["pred_score"].iloc[0] == pytest.approx(first, abs=1e-6)
    cells = list(_text_cells(copy / "mlflow.db"))
    assert [cell for cell in cells if str(original) in cell[2]] == []
    paths = [(t, c, v) for t, c, v in cells if (t, c) in ARTIFACT_COLUMNS and v.startswith(("/", "file:"))]
    assert {(t, c) for t, c, _ in paths} >= set(ARTIFACT_COLUMNS) - {("model_versions", "source")}
    assert all(v.startswith((str(copy) + "/", copy.as_uri() + "/")) for _, _, v in paths), paths


@pytest.fixture
def tampered(original: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the original repository, opened, for tests that damage its artifacts."""
    copy = _copy(original, tmp_path / "repo")
    _open(copy, monkeypatch)
    return copy


def test_another_categorys_graph_is_refused_naming_the_file_the_version_and_the_fix(
    tampered: Path, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    brick, grass = (registry.registered_name(category) for category in DEMO_CATEGORIES[:2])
    graph = _stored_graph(brick, "1")
    graph.write_bytes(_stored_graph(grass, "1").read_bytes())  # a valid graph that ONNX Runtime serves silently
    with pytest.raises(GraphFileError) as caught:
        mlflow.pyfunc.load_model(f"models:/{brick}/1")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{graph} has sha256 ")
    assert f"the graph of {brick} version 1 cannot be served; delete version 1 of {brick}" in message
    assert message.endswith(f"rm -r predictions/metauas/{DEMO_CATEGORIES[0]} && dvc repro evaluate@metauas")
    # `uas predict` (and `uas serve`, the same load) says it in one line with exit code 2
    folder = demo_root / DEMO_CATEGORIES[0] / "test"
    code = main(["predict", str(folder), "--category", DEMO_CATEGORIES[0], "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error == f"uas predict: error: {message}"


def _drop_digests(graph: Path) -> None:
    """Make the version look registered before graph digests were recorded."""
    config = graph.parents[1] / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != GRAPH_DIGESTS}))


@pytest.mark.parametrize("recorded", [True, False], ids=["digest-recorded", "registered-before-digests"])
def test_a_truncated_graph_is_one_line_not_an_onnxruntime_traceback(tampered: Path, recorded: bool) -> None:
    name = registry.registered_name(DEMO_CATEGORIES[0])
    graph = _stored_graph(name, "1")
    graph.write_bytes(graph.read_bytes()[:1000])
    if not recorded:
        _drop_digests(graph)
    with pytest.raises(GraphFileError) as caught:
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    problem = "has sha256 " if recorded else "cannot be read by ONNX Runtime ([ONNXRuntimeError] : 7 : INVALID_PROTOBUF"
    assert str(caught.value).startswith(f"{graph} {problem}")
    assert "\n" not in str(caught.value)
    assert f"the graph of {name} version 1 cannot be served" in str(caught.value)
