# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The eval-mode inference copies of MetaUAS: same outputs as the plain modules, state_dict untouched."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from anomalib_uas.models.metauas.checkpoint import to_official
from anomalib_uas.models.metauas.inference import (
    ConvActivation,
    FullResolutionTail,
    PointwiseConv,
    UpsampledConvActivation,
    fold_batch_norm,
    inference_copy,
)
from anomalib_uas.models.metauas.torch_model import MetaUASModel

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding, which grows with depth in untrained networks: relative to the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def _randomise_batch_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so that folding them changes the weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) * 0.2 - 0.1)


@pytest.fixture
def model() -> MetaUASModel:
    torch.manual_seed(0)
    model = MetaUASModel(backbone="efficientnet_lite0", pretrained_backbone=False)
    _randomise_batch_norms(model, seed=1)
    return model.eval()


def _images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_folded_convolution_equals_convolution_then_batch_norm() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU())
    _randomise_batch_norms(layer, seed=2)
    layer.eval()
    fused = inference_copy(layer)
    images = _images(3)
    assert isinstance(fused[1], nn.Identity)
    assert isinstance(layer[1], nn.BatchNorm2d)  # the original is untouched
    torch.testing.assert_close(fused(images), layer(images), **TOLERANCE)


def test_fold_keeps_the_activation_of_timm_batch_norm_act(model: MetaUASModel) -> None:
    stem_norm = model.encoder.bn1  # timm BatchNormAct2d with SiLU (ReLU6 for lite)
    replacement = fold_batch_norm(inference_copy(model.encoder.conv_stem, fold=False), stem_norm)
    assert replacement is stem_norm.act


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_inference_copies_give_the_plain_modules_outputs(backbone: str) -> None:
    torch.manual_seed(0)
    model = MetaUASModel(backbone=backbone, pretrained_backbone=False)
    _randomise_batch_norms(model, seed=1)
    model.eval()
    encoder, decoder, mask_head = model.network()
    assert encoder is not model.encoder
    assert decoder is not model.decoder
    images = _images(4)
    with torch.no_grad():
        plain_levels = model.encoder(images)
        fused_levels = encoder(images.contiguous(memory_format=torch.channels_last))
        for plain, fused in zip(plain_levels, fused_levels, strict=True):
            _assert_close_to_scale(fused, plain)
        decoder_input = [torch.cat([level, level], dim=1) if i >= 2 else level for i, level in enumerate(plain_levels)]
        _assert_close_to_scale(mask_head(decoder(decoder_input)), model.mask_head(model.decoder(decoder_input)))


def test_training_runs_the_frozen_encoder_as_its_copy_and_the_trained_parts_themselves() -> None:
    """Meta-training with a frozen encoder: its folded copy gives the features, gradients reach the decoder only."""
    torch.manual_seed(0)
    model = MetaUASModel(backbone="efficientnet_lite0", pretrained_backbone=False, fusion="absdiff")
    _randomise_batch_norms(model, seed=1)
    model.train()
    encoder, decoder, mask_head = model.network()
    assert encoder is not model.encoder
    assert not encoder.training
    assert decoder is model.decoder
    assert mask_head is model.mask_head
    images, prompts = _images(12), _images(13)
    with torch.no_grad():
        for plain, fused in zip(model.encoder(images), model.encode_images(images), strict=True):
            _assert_close_to_scale(fused, plain)
    model(images, prompts).mean().backward()
    assert all(parameter.grad is None for parameter in model.encoder.parameters())
    assert all(parameter.grad is None for parameter in encoder.parameters())
    assert all(parameter.grad is not None for parameter in model.decoder.parameters())
    model.eval()
    assert model.network()[1] is not model.decoder  # eval mode: copies of all three


def test_a_trained_encoder_runs_as_itself_in_training() -> None:
    model = MetaUASModel(backbone="efficientnet_lite0", pretrained_backbone=False, train_encoder=True).train()
    assert model.network()[0] is model.encoder
    model(_images(14), _images(15)).mean().backward()
    assert model.encoder.conv_stem.weight.grad is not None


def test_eval_forward_leaves_state_dict_and_official_export_unchanged(model: MetaUASModel) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    official_before = set(to_official(model))
    model.set_prompts(_images(5, batch=1))
    model(_images(6))
    model(_images(6), _images(7))
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        if not key.startswith("prompt_bank_"):
            assert torch.equal(after[key], value), key
    assert set(to_official(model)) == official_before


def test_inference_copy_follows_new_weights_and_dtype(model: MetaUASModel) -> None:
    images, prompts = _images(8), _images(9)
    model(images, prompts)  # builds the copies
    torch.manual_seed(5)
    other = MetaUASModel(backbone="efficientnet_lite0", pretrained_backbone=False)
    _randomise_batch_norms(other, seed=6)
    other.eval()
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model(images, prompts).anomaly_map, other(images, prompts).anomaly_map)
    model.double()
    assert model(images.double(), prompts.double()).anomaly_map.dtype == torch.float64


def test_a_model_that_ran_copies_and_pickles_without_its_packed_weights(model: MetaUASModel) -> None:
    """The inference copies keep oneDNN-packed weights, which cannot be copied: copies rebuild them, same output."""
    images, prompts = _images(10, batch=1), _images(11, batch=1)
    expected = model(images, prompts).anomaly_map
    modules = [module for part in model.network() for module in part.modules()]
    packed = [module for module in modules if getattr(module, "_packed", None) is not None]
    assert {type(module) for module in packed} == {ConvActivation}
    assert all(module._packed[1].is_mkldnn for module in packed)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other._inference is None
        torch.testing.assert_close(other(images, prompts).anomaly_map, expected, rtol=0, atol=0)


def test_packed_kernel_follows_a_dtype_round_trip() -> None:
    """Moving the weights (here float32 -> float16 -> float32, which rounds them) drops the kernel packed before."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1).eval()
    fused = ConvActivation(conv, nn.ReLU())
    features = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = fused(features)
        fused.half().float()
        expected = nn.functional.relu(conv(features))  # with the rounded weights
        assert not torch.allclose(before, expected, rtol=1e-5, atol=1e-5)  # the rounding shows in the output
        torch.testing.assert_close(fused(features), expected, rtol=1e-5, atol=1e-5)


def test_export_traces_the_plain_convolution_and_activation() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU())
    _randomise_batch_norms(layer, seed=3)
    fused = inference_copy(layer.eval())
    images = _images(10)
    program = torch.export.export(fused, (images,))
    targets = [str(node.target) for node in program.graph.nodes]
    assert not any("mkldnn" in target for target in targets)
    assert any("conv2d" in target for target in targets)
    torch.testing.assert_close(program.module()(images), fused(images), **TOLERANCE)


class _Maps(nn.Module):
    def __init__(self, model: MetaUASModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).anomaly_map


def test_export_traces_the_model_itself(model: MetaUASModel) -> None:
    model.set_prompts(_images(11, batch=1))
    images = _images(12)
    program = torch.export.export(_Maps(model).eval(), (images,))  # eval() drops the copies: none in the trace
    assert not any("mkldnn" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(images), model(images).anomaly_map, **TOLERANCE)


@pytest.mark.parametrize(("kernel", "groups"), [(3, 1), (3, 8), (5, 8)])
@pytest.mark.parametrize("size", [(32, 32), (33, 20), (15, 16)])
def test_same_padded_stride_two_convolution_runs_without_a_padded_copy(
    kernel: int, groups: int, size: tuple[int, int]
) -> None:
    """timm's TF-"SAME" convolution fused with its activation gives timm's output at even and odd sizes."""
    torch.manual_seed(0)
    conv = Conv2dSame(8, 16, kernel, stride=2, groups=groups, bias=True).eval()
    fused = ConvActivation(copy.deepcopy(conv), nn.SiLU())
    assert fused.same
    images = torch.randn(2, 8, *size).contiguous(memory_format=torch.channels_last)
    expected = nn.functional.silu(conv(images))
    with torch.no_grad():
        actual = fused(images)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU6(), nn.Identity()])
def test_upsampled_convolution_equals_upsampling_then_convolution(activation: nn.Module) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1).eval()
    fused = ConvActivation(conv, activation)
    upsampled = UpsampledConvActivation(fused)
    features = (torch.randn(2, 6, 7, 10) * 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = activation(conv(nn.functional.interpolate(features, scale_factor=2.0, mode="nearest")))
        actual = upsampled(features)
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        assert actual.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(upsampled(features.contiguous()), expected, **TOLERANCE)  # either memory layout
        doubled = copy.deepcopy(upsampled).double()  # off the oneDNN path: upsample and convolve
        assert doubled(features.double()).dtype == torch.float64


def test_decoder_copy_runs_the_last_block_with_the_head_and_upsamples_only_where_nothing_gates(
    model: MetaUASModel,
) -> None:
    _, decoder, head = model.network()
    tail = decoder.blocks[-1]  # the last block has no skip, no gate: it runs with the mask head
    assert isinstance(tail, FullResolutionTail)
    assert isinstance(tail.upsampled, UpsampledConvActivation)
    assert isinstance(head, nn.Identity)
    kinds = [
        (type(block.upsample).__name__, type(block.conv1[0]).__name__, type(block.attention1).__name__)
        for block in decoder.blocks[:-1]
    ]
    assert all(kind == ("Upsample", "ConvActivation", "SCSE") for kind in kinds)


@pytest.mark.parametrize(("batch", "height"), [(1, 9), (2, 16)])
def test_tail_in_row_strips_equals_the_whole_map(batch: int, height: int) -> None:
    """Strips of any row count compute the whole map's rows, at the image borders and between strips."""
    torch.manual_seed(0)
    first, second = nn.Conv2d(6, 5, 3, padding=1).eval(), nn.Conv2d(5, 5, 3, padding=1).eval()
    head = nn.Conv2d(5, 1, 1).eval()
    upsampled = UpsampledConvActivation(ConvActivation(first, nn.ReLU()))
    tail = FullResolutionTail(upsampled, ConvActivation(second, nn.ReLU()), head)
    features = torch.randn(batch, 6, height, 11).contiguous(memory_format=torch.channels_last)
    row_bytes = batch * 5 * 22 * 4
    with torch.no_grad():
        whole = tail(features)
        expected = head(torch.relu(second(torch.relu(first(nn.functional.interpolate(features, scale_factor=2.0))))))
        torch.testing.assert_close(whole, expected, **TOLERANCE)
        for rows in (1, 2, 3, 5, 2 * height - 1):
            tail.strip_bytes = rows * row_bytes
            torch.testing.assert_close(tail(features), whole, rtol=0, atol=1e-6)  # rounding only; a wrong row is ~0.1
        tail.strip_bytes = row_bytes
        strips = []
        handle = tail.head.register_forward_hook(lambda _module, _inputs, output: strips.append(output.shape[2]))
        tail(features)
        handle.remove()
        assert strips == [1] * 2 * height  # one call of the head per strip of one row
    with pytest.raises(ValueError, match="no skip"):
        tail(features, features)
    with pytest.raises(ValueError, match="1x1 convolution as the head"):
        FullResolutionTail(upsampled, ConvActivation(second, nn.ReLU()), nn.Conv2d(5, 1, 3, padding=1))


def test_the_bare_network_imports_without_anomalib() -> None:
    """Serving or benchmarking ``MetaUASModel`` does not pay for anomalib's and Lightning's imports."""
    code = (
        "import sys\n"
        "from anomalib_uas.models.metauas.torch_model import MetaUASModel\n"
        "loaded = sorted({name.split('.')[0] for name in sys.modules} & {'anomalib', 'lightning'})\n"
        "print(','.join(loaded) or 'none')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "none"


def test_pointwise_convolution_on_a_pooled_input_is_a_matrix_product() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 5, 1).eval()
    copied = inference_copy(nn.Sequential(conv, nn.SiLU()))
    assert isinstance(copied[0], PointwiseConv)
    with torch.no_grad():
        for shape in [(3, 12, 1, 1), (3, 12, 4, 6)]:  # pooled (matrix product) and spatial (convolution)
            features = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(copied(features), nn.functional.silu(conv(features)), **TOLERANCE)
