# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Pre-processing pieces that anomalib's stock transforms cannot express.

:class:`AlignCornersResize` is a torchvision ``Resize`` whose images are resized bilinearly with
``align_corners=True`` and no antialiasing (the kornia resize of the official MetaUAS code), while masks keep
nearest-neighbour resizing. Being a ``Resize``, anomalib's datamodules append it to their augmentations, so
metrics are computed at the model resolution.

:class:`SizedPreProcessor` persists such transforms in checkpoints as plain data (size, mean, std), which
anomalib's allow-list of transforms cannot.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, Normalize, Resize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AlignCornersResize", "SizedPreProcessor", "imagenet_pre_processor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AlignCornersResize(Resize):
    """Bilinear ``align_corners=True`` resize for images; nearest for masks.

    Args:
        size: Output ``(height, width)``.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__(size=list(size), antialias=False)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input.

        Args:
            inpt: An image tensor ``[..., C, H, W]`` or a torchvision ``Mask``.
            params: Unused transform parameters.

        Returns:
            The resized input, of the same type.
        """
        if isinstance(inpt, tv_tensors.Mask) or not isinstance(inpt, torch.Tensor):
            return super().transform(inpt, params)
        if tuple(inpt.shape[-2:]) == tuple(self.size):
            return inpt
        batched = inpt.reshape(-1, *inpt.shape[-3:])
        values = batched if batched.is_floating_point() else batched.float()
        resized = F.interpolate(values, size=tuple(self.size), mode="bilinear", align_corners=True)
        if not batched.is_floating_point():
            resized = resized.round().clamp(0, torch.iinfo(batched.dtype).max).to(batched.dtype)
        resized = resized.reshape(*inpt.shape[:-2], *self.size)
        return tv_tensors.wrap(resized, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else resized


class SizedPreProcessor(PreProcessor):
    """A PreProcessor of ``AlignCornersResize`` + ``Normalize`` that survives checkpoint save and load.

    Args:
        image_size: Square output size.
        mean: Normalisation mean.
        std: Normalisation standard deviation.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(transform=_compose(image_size, mean, std))
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def checkpoint_config(self) -> dict[str, Any]:
        """Plain-data configuration stored in checkpoints.

        Returns:
            The image size, mean and std.
        """
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Rebuild the transforms from a stored configuration.

        Args:
            config: What :meth:`checkpoint_config` returned.
        """
        self.image_size = int(config["image_size"])
        self.mean = tuple(config["mean"])
        self.std = tuple(config["std"])
        self.transform = _compose(self.image_size, self.mean, self.std)
        self.export_transform = get_exportable_transform(self.transform)


def _compose(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Compose:
    return Compose([AlignCornersResize((image_size, image_size)), Normalize(mean=list(mean), std=list(std))])


def imagenet_pre_processor(image_size: tuple[int, int] | int | None = None) -> SizedPreProcessor:
    """Bilinear ``align_corners=True`` resize to a square, no crop, ImageNet normalisation (the CNN models' input).

    Args:
        image_size: Square size (an int or an ``(h, w)`` pair with h == w); 256 by default.

    Returns:
        The pre-processor.
    """
    size = image_size if isinstance(image_size, int) else (image_size or (256, 256))[0]
    return SizedPreProcessor(size, IMAGENET_MEAN, IMAGENET_STD)
