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
folded batch norm (inside timm's ``BatchNormAct2d``, or the next ``nn.ReLU``/``nn.SiLU`` child; SiLU, ReLU or the
ReLU6 of EfficientNet-Lite) is fused with the convolution into one oneDNN primitive (:class:`ConvActivation`),
which saves a pass over the activations. So is the padding of timm's TF-"SAME" convolutions (stride 2): no
padded copy of the input is made.

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
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import Conv2dSame, get_same_padding
from torch import nn

__all__ = [
    "ConvActivation",
    "FullResolutionTail",
    "PointwiseConv",
    "UpsampledConvActivation",
    "fold_batch_norm",
    "inference_copy",
]


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


def _onednn_path(features: torch.Tensor) -> bool:
    """Whether the fused oneDNN kernels run: eager float32 on a CPU whose torch has oneDNN.

    ``torch.export`` (ONNX) and ``torch.compile`` trace the plain operations instead, which they can translate.
    """
    return (
        features.device.type == "cpu"
        and features.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and not torch.compiler.is_compiling()
    )


class ConvActivation(nn.Module):
    """A convolution and the activation after it, run as one oneDNN primitive on the CPU where torch has oneDNN.

    Elsewhere (other devices, dtypes or builds, and under ``torch.export``/``torch.compile``) the two run one after
    the other, with the same result.

    A timm ``Conv2dSame`` (TF "SAME" padding, which pads one pixel more after than before when the total is odd, as
    at every stride-2 layer of an even-sized input) runs without its ``F.pad`` copy: an axis padded ``(p, p + 1)``
    takes a kernel one tap longer, whose first tap is zero, with ``p + 1`` on both sides. The zero tap sees only
    the extra padding row, so the output is the same.
    :func:`inference_copy` does this for depthwise convolutions only, where the longer kernel costs less than the
    copy it saves.

    The kernel is kept in oneDNN's blocked layout for the latest input size: oneDNN would reorder a plain weight at
    every call, and packing it once saves 10-30 % of the time of the deep encoder layers, with the same output bit
    for bit. The layout depends on the input's spatial size (on the CPUs measured, not on the batch size; a weight
    packed for 8x8 inputs made a 16x16 one up to 6x slower), so the kernel is packed again when the size changes and
    only the latest size's is kept. Device and dtype moves drop it (it is rebuilt from the moved weights), and so do
    copies and pickles, which cannot hold oneDNN tensors.

    Args:
        conv: An ``nn.Conv2d`` with numeric padding, or a timm ``Conv2dSame`` without dilation.
        activation: ``nn.SiLU``, ``nn.ReLU``, ``nn.ReLU6`` (EfficientNet-Lite) or ``nn.Identity``.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        super().__init__()
        self._packed: tuple[torch.Size, torch.Tensor, list[int]] | None = None
        self.conv = conv
        self.activation = activation
        self.attribute, self.scalars = _ONEDNN_ATTRIBUTES[type(activation)]
        self.same = isinstance(conv, Conv2dSame)

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> ConvActivation:
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deep-copy state without the packed kernel.

        Returns:
            The module's state.
        """
        return {**super().__getstate__(), "_packed": None}

    def _packed_kernel(self, features: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The packed weight and symmetric padding for this input.

        Args:
            features: The input ``[B, C, H, W]``.

        Returns:
            ``(packed weight, padding)``.
        """
        size = features.shape[-2:]
        conv = self.conv
        if self._packed is None or self._packed[0] != size:
            weight, padding = self._kernel(size)
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, padding, list(conv.stride), list(conv.dilation), conv.groups, list(features.shape)
            )
            self._packed = size, packed, padding
        return self._packed[1], self._packed[2]

    def _kernel(self, size: torch.Size) -> tuple[torch.Tensor, list[int]]:
        """The plain weight and symmetric padding that give the convolution's output at this input size."""
        conv = self.conv
        if not self.same:
            return conv.weight, list(conv.padding)
        totals = [
            get_same_padding(length, kernel, stride, 1)
            for length, kernel, stride in zip(size, conv.kernel_size, conv.stride, strict=True)
        ]
        # timm pads total // 2 before and the rest after: a zero first tap on each axis whose total is odd
        (odd_h, odd_w) = (total % 2 for total in totals)
        return nn.functional.pad(conv.weight, (odd_w, 0, odd_h, 0)), [total - total // 2 for total in totals]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Convolve and activate.

        Args:
            features: ``[B, C, H, W]``.

        Returns:
            The activated convolution output.
        """
        conv = self.conv
        if _onednn_path(features):
            weight, padding = self._packed_kernel(features)
            return torch.ops.mkldnn._convolution_pointwise(
                features,
                weight,
                conv.bias,
                padding,
                conv.stride,
                conv.dilation,
                conv.groups,
                self.attribute,
                self.scalars,
                "",
            )
        return self.activation(conv(features))


class UpsampledConvActivation(nn.Module):
    """Nearest x2 upsampling, then a 3x3 stride-1 convolution with padding 1 and its activation, as one transposed one.

    On a nearest-upsampled map, each output pixel of a 3x3 convolution sees only a 2x2 neighbourhood of the
    low-resolution input: two of its three kernel rows (and columns) fall on the same input pixel, so their weights
    add up. Along one axis, output ``2i`` takes ``w0 * x[i - 1] + (w1 + w2) * x[i]`` and output ``2i + 1`` takes
    ``(w0 + w1) * x[i] + w2 * x[i + 1]``: a stride-2 transposed convolution with the 4-tap kernel
    ``(w2, w1 + w2, w0 + w1, w0)`` and padding 1. oneDNN runs it with the activation fused and writes the full-size
    output directly: 4/9 of the multiplications, and the upsampled map is never made. Outputs agree with
    upsample-then-convolve up to float rounding. Off the eager CPU path it upsamples and runs the module it was built
    from.

    Args:
        fused: The convolution (3x3, stride 1, padding 1, no dilation or groups) fused with its activation.
    """

    def __init__(self, fused: ConvActivation) -> None:
        super().__init__()
        conv = fused.conv
        shape = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        if fused.same or shape != ((3, 3), (1, 1), (1, 1), (1, 1), 1):
            msg = f"UpsampledConvActivation needs a plain 3x3 convolution with stride 1 and padding 1, got {conv}"
            raise ValueError(msg)
        self.fused = fused
        with torch.no_grad():
            # the 4-tap kernel on each axis; transposed convolutions take [in_channels, out_channels, kh, kw]
            taps = conv.weight.new_tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
            weight = torch.einsum("ak,oikl,bl->oiab", taps, conv.weight, taps).transpose(0, 1)
            self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Upsample x2 (nearest), convolve and activate.

        Args:
            features: ``[B, C, h, w]``.

        Returns:
            ``[B, out_channels, 2h, 2w]``, channels-last.
        """
        fused = self.fused
        if not _onednn_path(features):
            return fused(nn.functional.interpolate(features, scale_factor=2.0, mode="nearest"))
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            features,
            self.weight,
            fused.conv.bias,
            [1, 1],
            [0, 0],
            [2, 2],
            [1, 1],
            1,
            fused.attribute,
            fused.scalars,
            "",
        )


class FullResolutionTail(nn.Module):
    """The decoder's last block (x2 nearest upsampling, two 3x3 conv-activations) and the mask head, in row strips.

    The last block works at the input resolution, where its two intermediate maps are the largest tensors of the
    forward pass (50 MB each at 512 px with the official 48 channels). Above ``strip_bytes`` per intermediate the
    block and the head run on horizontal strips of output rows, each from the few input rows it depends on, and only
    the one-channel logits are assembled at full size: the strips stay in memory the allocator reuses (glibc maps every
    block above 32 MB afresh, and the kernel zero-fills its pages at every call) and in the cache, and the peak memory
    drops by the two full-size maps. Each strip gives its rows' values of the whole-map computation (up to float
    rounding where oneDNN picks another kernel for the strip's shape).

    Args:
        upsampled: The block's first convolution with the upsampling folded in.
        conv: The block's second convolution, 3x3 with padding 1.
        head: The mask head (a 1x1 convolution).
        strip_bytes: Largest intermediate map computed at once.
    """

    def __init__(
        self, upsampled: UpsampledConvActivation, conv: ConvActivation, head: nn.Module, strip_bytes: int = 16 << 20
    ) -> None:
        super().__init__()
        if conv.conv.kernel_size != (3, 3) or conv.conv.padding != (1, 1) or conv.conv.stride != (1, 1):
            msg = f"FullResolutionTail needs a 3x3 second convolution with stride 1 and padding 1, got {conv.conv}"
            raise ValueError(msg)
        if not (isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.padding == (0, 0)):
            msg = f"FullResolutionTail needs a 1x1 convolution as the head (each row on its own), got {head}"
            raise ValueError(msg)
        self.upsampled = upsampled
        self.conv = conv
        self.head = head
        self.strip_bytes = strip_bytes

    def _rows(self, features: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Logits of output rows ``[start, stop)``, from the input rows they depend on."""
        height = 2 * features.shape[2]
        # the second convolution needs one upsampled row on each side; upsampled row 2i (2i + 1) reads input rows
        # i - 1 and i (i and i + 1), so one input row on each side more, whose own outer output rows are dropped
        first, last = max(start - 1, 0), min(stop + 1, height)
        low, high = max(first // 2 - 1, 0), min((last - 1) // 2 + 2, features.shape[2])
        upsampled = self.upsampled(features[:, :, low:high])[:, :, first - 2 * low : last - 2 * low]
        return self.head(self.conv(upsampled)[:, :, start - first : stop - first])

    def forward(self, features: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the last level and predict the logits.

        Args:
            features: ``[B, C, h, w]`` from the previous block.
            skip: Must be ``None``: the last block has no skip connection.

        Returns:
            Logits ``[B, 1, 2h, 2w]``.
        """
        if skip is not None:
            msg = "The last decoder block has no skip connection."
            raise ValueError(msg)
        batch, _, height, width = features.shape
        channels = max(self.upsampled.fused.conv.out_channels, self.conv.conv.out_channels)
        row_bytes = batch * channels * 2 * width * features.element_size()
        strips = -(-2 * height * row_bytes // self.strip_bytes)
        if strips <= 1 or not _onednn_path(features):
            return self.head(self.conv(self.upsampled(features)))
        rows = -(-2 * height // strips)
        logits = features.new_empty((batch, 1, 2 * height, 2 * width))
        for start in range(0, 2 * height, rows):
            stop = min(start + rows, 2 * height)
            logits[:, :, start:stop] = self._rows(features, start, stop)
        return logits


class PointwiseConv(nn.Module):
    """A 1x1 convolution that runs as a matrix product on single-pixel inputs.

    Squeeze-and-excitation gates (in EfficientNet blocks and the decoder's SCSE) apply 1x1 convolutions to globally
    pooled ``[B, C, 1, 1]`` features, where setting up a convolution costs far more than its arithmetic; there it
    runs as ``F.linear`` (same result up to float rounding). Larger inputs go through the convolution.

    Args:
        conv: A 1x1 convolution with stride 1, no padding, no dilation and one group.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Convolve.

        Args:
            features: ``[B, C, H, W]``.

        Returns:
            ``[B, out_channels, H, W]``.
        """
        conv = self.conv
        if features.shape[-2:] != (1, 1) or torch.compiler.is_compiling():
            return conv(features)
        weight = conv.weight.view(conv.out_channels, conv.in_channels)
        return nn.functional.linear(features.flatten(1), weight, conv.bias).view(-1, conv.out_channels, 1, 1)


def _pointwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


_ONEDNN_ATTRIBUTES: dict[type[nn.Module], tuple[str, list[float]]] = {
    nn.SiLU: ("swish", []),
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
    nn.Identity: ("none", []),
}


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
        plain = type(conv) is nn.Conv2d and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
        # a longer kernel pays for the padded copy it saves in depthwise convolutions, not in full ones (the stem)
        depthwise = conv.groups == conv.in_channels > 1
        fusable = plain or (type(conv) is Conv2dSame and depthwise and conv.dilation == (1, 1))
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
        The copy; the 1x1 convolutions inside it run as matrix products on single-pixel inputs
        (:class:`PointwiseConv`).
    """
    fused = copy.deepcopy(module).eval().requires_grad_(False)
    for parent in list(fused.modules()) if fold else []:
        _fold_children(parent)
    fused = fused.to(memory_format=torch.channels_last)
    for parent in list(fused.modules()):
        if isinstance(parent, ConvActivation):  # fused: oneDNN runs it in one primitive already
            continue
        for name, child in parent.named_children():
            if _pointwise(child):
                setattr(parent, name, PointwiseConv(child))
    return fused
