# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Shapes and semantics of the MetaUAS building blocks."""

from __future__ import annotations

import pytest
import torch

from anomalib_uas.models.components.backbones import build_encoder, lukemelas_to_timm
from anomalib_uas.models.metauas.checkpoint import from_official, to_official
from anomalib_uas.models.metauas.torch_model import FeatureAlignment, MetaUASModel, UNetDecoder
from anomalib_uas.weights import efficientnet_lite_state_dict


@pytest.mark.parametrize(
    ("backbone", "channels"),
    [
        ("tf_efficientnet_b4", [48, 32, 56, 160, 448]),
        ("efficientnet_lite0", [32, 24, 40, 112, 320]),
        ("efficientnet_lite2", [32, 24, 48, 120, 352]),
        ("resnet18", [64, 64, 128, 256, 512]),
    ],
)
def test_encoder_levels(backbone: str, channels: list[int]) -> None:
    encoder = build_encoder(backbone, pretrained=False)
    levels = encoder(torch.zeros(1, 3, 64, 64))
    assert encoder.out_channels == channels
    assert [tuple(f.shape) for f in levels] == [
        (1, c, 64 // s, 64 // s) for c, s in zip(channels, (2, 4, 8, 16, 32), strict=True)
    ]


def test_encoder_without_stride_two_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="strides"):
        build_encoder("vit_tiny_patch16_224", pretrained=False)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_offline_lite_weights_load_strictly(variant: int) -> None:
    encoder = build_encoder(f"efficientnet_lite{variant}", pretrained=True)
    stem = efficientnet_lite_state_dict(variant)["_conv_stem.weight"]
    assert torch.equal(encoder.conv_stem.weight, stem)


def test_lukemelas_mapping_rejects_unknown_keys() -> None:
    blocks = build_encoder("efficientnet_lite0").blocks
    with pytest.raises(KeyError):
        lukemelas_to_timm({"_blocks.0._unknown.weight": torch.zeros(1)}, blocks)


@pytest.mark.parametrize(("fusion", "factor"), [("cat", 2), ("add", 1), ("absdiff", 1)])
@pytest.mark.parametrize("alignment", ["soft", "hard"])
def test_alignment_shapes(alignment: str, fusion: str, factor: int) -> None:
    layer = FeatureAlignment(8, alignment, fusion)
    out = layer(torch.randn(3, 8, 4, 4), torch.randn(2, 8, 4, 4), torch.tensor([[0, 1], [1, 0], [0, 0]]))
    assert out.shape == (3, 8 * factor, 4, 4)


def test_soft_alignment_is_unscaled_attention_over_prompt_positions() -> None:
    torch.manual_seed(0)
    layer = FeatureAlignment(6, "soft", "cat")
    query, prompt = torch.randn(1, 6, 3, 3), torch.randn(1, 6, 3, 3)
    q = layer.projection(query).flatten(2)[0]
    k = layer.projection(prompt).flatten(2)[0]
    weights = (q.T @ k).softmax(dim=1)
    expected = (prompt.flatten(2)[0] @ weights.T).view(1, 6, 3, 3)
    torch.testing.assert_close(layer.align(query, prompt, torch.tensor([[0]])), expected)


def test_hard_alignment_picks_the_best_prompt_position() -> None:
    layer = FeatureAlignment(4, "hard", "cat")
    with torch.no_grad():
        layer.projection.weight.copy_(torch.eye(2, 4).view(2, 4, 1, 1))
        layer.projection.bias.zero_()
    prompt = torch.arange(16, dtype=torch.float32).view(1, 4, 2, 2)
    aligned = layer.align(torch.ones(1, 4, 2, 2), prompt, torch.tensor([[0]]))
    assert torch.equal(aligned, prompt[:, :, 1:, 1:].expand(-1, -1, 2, 2))


def test_decoder_channel_rules_match_official_layout() -> None:
    decoder = UNetDecoder([48, 32, 56, 160, 448], [256, 128, 64, 64, 48], fusion_factor=2)
    widths = [block.conv1[0].in_channels for block in decoder.blocks]
    assert widths == [1216, 368, 160, 112, 64]
    assert isinstance(decoder.blocks[4].attention1, torch.nn.Identity)
    levels = [
        torch.zeros(1, c, 64 // s, 64 // s) for c, s in zip([48, 32, 112, 320, 896], (2, 4, 8, 16, 32), strict=True)
    ]
    assert decoder(levels).shape == (1, 48, 64, 64)


def test_trainable_parameter_count_matches_paper() -> None:
    model = MetaUASModel("tf_efficientnet_b4", pretrained_backbone=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4_581_689


@pytest.fixture
def lite_model() -> MetaUASModel:
    torch.manual_seed(0)
    return MetaUASModel("efficientnet_lite0", pretrained_backbone=False).eval()


def test_k_shot_of_identical_prompts_equals_one_shot(lite_model: MetaUASModel) -> None:
    query, prompt = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 64, 64)
    lite_model.k_shot = 1
    lite_model.set_prompts(prompt)
    one = lite_model(query)
    lite_model.k_shot = 3
    lite_model.set_prompts(prompt.expand(3, -1, -1, -1))
    three = lite_model(query)
    torch.testing.assert_close(three.anomaly_map, one.anomaly_map, atol=1e-5, rtol=1e-4)


def test_k_shot_averages_aligned_prompts(lite_model: MetaUASModel) -> None:
    query, prompts = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)
    query_levels = lite_model.encode_images(query)
    prompt_levels = lite_model.encode_images(prompts)
    bank = [prompt_levels[-1 - level] for level in range(3)]
    both = [
        align.align(query_levels[-1 - i], bank[i], torch.tensor([[0, 1]]))
        for i, align in enumerate(lite_model.alignment)
    ]
    for i, align in enumerate(lite_model.alignment):
        first = align.align(query_levels[-1 - i], bank[i], torch.tensor([[0]]))
        second = align.align(query_levels[-1 - i], bank[i], torch.tensor([[1]]))
        torch.testing.assert_close(both[i], (first + second) / 2)
    lite_model.k_shot = 2
    lite_model.set_prompts(prompts)
    torch.testing.assert_close(lite_model(query).anomaly_map, lite_model(query, prompts.unsqueeze(0)).anomaly_map)


def test_batch_equals_single_runs(lite_model: MetaUASModel) -> None:
    queries = torch.randn(3, 3, 64, 64)
    lite_model.set_prompts(torch.randn(1, 3, 64, 64))
    batched = lite_model(queries).anomaly_map
    single = torch.cat([lite_model(q[None]).anomaly_map for q in queries])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_retrieval_picks_the_most_similar_bank_entries(lite_model: MetaUASModel) -> None:
    lite_model.retrieval, lite_model.k_shot = True, 1
    bank = torch.randn(4, 3, 64, 64)
    lite_model.set_prompts(bank)
    index = lite_model.select_prompts(lite_model.encode_images(bank[[2, 0]])[-1], lite_model.prompt_bank[0])
    assert index.tolist() == [[2], [0]]
    torch.testing.assert_close(lite_model(bank[[2]]).anomaly_map, lite_model(bank[[2]], bank[[2]]).anomaly_map)


def test_missing_prompts_give_a_clear_error(lite_model: MetaUASModel) -> None:
    with pytest.raises(RuntimeError, match="no prompt images"):
        lite_model(torch.zeros(1, 3, 64, 64))


def test_wrong_number_of_prompts_is_rejected(lite_model: MetaUASModel) -> None:
    with pytest.raises(ValueError, match="k_shot=1"):
        lite_model.set_prompts(torch.zeros(2, 3, 64, 64))


def test_training_mode_returns_logits_with_gradients_and_frozen_encoder(lite_model: MetaUASModel) -> None:
    lite_model.train()
    assert not lite_model.encoder.training
    logits = lite_model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 64, 64)
    logits.mean().backward()
    assert lite_model.mask_head.weight.grad is not None
    assert all(p.grad is None for p in lite_model.encoder.parameters())


def test_official_format_round_trip() -> None:
    torch.manual_seed(0)
    model = MetaUASModel("tf_efficientnet_b4", pretrained_backbone=False)
    official = to_official(model)
    assert "encoder._blocks.31._project_conv.weight" in official
    assert "alignment.2.alignment_layer.dimensionality_reduction.weight" in official
    assert "decoder.blocks.0.attention1.attention.cSE.1.weight" in official
    other = MetaUASModel("tf_efficientnet_b4", pretrained_backbone=False)
    other.load_state_dict(from_official(official, other), strict=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)
