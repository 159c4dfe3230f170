# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Self-describing MetaUAS checkpoints, the one-call loader and the public prompt API of the Lightning module."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_uas.models import MetaUAS
from anomalib_uas.models.metauas.checkpoint import read_architecture, save_checkpoint, to_official
from anomalib_uas.weights import WeightsError, WeightsNotFoundError

ARCHITECTURE = {"fusion": "absdiff", "decoder_channels": [32, 16, 16, 16, 8]}


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MetaUAS]:
    torch.manual_seed(0)
    model = MetaUAS(image_size=64, pretrained_backbone=False, seed=5, **ARCHITECTURE)
    path = save_checkpoint(model.model, tmp_path_factory.mktemp("ckpt") / "metauas.pth", image_size=64)
    return path, model


def test_trained_checkpoint_records_its_architecture(trained_file: tuple[Path, MetaUAS]) -> None:
    path, _ = trained_file
    expected = {"backbone": "efficientnet_lite0", **ARCHITECTURE, "image_size": 64}
    assert read_architecture(path) == expected
    assert read_architecture("metauas-512")["backbone"] == "tf_efficientnet_b4"
    assert read_architecture("metauas-512")["image_size"] == 512


def test_from_checkpoint_needs_no_architecture_arguments(trained_file: tuple[Path, MetaUAS]) -> None:
    path, original = trained_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = MetaUAS.from_checkpoint(path, k_shot=1)
    assert not loaded.training
    assert not loaded.model.training
    assert (loaded.hparams.image_size, loaded.hparams.fusion) == (64, "absdiff")
    for key, value in original.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)


def test_other_image_size_warns_and_other_architecture_is_refused(trained_file: tuple[Path, MetaUAS]) -> None:
    path, _ = trained_file
    with pytest.warns(UserWarning, match="trained at 64 px and runs at 128 px"):
        MetaUAS.from_checkpoint(path, image_size=128)
    with pytest.raises(WeightsError, match="fusion"):
        MetaUAS.from_checkpoint(path, fusion="cat")


def test_old_checkpoint_without_record_loads_with_explicit_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MetaUAS(image_size=64, pretrained_backbone=False, **ARCHITECTURE)
    path = tmp_path / "old.pth"
    torch.save(to_official(model.model), path)
    with pytest.raises(WeightsError, match="architecture record"):
        read_architecture(path)
    loaded = MetaUAS.from_official_checkpoint(path, image_size=64, backbone="efficientnet_lite0", **ARCHITECTURE)
    torch.testing.assert_close(loaded.model.mask_head.weight, model.model.mask_head.weight)


@pytest.mark.parametrize("content", ["text", "inctrl", "random"])
def test_files_that_are_not_metauas_checkpoints_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "file.pth"
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "inctrl":
        torch.save({"adapter.fc.weight": torch.zeros(2, 2), "diff_head.fc.weight": torch.zeros(2, 2)}, path)
    else:
        torch.save({"weights": torch.zeros(3), "bias": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"file\.pth is not a MetaUAS checkpoint") as error:
        read_architecture(path)
    assert "\n" not in str(error.value)


def test_missing_checkpoint_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="uas weights metauas"):
        MetaUAS(weights=str(tmp_path / "metauas.pth"))


def test_set_prompts_from_tensors_and_paths_outside_engine(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MetaUAS(image_size=64, pretrained_backbone=False, k_shot=2, prompt_strategy="retrieval")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (80, 72, 3), dtype=np.uint8) for _ in range(3)]
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"good{index}.png")
    model.set_prompts(tmp_path)
    assert model.model.prompt_bank[0].shape[0] == 3
    assert model.prompt_paths == [str(tmp_path / f"good{index}.png") for index in range(3)]
    from_paths = model.model.prompt_bank[0].clone()
    model.set_prompts(torch.stack([torch.from_numpy(image).permute(2, 0, 1) / 255.0 for image in images]))
    torch.testing.assert_close(model.model.prompt_bank[0], from_paths, atol=1e-5, rtol=1e-4)
    assert model.prompt_paths == []
    output = model.model(model.pre_processor.transform(torch.rand(2, 3, 64, 64)))
    assert output.anomaly_map.shape == (2, 64, 64)
    assert model.model.last_prompt_index.shape == (2, 2)


def test_embed_is_the_mean_of_the_deepest_level() -> None:
    model = MetaUAS(image_size=64, pretrained_backbone=False).model
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.embed(images), model.encode_images(images)[-1].mean(dim=(2, 3)))
