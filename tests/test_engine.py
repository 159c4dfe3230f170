# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The three models through anomalib's Engine: test, predict on a folder, torch and ONNX export equal to eager."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import open_clip
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType, TorchInferencer
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule

from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
from anomalib_uas.models.components.base import ENGINE_LOGGER, PredictWeightsMessage

pytestmark = pytest.mark.slow


def _mini_vit_l(folder: Path) -> str:
    """A 2-block ViT-L/14@336 layout: ONNX tracing time grows with the layer count; every operation stays."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 336, "layers": 2, "width": 64, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 9},
    }
    (folder / "uas-test-mini-ViT-L-14-336.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "uas-test-mini-ViT-L-14-336.json")
    return "uas-test-mini-ViT-L-14-336"


# name -> (build(tmp_path), query side, map side)
MODELS: dict[str, tuple[Callable[[Path], AnomalibModule], int, int]] = {
    "metauas": (lambda folder: MetaUAS(image_size=64, visualizer=False), 64, 64),
    "inctrl": (
        lambda folder: InCTRL(
            clip_model="uas-tiny-ViT-B-16-plus-240", clip_pretrained=None, k_shot=2, visualizer=False
        ),
        240,
        240,
    ),
    "faprompt": (
        lambda folder: FAPrompt(clip_model=_mini_vit_l(folder), clip_pretrained=None, image_size=56, visualizer=False),
        64,
        56,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_engine_test_predict_and_export(
    name: str,
    demo_root: Path,
    demo_category: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    build, query_side, map_side = MODELS[name]
    model = build(tmp_path)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    datamodule = MVTecAD(root=demo_root, category=demo_category, eval_batch_size=4, num_workers=0)
    results = engine.test(model, datamodule=datamodule, verbose=False)[0]
    assert {"image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPRO"} <= set(results)
    assert all(0.0 <= results[key] <= 1.0 for key in ("image_AUROC", "pixel_AUROC"))

    folder = tmp_path / "queries"
    folder.mkdir()
    for path in sorted((demo_root / demo_category / "test").glob("*/*.png"))[:3]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    with caplog.at_level(logging.INFO, logger=ENGINE_LOGGER):
        predictions = engine.predict(model, data_path=folder)
    # anomalib warns that weights "will not be loaded" although the instance's weights are used; we say so instead
    assert "will not be loaded" not in caplog.text
    assert any(r.getMessage() == PredictWeightsMessage.RIGHT and r.levelno == logging.INFO for r in caplog.records)
    assert sum(len(batch.pred_score) for batch in predictions) == 3
    assert all(batch.anomaly_map.shape[-2:] == (map_side, map_side) for batch in predictions)

    image = torch.rand(1, 3, query_side, query_side)
    model.eval()
    with torch.no_grad():
        expected = model(image)
    torch_path = engine.export(model, ExportType.TORCH, export_root=tmp_path / "export")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferred = TorchInferencer(torch_path, device="cpu").predict(image)
    torch.testing.assert_close(inferred.pred_score.view(1), expected.pred_score.view(1))
    torch.testing.assert_close(
        inferred.anomaly_map.view(1, map_side, map_side), expected.anomaly_map.view(1, -1, map_side)
    )

    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "export")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": image.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
