# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""InCTRL torch model on a tiny random open_clip: features, batching, caches, losses and input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch

from anomalib_uas.data.sampling import BalancedBatchSampler
from anomalib_uas.models.inctrl import InCTRL, InCTRLModel
from anomalib_uas.models.inctrl.checkpoint import split_official, to_official
from anomalib_uas.models.inctrl.lightning_model import binary_focal_loss
from anomalib_uas.models.inctrl.prompts import prompt_texts
from anomalib_uas.weights import WeightsError

TINY = "uas-tiny-ViT-B-16-plus-240"


@pytest.fixture(scope="module")
def model() -> InCTRLModel:
    torch.manual_seed(0)
    model = InCTRLModel(TINY).eval()
    # random heads with non-trivial batch-norm statistics, so that batch effects would show
    for head in (model.diff_head, model.diff_head_ref):
        for bn in (head.bn2, head.bn3):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 3, 240, 240, generator=torch.Generator().manual_seed(1))


def _naive_patch_residual(query: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Per layer and per query patch, the minimum cosine distance to every prompt patch, as in the paper."""
    batch, layers, patches, _ = query.shape
    out = torch.zeros(batch, patches)
    for b in range(batch):
        for layer in range(layers):
            for i in range(patches):
                distances = 0.5 * (1 - F.cosine_similarity(query[b, layer, i][None], prompts[b, layer], dim=-1))
                out[b, i] += distances.min() / layers
    return out


def test_prompt_lists_are_the_official_ones() -> None:
    normal, anomaly = prompt_texts("metal_nut")
    assert (len(normal), len(anomaly)) == (154, 88)
    assert normal[0] == "a cropped photo of the metal nut."
    assert normal[22] == "a cropped photo of the flawless metal nut."
    assert anomaly[-1] == "a photo of the metal nut with damage for anomaly detection."
    assert prompt_texts("cat") == (
        ["a photo of cat for anomaly detection."],
        ["a photo without cat for anomaly detection."],
    )


def test_features_are_raw_residual_stream_after_blocks_7_9_11(model: InCTRLModel, images: torch.Tensor) -> None:
    taps = {}
    blocks = model.clip.visual.transformer.resblocks
    hooks = [
        blocks[i].register_forward_hook(lambda _m, _i, out, i=i: taps.__setitem__(i, out)) for i in range(len(blocks))
    ]
    try:
        with torch.no_grad():
            pooled = model.clip.visual(images[:2])
    finally:
        for hook in hooks:
            hook.remove()
    tokens, patches = model.encode_images(images[:2])
    torch.testing.assert_close(tokens, pooled, atol=1e-5, rtol=1e-5)
    assert patches.shape == (2, 3, 225, 64)
    for position, index in enumerate((6, 8, 10)):
        torch.testing.assert_close(patches[:, position], taps[index][:, 1:], atol=1e-6, rtol=1e-6)


def test_batch_of_n_equals_n_runs_of_one(model: InCTRLModel, images: torch.Tensor) -> None:
    model.set_prompts(images[3:5])
    model.set_category("bottle")
    batched = model(images[:3])
    singles = [model(images[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.pred_score, torch.cat([s.pred_score for s in singles]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in singles]), atol=1e-6, rtol=1e-5)
    # per-query prompts and categories give the same as shared ones
    per_query = model.score(images[:3], images[3:5].expand(3, -1, -1, -1, -1), ["bottle"] * 3)
    shared = model.score(images[:3])
    for name in ("final_score", "img_ref_score", "text_score", "patch_ref_map"):
        torch.testing.assert_close(getattr(per_query, name), getattr(shared, name), atol=1e-6, rtol=1e-5)


def test_caches_change_nothing(model: InCTRLModel, images: torch.Tensor) -> None:
    model.set_prompts(images[3:5])
    model.set_category("bottle")
    cached = model.score(images[:2])
    uncached = model.score(images[:2], prompt_images=images[3:5], categories="bottle")
    for name, value in cached._asdict().items():
        torch.testing.assert_close(value, getattr(uncached, name), atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(model.text_features, model.compute_text_features("bottle"), atol=0, rtol=0)
    assert model.text_features_for("bottle") is model.text_features_for("bottle")


@pytest.mark.parametrize("k_shot", [1, 8])
def test_any_number_of_prompts_from_1_to_8(model: InCTRLModel, k_shot: int) -> None:
    prompts = torch.randn(k_shot, 3, 240, 240, generator=torch.Generator().manual_seed(k_shot))
    model.set_prompts(prompts)
    model.set_category("bottle")
    assert model.k_shot == k_shot
    assert model.prompt_patches.shape == (3, k_shot * 225, 64)
    query = prompts[:1] + 0.1
    cached = model.score(query)
    uncached = model.score(query, prompt_images=prompts[None], categories=["bottle"])
    torch.testing.assert_close(cached.final_score, uncached.final_score, atol=1e-6, rtol=1e-5)


def test_vectorised_patch_residual_equals_the_loop(model: InCTRLModel, images: torch.Tensor) -> None:
    _, query = model.encode_images(images[:2])
    _, prompts = model.encode_images(images[2:5])
    prompts = prompts.transpose(0, 1).reshape(3, -1, prompts.shape[-1])  # [L, k*P, W]
    fast = model.patch_residual(query, F.normalize(prompts, dim=-1))
    slow = _naive_patch_residual(query, prompts[None].expand(2, -1, -1, -1))
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_scores_follow_the_official_formula(model: InCTRLModel, images: torch.Tensor) -> None:
    model.set_prompts(images[3:5])
    model.set_category("bottle")
    out = model.score(images[:2])
    torch.testing.assert_close(out.fg_score, out.patch_ref_map.amax(dim=1))
    torch.testing.assert_close(out.final_score, (out.hl_score + out.fg_score) / 2)
    holistic = out.text_score[:, None] + out.img_ref_score[:, None] + out.patch_ref_map
    torch.testing.assert_close(out.holistic_map, holistic)
    eval_out = model(images[:2])
    assert isinstance(eval_out, InferenceBatch)
    assert eval_out.anomaly_map.shape == (2, 240, 240)
    assert float(eval_out.anomaly_map.min()) >= 0
    assert float(eval_out.anomaly_map.max()) <= 1


def test_only_adapter_and_heads_are_trainable(model: InCTRLModel) -> None:
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter", "diff_head", "diff_head_ref"}
    model.train()
    assert not model.clip.training
    model.eval()


def test_focal_loss_quirk_and_plain_variant() -> None:
    scores = torch.tensor([0.2, 0.9, 0.6])
    labels = torch.tensor([0, 1, 1])
    bce = F.binary_cross_entropy_with_logits(scores, labels.float(), reduction="none")
    expected = ((1 - torch.exp(-bce)) ** 2 * bce).mean()
    torch.testing.assert_close(binary_focal_loss(scores, labels), expected)
    plain = F.binary_cross_entropy(scores, labels.float(), reduction="none")
    expected_plain = ((1 - torch.exp(-plain)) ** 2 * plain).mean()
    torch.testing.assert_close(binary_focal_loss(scores, labels, probabilities_as_logits=False), expected_plain)


def test_official_format_round_trip(model: InCTRLModel, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pyth"
    torch.save(to_official(model), path)
    parts = split_official(torch.load(path, weights_only=True))
    assert parts.clip is not None
    assert "logit_scale" not in parts.clip
    trained_only = tmp_path / "trained.pyth"
    torch.save(to_official(model, include_clip=False), trained_only)
    assert trained_only.stat().st_size < path.stat().st_size / 4
    loaded = InCTRL.from_official_checkpoint(
        trained_only, clip_weights=path, clip_model=TINY, clip_pretrained=None, visualizer=False
    )
    for key, value in model.state_dict().items():
        if not key.startswith(("prompt_", "text_")):
            torch.testing.assert_close(loaded.model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    wrapped = tmp_path / "wrapped.pyth"  # the official loader also accepts {"model_state": state_dict}
    torch.save({"model_state": to_official(model, include_clip=False)}, wrapped)
    loaded = InCTRL(clip_model=TINY, clip_pretrained=None, weights=str(wrapped), visualizer=False)
    torch.testing.assert_close(loaded.model.adapter.fc[0].weight, model.adapter.fc[0].weight, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (2, 1, 240, 240), (3, 240, 240)])
def test_wrong_image_shapes_are_rejected(model: InCTRLModel, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, 240, 240\]"):
        model.encode_images(torch.zeros(shape))


def test_bad_prompt_and_category_arguments(images: torch.Tensor) -> None:
    fresh = InCTRLModel(TINY).eval()
    with pytest.raises(RuntimeError, match="no prompt features"):
        fresh(images[:1])
    fresh.set_prompts(images[3:5])
    with pytest.raises(RuntimeError, match="no text features"):
        fresh(images[:1])
    with pytest.raises(ValueError, match="prompt_images must be"):
        fresh.score(images[:2], prompt_images=images[None, :3].expand(3, -1, -1, -1, -1), categories="a")
    with pytest.raises(ValueError, match="categories for 2 images"):
        fresh.score(images[:2], categories=["a", "b", "c"])
    with pytest.raises(ValueError, match="empty"):
        fresh.set_category("_")
    with pytest.raises(ValueError, match="feature_layers"):
        InCTRLModel(TINY, feature_layers=(7, 9, 12))


@pytest.mark.parametrize("k_shot", [0, 9])
def test_k_shot_out_of_range(k_shot: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 8"):
        InCTRL(clip_model=TINY, clip_pretrained=None, k_shot=k_shot)


def test_foreign_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metauas.ckpt"
    torch.save({"encoder._conv_stem.weight": torch.zeros(1), "mask_head.0.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="MetaUAS checkpoint"):
        InCTRL.from_official_checkpoint(path, clip_model=TINY, clip_pretrained=None)
    clip_only = tmp_path / "clip.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, clip_only)
    with pytest.raises(WeightsError, match="clip_weights"):
        InCTRL.from_official_checkpoint(clip_only, clip_model=TINY, clip_pretrained=None)


def test_checkpoint_of_another_clip_size_is_rejected(tmp_path: Path) -> None:
    other = InCTRLModel(TINY)
    state = to_official(other)
    state["adapter.fc.0.weight"] = torch.zeros(160, 640)
    path = tmp_path / "bad.pyth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="do not fit"):
        InCTRL.from_official_checkpoint(path, clip_model=TINY, clip_pretrained=None)


def test_balanced_batch_sampler_is_exact_and_seeded() -> None:
    labels = [0] * 7 + [1] * 3
    sampler = BalancedBatchSampler(labels, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    assert all(sorted(labels[i] for i in batch) == [0, 0, 1, 1] for batch in batches)
    assert all(len(set(batch)) == 4 for batch in batches)
    first_pass = [i for batch in batches for i in batch[2:]][:3]
    assert sorted(first_pass) == [7, 8, 9]  # every anomalous image before any repeats
    assert batches == list(BalancedBatchSampler(labels, batch_size=4, seed=0))
    assert list(sampler) != batches  # the next epoch continues the stream
    with pytest.raises(ValueError, match="normal and anomalous"):
        BalancedBatchSampler([0, 0], batch_size=2)
    with pytest.raises(ValueError, match="at least 2"):
        BalancedBatchSampler(labels, batch_size=1)
