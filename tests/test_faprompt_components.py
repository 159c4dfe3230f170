# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt torch model on a tiny random CLIP: batching, DAP modes, the text cache, losses, checkpoints, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomalib_uas.models.faprompt import FAPrompt, checkpoint, torch_model
from anomalib_uas.models.faprompt.checkpoint import from_official, read_official, to_official
from anomalib_uas.models.faprompt.torch_model import FAPromptLoss, FAPromptModel, gaussian_blur
from anomalib_uas.weights import WeightsError, WeightsNotFoundError

TINY = "uas-tiny-ViT-L-14-336"
SIZE = 56  # 4 x 4 patches of 14 px


def _model(selection: str = "topk", seed: int = 0) -> FAPromptModel:
    torch.manual_seed(seed)
    return FAPromptModel(TINY, image_size=SIZE, dap_patch_selection=selection).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, SIZE, SIZE, generator=generator)


@pytest.mark.parametrize("selection", ["topk", "first"])
def test_batch_of_n_equals_n_runs_of_one(selection: str, images: torch.Tensor) -> None:
    model = _model(selection)
    batch = model(images)
    single = [model(images[i : i + 1]) for i in range(len(images))]
    assert batch.anomaly_map.shape == (3, SIZE, SIZE)
    assert batch.pred_score.shape == (3,)
    torch.testing.assert_close(batch.anomaly_map, torch.cat([s.anomaly_map for s in single]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batch.pred_score, torch.cat([s.pred_score for s in single]), atol=1e-6, rtol=1e-5)
    assert float(batch.anomaly_map.min()) >= 0.0
    assert float(batch.anomaly_map.max()) <= 1.0


def test_dap_patch_selection_modes(images: torch.Tensor) -> None:
    first, topk = _model("first"), _model("topk")
    topk.load_state_dict(first.state_dict())
    with torch.no_grad():
        out_first, out_topk = first.compute(images), topk.compute(images)
    torch.testing.assert_close(out_first.static_probs, out_topk.static_probs)
    assert out_first.prior_indices.tolist() == [list(range(10))] * 3
    expected = out_topk.static_probs[..., 1].topk(10, dim=1).indices
    assert torch.equal(out_topk.prior_indices, expected)
    assert not torch.allclose(out_first.prior, out_topk.prior)
    assert not torch.allclose(out_first.prior_probs, out_topk.prior_probs)


def test_static_text_is_cached_and_only_abnormal_prompts_are_reencoded(
    images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    model(images[:1])
    cached = model.static_text_features.clone()
    with torch.no_grad():
        expected, _ = model.encode_static_text()
    torch.testing.assert_close(cached, expected)

    encoded: list[int] = []
    original = torch_model.encode_prompts

    def record(clip: torch.nn.Module, prompts: torch.Tensor, *args: object) -> torch.Tensor:
        encoded.append(prompts.shape[0])
        return original(clip, prompts, *args)

    monkeypatch.setattr(torch_model, "encode_prompts", record)
    model(images)
    assert encoded == [3 * 10]  # the ten abnormal prompts with each image's prior, nothing else

    model.prompt_learner.load_state_dict(model.prompt_learner.state_dict())
    assert model.static_text_features.numel() == 0  # loading weights clears the cache
    model.train()
    assert model.static_text_features.numel() == 0


def test_loading_clip_weights_refreshes_the_interpolated_positional_embedding() -> None:
    model, other = _model(seed=0), _model(seed=5)
    assert not torch.equal(model.vision_positional_embedding, other.vision_positional_embedding)
    model.clip.load_state_dict(other.clip.state_dict())
    torch.testing.assert_close(model.vision_positional_embedding, other.vision_positional_embedding)
    assert model.vision_positional_embedding.shape == (1 + 16, 64)


def test_normal_prompt_ignores_the_prior() -> None:
    learner = _model().prompt_learner
    bias = torch.randn(2, learner.ctx_pos.shape[-1])
    shifted = learner.abnormal_prompt_embeddings(bias).view(2, 10, -1, bias.shape[-1])
    static = learner.abnormal_prompt_embeddings()
    own = slice(1 + learner.normal_tokens, 1 + learner.normal_tokens + learner.abnormal_tokens)
    torch.testing.assert_close(
        shifted[:, :, own] - static[None, :, own], bias[:, None, None].expand_as(shifted[:, :, own])
    )
    torch.testing.assert_close(shifted[:, :, : own.start], static[None, :, : own.start].expand(2, -1, -1, -1))


def test_training_output_losses_and_gradients(images: torch.Tensor) -> None:
    model = _model().train()
    output = model(images)
    masks = torch.zeros(3, SIZE, SIZE)
    masks[1, 10:30, 20:40] = 1.0
    terms = FAPromptLoss(model.grid)(output, torch.tensor([0, 1, 0]), masks)
    assert set(terms) == {"loss", "local_static", "local_prior", "global_ce", "global_focal", "orthogonality", "prior"}
    assert all(torch.isfinite(v) for v in terms.values())
    expected = (
        (terms["local_static"] + 0.5 * terms["local_prior"] + terms["global_ce"] + terms["global_focal"])
        + 0.1 * terms["orthogonality"]
        + terms["prior"]
    )
    torch.testing.assert_close(terms["loss"], expected)
    # the prior term is a sum over the normal images of the per-image mean square
    torch.testing.assert_close(terms["prior"], (output.prior[[0, 2]] ** 2).mean(dim=1).sum())
    terms["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.prompt_learner.parameters())
    assert all(p.grad is None for p in model.clip.parameters())


def test_a_few_optimiser_steps_lower_the_loss(images: torch.Tensor) -> None:
    model = _model().train()
    loss_fn = FAPromptLoss(model.grid)
    optimiser = torch.optim.Adam(model.prompt_learner.parameters(), lr=1e-3, betas=(0.5, 0.999))
    labels, masks = torch.tensor([1, 0, 1]), torch.zeros(3, SIZE, SIZE)
    masks[[0, 2], :20, :20] = 1.0
    losses = []
    for _ in range(4):
        optimiser.zero_grad()
        loss = loss_fn(model(images), labels, masks)["loss"]
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("size", "sigma"), [((37, 37), 3.0), ((20, 31), 1.5)])
def test_gaussian_blur_matches_scipy(size: tuple[int, int], sigma: float) -> None:
    maps = torch.rand(2, *size, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(maps, (sigma, sigma)).numpy()
    reference = np.stack([gaussian_filter(m.numpy().astype(np.float64), sigma=sigma) for m in maps])
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_official_checkpoint_round_trip(tmp_path: Path) -> None:
    source, target = _model(seed=1), _model(seed=2)
    official = to_official(source.prompt_learner)
    assert official["ctx_pos"].shape == (1, 1, 5, 32)
    assert official["ctx_neg"].shape == (1, 10, 2, 32)
    assert official["token_suffix_neg"].shape == (1, 10, 69, 32)
    assert official["tokenized_prompts_neg"].dtype == torch.int32
    assert official["tokenized_prompts_neg"][0, 0, :10].tolist() == [49406, *[333] * 5, 320, 320, 13568, 14115]
    path = tmp_path / "epoch_1.pth"
    torch.save({"prompt_learner": official}, path)
    target.prompt_learner.load_state_dict(from_official(read_official(path), target.prompt_learner))
    for key, value in source.prompt_learner.state_dict().items():
        assert torch.equal(value, target.prompt_learner.state_dict()[key]), key


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        read_official(tmp_path / "missing.pth")
    torch.save({"encoder.conv.weight": torch.zeros(1), "decoder.x": torch.zeros(1)}, tmp_path / "metauas.pth")
    with pytest.raises(WeightsError, match="MetaUAS"):
        read_official(tmp_path / "metauas.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="Cannot read"):
        read_official(tmp_path / "garbage.pth")
    learner = _model().prompt_learner
    official = to_official(learner)
    wrong_tokens = dict(official, tokenized_prompts_pos=torch.zeros_like(official["tokenized_prompts_pos"]))
    with pytest.raises(WeightsError, match="other prompt words"):
        from_official(wrong_tokens, learner)
    wider = dict(official, ctx_pos=torch.zeros(1, 1, 5, 768))
    with pytest.raises(WeightsError, match="ctx_pos"):
        from_official(wider, learner)
    partial = {k: v for k, v in official.items() if not k.startswith("patch_meta_net")}
    with pytest.raises(WeightsError, match="lacks"):
        from_official(partial, learner)
    assert checkpoint.__all__


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dap_patch_selection": "top10"}, "dap_patch_selection"),
        ({"sigma": -1.0}, "sigma"),
        ({"image_size": 60}, "multiple of the CLIP patch size"),
        ({"image_size": 28}, "fewer than the 10"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FAPromptModel(TINY, **{"image_size": SIZE, **kwargs})


def test_bad_inputs_are_rejected(images: torch.Tensor) -> None:
    model = _model()
    with pytest.raises(ValueError, match="56x56 inputs"):
        model(torch.zeros(1, 3, 70, 70))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(images[0])
    with pytest.raises(ValueError, match="dap_patch_selection"):
        FAPrompt(clip_model=TINY, clip_pretrained=None, image_size=SIZE, dap_patch_selection="best")
