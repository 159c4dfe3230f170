# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""An inference-only copy of a MetaUAS encoder or decoder: batch norms folded into convolutions, channels-last.

In eval mode a batch norm is a fixed per-channel affine map, so a convolution followed by one equals a single
convolution with rescaled weights and a bias. :func:`inference_copy` deep-copies a module, folds every such pair
and stores the weights channels-last (the layout oneDNN runs depthwise and 1x1 convolutions fastest in on the
CPU). The original module, its ``state_dict`` and the checkpoints written from it are not touched; the outputs
agree with the original's up to float rounding.

Pairs are a convolution directly followed by a batch norm among a module's children in registration order,
which is the order of the forward pass in timm EfficientNet blocks and stems and in ``nn.Sequential`` layers.
``MetaUASModel`` folds only such modules; other encoders are only made channels-last. The activation after a
folded batch norm (inside timm's ``BatchNormAct2d``, or the next ``nn.ReLU``/``nn.SiLU`` child) is fused with
the convolution into one oneDNN primitive (:class:`ConvActivation`), which saves a pass over the activations.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from anomalib_uas.models.metauas.inference import inference_copy
    >>> layer = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> fused = inference_copy(layer)
    >>> [type(child).__name__ for child in fused]
    ['ConvActivation', 'Identity', 'Identity']
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

__all__ = ["ConvActivation", "fold_batch_norm", "inference_copy"]


@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Module:
    """Fold an eval-mode batch norm into the convolution before it, in place.

    Args:
        conv: The convolution; its weight is rescaled and it gets a bias.
        norm: The batch norm that follows it (running statistics are used).

    Returns:
        What replaces the batch norm: its activation for timm's ``BatchNormAct2d``, else ``nn.Identity``.
    """
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)
    return getattr(norm, "act", nn.Identity())


class ConvActivation(nn.Module):
    """A convolution and the activation after it, run as one oneDNN primitive on the CPU where torch has oneDNN.

    Elsewhere (other devices, dtypes or builds, and under ``torch.export``/``torch.compile``) the two run one after
    the other, with the same result.

    Args:
        conv: A plain ``nn.Conv2d`` with numeric padding.
        activation: ``nn.SiLU``, ``nn.ReLU`` or ``nn.Identity``.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation
        self.attribute = _ONEDNN_ATTRIBUTES[type(activation)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Convolve and activate.

        Args:
            features: ``[B, C, H, W]``.

        Returns:
            The activated convolution output.
        """
        conv = self.conv
        eager_cpu = features.device.type == "cpu" and features.dtype == torch.float32
        # torch.export (ONNX) and torch.compile trace the two plain operations, which they can translate.
        if eager_cpu and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._convolution_pointwise(
                features,
                conv.weight,
                conv.bias,
                conv.padding,
                conv.stride,
                conv.dilation,
                conv.groups,
                self.attribute,
                [],
                "",
            )
        return self.activation(conv(features))


_ONEDNN_ATTRIBUTES = {nn.SiLU: "swish", nn.ReLU: "relu", nn.Identity: "none"}


def _fold_children(parent: nn.Module) -> None:
    children = list(parent.named_children())
    for index, ((conv_name, conv), (norm_name, norm)) in enumerate(itertools.pairwise(children)):
        if not (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm.track_running_stats
            and norm.num_features == conv.out_channels
        ):
            continue
        activation = fold_batch_norm(conv, norm)
        following = children[index + 2] if index + 2 < len(children) else None
        if isinstance(activation, nn.Identity) and following is not None and type(following[1]) in (nn.ReLU, nn.SiLU):
            activation = following[1]  # an activation module right after the batch norm (nn.Sequential layers)
            setattr(parent, following[0], nn.Identity())
        fusable = type(conv) is nn.Conv2d and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
        if fusable and type(activation) in _ONEDNN_ATTRIBUTES:
            setattr(parent, conv_name, ConvActivation(conv, activation))
            setattr(parent, norm_name, nn.Identity())
        else:
            setattr(parent, norm_name, activation)


def inference_copy(module: nn.Module, fold: bool = True) -> nn.Module:
    """A frozen eval-mode copy of ``module`` with channels-last weights and, optionally, batch norms folded.

    Args:
        module: The module to copy (left unchanged).
        fold: Fold batch norms into the convolutions before them and fuse the activations that follow; only for
            modules whose registration order is their forward order and where nothing else reads a folded
            convolution's output.

    Returns:
        The copy.
    """
    fused = copy.deepcopy(module).eval().requires_grad_(False)
    for parent in list(fused.modules()) if fold else []:
        _fold_children(parent)
    return fused.to(memory_format=torch.channels_last)
