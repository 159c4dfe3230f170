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
``MetaUASModel`` folds only such modules; other encoders are only made channels-last. A batch norm with an
activation inside (timm's ``BatchNormAct2d``) is replaced by that activation.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from anomalib_uas.models.metauas.inference import inference_copy
    >>> layer = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> fused = inference_copy(layer)
    >>> type(fused[1]).__name__
    'Identity'
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

__all__ = ["fold_batch_norm", "inference_copy"]


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


def inference_copy(module: nn.Module, fold: bool = True) -> nn.Module:
    """A frozen eval-mode copy of ``module`` with channels-last weights and, optionally, batch norms folded.

    Args:
        module: The module to copy (left unchanged).
        fold: Fold batch norms into the convolutions before them; only for modules whose registration order is
            their forward order and where nothing else reads a folded convolution's output.

    Returns:
        The copy.
    """
    fused = copy.deepcopy(module).eval().requires_grad_(False)
    for parent in list(fused.modules()) if fold else []:
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(children):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and norm.track_running_stats
                and norm.num_features == conv.out_channels
            ):
                setattr(parent, norm_name, fold_batch_norm(getattr(parent, conv_name), norm))
    return fused.to(memory_format=torch.channels_last)
