# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Weights resolution, verification and safe loading, and the errors a user meets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from anomalib_uas import weights
from anomalib_uas.models import MetaUAS
from anomalib_uas.models.metauas.checkpoint import to_official
from anomalib_uas.weights import WeightsError, WeightsNotFoundError, load_state_dict, resolve_weights, sha256sum


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UAS_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("UAS_OFFLINE", "1")
    return tmp_path / "cache"


def test_known_name_offline_names_the_file_and_the_fix(offline_cache: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("metauas-256")
    message = str(info.value)
    assert "metauas-256.ckpt" in message
    assert str(offline_cache) in message
    assert "UAS_WEIGHTS_DIR" in message


def test_url_offline_names_the_file(offline_cache: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"model\.pth"):
        resolve_weights("https://example.org/files/model.pth")


def test_cached_known_file_is_verified(offline_cache: Path) -> None:
    offline_cache.mkdir(parents=True)
    (offline_cache / "metauas-256.ckpt").write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights("metauas-256")


def test_local_path_with_sha256(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, path)
    assert resolve_weights(path, sha256=sha256sum(path)) == path
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(path, sha256="0" * 64)


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(tmp_path / "nope.ckpt")


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"a": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(WeightsError, match=r"cut\.ckpt"):
        load_state_dict(path)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(WeightsError, match=r"evil\.ckpt"):
        load_state_dict(path)


def test_checkpoint_of_another_model_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "inctrl.ckpt"
    torch.save({"adapter.fc.weight": torch.zeros(2, 2), "diff_head.fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="InCTRL"):
        MetaUAS.from_official_checkpoint(path)


def test_checkpoint_of_another_resolution_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MetaUAS(backbone="tf_efficientnet_b4", pretrained_backbone=False, image_size=512)
    path = tmp_path / "metauas-512.ckpt"
    torch.save(to_official(model.model), path)
    published = dataclasses.replace(
        weights.OFFICIAL_WEIGHTS["metauas-512"], size=path.stat().st_size, sha256=sha256sum(path)
    )
    monkeypatch.setitem(weights.OFFICIAL_WEIGHTS, "metauas-512", published)
    with pytest.raises(WeightsError, match="image_size=512"):
        MetaUAS.from_official_checkpoint(path, image_size=256)
    loaded = MetaUAS.from_official_checkpoint(path, image_size=512)
    torch.testing.assert_close(loaded.model.mask_head.weight, model.model.mask_head.weight)


def test_checkpoint_of_another_backbone_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "lite.ckpt"
    torch.save(to_official(MetaUAS(pretrained_backbone=False).model), path)
    with pytest.raises(WeightsError, match="tf_efficientnet_b4"):
        MetaUAS.from_official_checkpoint(path)
