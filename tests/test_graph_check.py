# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The check between a served ONNX graph and the eager model: what it measures, the full-size official MetaUAS
within its tolerance, and a version whose graph fails it registered to serve eagerly.

``scripts/test.sh`` runs this file and the parity tests a second time under another instruction set
(``ATEN_CPU_CAPABILITY``), so that a tolerance tuned on one CPU fails here rather than on a user's machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from decisions import fixed_decision

from anomalib_uas import registry, tracking
from anomalib_uas.data.images import read_image
from anomalib_uas.models import MetaUAS
from anomalib_uas.serving import runtime
from anomalib_uas.serving.runtime import (
    GRAPH_TOLERANCE,
    EagerRunner,
    GraphMismatchError,
    GraphTolerance,
    check_graph,
    compare_outputs,
    export_graph,
)


def _outputs(scores: list[float], maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(scores, dtype=np.float32), maps.astype(np.float32)


def test_map_differences_are_measured_against_the_maps_range() -> None:
    maps = np.linspace(0, 200, 2 * 4 * 4).reshape(2, 4, 4)  # a map in raw units, range 200
    shifted = maps.copy()
    shifted[1, 2, 3] += 0.02
    difference = compare_outputs(_outputs([1.0, 2.0], shifted), _outputs([1.0, 2.0], maps))
    assert difference.map_relative == pytest.approx(1e-4, rel=1e-3)
    assert difference.score_relative == 0
    # the same absolute difference on a map of range 0.02 is all of it
    small = maps / 1e4
    difference = compare_outputs(_outputs([1.0, 2.0], small + (shifted - maps)), _outputs([1.0, 2.0], small))
    assert difference.map_relative == pytest.approx(1.0, rel=1e-3)


def test_scores_are_measured_against_their_magnitude_and_flat_outputs_against_a_floor() -> None:
    maps = np.zeros((2, 3, 3))
    difference = compare_outputs(_outputs([0.5, 0.25001], maps), _outputs([0.5, 0.25], maps))
    assert difference.score_relative == pytest.approx(2e-5, rel=1e-2)
    noise = maps.copy()
    noise[0, 0, 0] = 1e-7  # a query equal to its prompt: the map is float noise around 0
    assert compare_outputs(_outputs([0.5, 0.25], noise), _outputs([0.5, 0.25], maps)).map_relative == pytest.approx(
        1e-7 / runtime.SCALE_FLOOR, rel=1e-3
    )


def test_labels_and_mask_pixels_are_counted_at_the_registered_thresholds() -> None:
    maps = np.full((3, 2, 2), 0.2)
    maps[0, 0, 0] = 0.7
    graph = maps.copy()
    graph[0, 0, 0], graph[2, 1, 1] = 0.69, 0.61  # one pixel crosses 0.65 downward, one upward
    difference = compare_outputs(
        _outputs([0.9, 0.401, 0.1], graph), _outputs([0.9, 0.399, 0.1], maps), thresholds=(0.4, 0.6)
    )
    assert (difference.labels_changed, difference.mask_pixels_changed, difference.images) == (1, 1, 3)
    assert "1 labels and 1 mask pixels changed on 3 images" in difference.describe()


def test_outputs_of_another_shape_never_pass() -> None:
    maps = np.zeros((2, 4, 4))
    difference = compare_outputs(_outputs([0.1], maps[:1]), _outputs([0.1, 0.2], maps))
    assert difference.map_relative == difference.score_relative == float("inf")


@pytest.fixture(scope="module")
def official_metauas(tmp_path_factory: pytest.TempPathFactory, parity_dir: Path, parity_weights: ModuleType) -> dict:
    """The official MetaUAS architecture with the parity weights at 256 px, its graph exported on demo images."""
    root = tmp_path_factory.mktemp("graph")
    path = root / "metauas.ckpt"
    torch.save(parity_weights.make_state_dict(parity_weights.load_spec(parity_dir / "metauas" / "spec.json"), 0), path)
    module = MetaUAS.from_official_checkpoint(path, image_size=256, visualizer=False).eval()
    inputs, transform = np.load(parity_dir / "metauas" / "inputs.npz"), module.pre_processor.transform
    module.model.set_prompts(transform(torch.from_numpy(inputs["prompt_image"][:1])))
    images = transform(torch.from_numpy(inputs["query_image"]))
    return {"model": module.model, "images": images, "graph": export_graph(module.model, images, root / "onnx")}


def test_the_full_size_official_metauas_graph_is_within_the_tolerance(official_metauas: dict) -> None:
    model, images, graph = official_metauas["model"], official_metauas["images"], official_metauas["graph"]
    difference = check_graph(model, images, graph, thresholds=(0.5, 0.5))
    assert difference.images == len(images)
    # the margin the README states: the worst case measured anywhere is a tenth of the tolerance or less
    assert difference.map_relative <= GRAPH_TOLERANCE.map_relative / 10
    assert difference.score_relative <= GRAPH_TOLERANCE.score_relative / 10
    print(f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'native')}: {difference.describe()}")


def test_a_graph_beyond_the_tolerance_is_refused_naming_the_output(official_metauas: dict) -> None:
    model, images, graph = official_metauas["model"], official_metauas["images"], official_metauas["graph"]
    with pytest.raises(GraphMismatchError, match=r"anomaly_map differs from the eager model's by .* of its scale"):
        check_graph(model, images, graph, tolerance=GraphTolerance(map_relative=0.0, score_relative=1.0))


@pytest.mark.slow
def test_a_version_whose_graph_fails_serves_the_eager_model(
    demo_root: Path,
    demo_category: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "GRAPH_TOLERANCE", GraphTolerance(0.0, 0.0))  # no graph passes
    torch.manual_seed(0)
    from anomalib_uas.models.metauas.checkpoint import to_official

    torch.save(to_official(MetaUAS(pretrained_backbone=True, image_size=64).model), tmp_path / "metauas.pth")
    normal = sorted((demo_root / demo_category / "train" / "good").glob("*.png"))
    queries = sorted((demo_root / demo_category / "test").glob("*/*.png"))
    kwargs = {"image_size": 64, "backbone": "efficientnet_lite0", "k_shot": 1, "prompt_strategy": "random", "seed": 0}
    servable = registry.ServableModel(
        model="metauas",
        category=demo_category,
        checkpoint=tmp_path / "metauas.pth",
        prompt_paths=normal[:1],
        config={"model": "metauas", "category": demo_category, "kwargs": kwargs,
                **fixed_decision(0.5, 0.5)},
        example_image=queries[0],
        check_images=tuple(queries[1:3]),
    )  # fmt: skip
    with (
        caplog.at_level(logging.WARNING, logger="anomalib_uas.registry"),
        tracking.stage_run("evaluate", "metauas", {}),
    ):
        version = registry.register_model(servable, {"pixel_AUPRO": 0.5}, "pixel_AUPRO")
    assert version.tags[registry.RUNTIME_TAG] == "eager"
    assert version.tags[registry.GRAPH_CHECK_TAG].startswith("failed: the exported graph's anomaly_map differs")
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith(f"metauas {demo_category}: the exported graph's anomaly_map differs")
    assert warning.endswith("this version serves the eager model")
    name = registry.registered_name(demo_category)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
    assert not (folder / "artifacts" / "graph").exists()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    assert pyfunc.unwrap_python_model().runtime == "eager"
    served = pyfunc.predict(pd.DataFrame({"image": [queries[0].read_bytes()]}), params={"map_format": "none"})
    module = MetaUAS.from_official_checkpoint(tmp_path / "metauas.pth", visualizer=False, **kwargs).eval()
    transform = module.pre_processor.transform
    module.model.set_prompts(transform(read_image(normal[0])).unsqueeze(0))
    scores, _ = EagerRunner(module.model)(transform(read_image(queries[0])).unsqueeze(0))
    assert served["pred_score"].iloc[0] == pytest.approx(float(scores[0]), abs=1e-6)
