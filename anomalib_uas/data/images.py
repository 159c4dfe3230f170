# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading images robustly: a format allow-list, any common mode, clear errors, and a predict dataset built on it.

Only the formats of :data:`IMAGE_FORMATS` (PNG, JPEG, BMP, TIFF, WebP) are opened; Pillow never tries its other
plugins (EPS would start Ghostscript). anomalib reads images with ``PIL.Image.convert("RGB")``, which saturates
16-bit images (a 16-bit value of 30000 becomes 1.0). :func:`read_image` scales 16-bit and 32-bit integer images by
their type's range and float images by the range their values use, repeats grayscale over three channels, drops
alpha and expands palettes; an unreadable file raises an error that names it.

:func:`decode_image` reads encoded bytes within bounds: at most ``max_pixels``, an aspect ratio of at most
``max_aspect``, and, given ``min_side``, a JPEG decoded at reduced DCT scale (``Image.draft``) and any image
shrunk by an integer box filter while its short side stays at least ``2 * min_side``, before it becomes a float
tensor. So a 40-megapixel image costs its 8-bit pixels once, not four float copies.
:class:`ImageFolderDataset` is anomalib's ``PredictDataset`` with that reader, for ``Engine.predict(dataset=...)``.

Example:
    >>> from anomalib_uas.data import ImageFolderDataset
    >>> dataset = ImageFolderDataset("to_inspect/")  # doctest: +SKIP
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data import ImageItem, PredictDataset
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "ImageFolderDataset", "decode_image", "list_images", "read_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
_FLOAT_RANGES = (1.0, 255.0, 65535.0)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as an RGB float tensor in ``[0, 1]``.

    Grayscale images are repeated over three channels, alpha is dropped, palette images are expanded and 16-bit
    or 32-bit images are scaled by their type's range.

    Args:
        path: Image file.

    Returns:
        ``[3, H, W]`` float32 tensor.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a readable image (corrupt, truncated or another format); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Image {path} does not exist."
        raise FileNotFoundError(msg)
    return _decode(path, str(path))


def decode_image(
    data: bytes,
    max_pixels: int | None = None,
    max_aspect: float | None = None,
    min_side: int | None = None,
) -> torch.Tensor:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF, WebP) like :func:`read_image`, within bounds.

    Args:
        data: The encoded image.
        max_pixels: Largest accepted ``width * height``, checked from the header before any pixel is decoded.
        max_aspect: Largest accepted ratio of the long to the short side, checked from the header.
        min_side: Short side the caller resizes to; larger images are decoded reduced (JPEG) and shrunk by an
            integer factor while their short side stays at least twice this.

    Returns:
        ``[3, H, W]`` float32 tensor in ``[0, 1]``.

    Raises:
        ValueError: Undecodable data, a format outside :data:`IMAGE_FORMATS`, or an image over a bound.
    """
    return _decode(io.BytesIO(data), "the image data", max_pixels, max_aspect, min_side)


def _decode(
    source: Path | io.BytesIO,
    name: str,
    max_pixels: int | None = None,
    max_aspect: float | None = None,
    min_side: int | None = None,
) -> torch.Tensor:
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                msg = f"The image is {width}x{height} pixels; at most {max_pixels} pixels are accepted. Resize it."
                raise ValueError(msg)
            if max_aspect is not None and max(width, height) > max_aspect * max(min(width, height), 1):
                msg = (
                    f"The image is {width}x{height} pixels; the long side may be at most {max_aspect:g} times the "
                    "short side. Crop it."
                )
                raise ValueError(msg)
            if min_side is not None and image.format == "JPEG":
                image.draft(image.mode, (2 * min_side, 2 * min_side))
            image.load()
            if min_side is not None:
                factor = min(image.size) // (2 * min_side)
                if factor > 1:
                    image = _reducible(image).reduce(factor)
            array = _to_rgb_array(image, name)
    except Image.DecompressionBombError as exc:
        msg = f"Cannot read {name}: {exc} Resize it."
        raise ValueError(msg) from exc
    except UnidentifiedImageError as exc:
        msg = f"Cannot read {name}: it is not an image in an accepted format ({', '.join(IMAGE_FORMATS)})."
        raise ValueError(msg) from exc
    except (OSError, SyntaxError) as exc:
        msg = f"Cannot read {name}: {exc}. It is corrupt, truncated or not an image; replace or remove it."
        raise ValueError(msg) from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _reducible(image: Image.Image) -> Image.Image:
    """The image in a mode that ``Image.reduce`` handles: 16-bit to 32-bit integers, bilevel and palette to RGB(A)."""
    if image.mode.startswith("I;16"):
        return image.convert("I")
    if image.mode in {"1", "P", "PA"}:
        return image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
    return image


def _to_rgb_array(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N"}:
        gray = np.asarray(image, dtype=np.float32) / 65535.0
    elif image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        gray = (values / (65535.0 if values.max(initial=0) <= 65535 else 2**32 - 1)).astype(np.float32)
    elif image.mode == "F":
        gray = _scale_float(np.asarray(image, dtype=np.float32), name)
    else:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(gray[..., None], 3, axis=2)


def _scale_float(values: np.ndarray, name: str) -> np.ndarray:
    """Scale float pixels to ``[0, 1]`` by the range they use: 1, 255, 65535, or their own minimum and maximum."""
    if not np.isfinite(values).all():
        msg = f"Cannot read {name}: the float image holds NaN or infinite values."
        raise ValueError(msg)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low >= 0.0:
        for top in _FLOAT_RANGES:
            if high <= top:
                return values / np.float32(top)
    return (values - np.float32(low)) / np.float32(max(high - low, 1e-12))


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """List image files from a folder (recursively, sorted) or a sequence of files.

    Hidden files and folders of a folder (names starting with ``.``, such as macOS ``._000.png`` metadata) are
    not images and are left out.

    Args:
        source: A folder, a single image file, or a sequence of image files.

    Returns:
        Sorted image paths.

    Raises:
        FileNotFoundError: A folder or file that does not exist.
        ValueError: The source holds no image.
    """
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_dir():
            paths = sorted(
                path
                for path in root.rglob("*")
                if path.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in path.relative_to(root).parts)
                and path.is_file()
            )
        elif root.is_file():
            paths = [root]
        else:
            msg = f"Prompt image source {root} does not exist."
            raise FileNotFoundError(msg)
    else:
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            msg = f"Prompt images do not exist: {', '.join(missing)}"
            raise FileNotFoundError(msg)
    if not paths:
        msg = f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found in {source}."
        raise ValueError(msg)
    return paths


class ImageFolderDataset(PredictDataset):
    """anomalib's ``PredictDataset`` reading images with :func:`read_image`.

    Args:
        path: A folder of images or a single image.
        transform: Transform applied to each image.
    """

    def __init__(self, path: str | Path, transform: torch.nn.Module | None = None) -> None:
        super().__init__(path, transform=transform)
        self.image_filenames = list_images(path)

    def __getitem__(self, index: int) -> ImageItem:
        """Read one image.

        Args:
            index: Item index.

        Returns:
            The image (``[3, H, W]`` in ``[0, 1]``, transformed) and its path.
        """
        path = self.image_filenames[index]
        image = read_image(path)
        return ImageItem(image=self.transform(image) if self.transform else image, image_path=str(path))
