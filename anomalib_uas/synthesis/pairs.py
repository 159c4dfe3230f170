# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Synthetic change pairs (prompt, query, change mask) for MetaUAS meta-training.

MetaUAS learns change segmentation on synthetic image pairs and then segments anomalies as changes between a
normal prompt and a query. The official repository ships no training code; this module builds such pairs from
any images, with classical image processing only (no learned model, no download).

Every pair starts from ``clean``: a random square crop of a source image (random scale, flip and quarter turn)
resized to ``image_size``. Then one change kind is drawn (:data:`CHANGE_KINDS`):

* ``local``: a thresholded Perlin-noise mask (:func:`~anomalib_uas.synthesis.perlin_mask`) blended with an
  anomaly source, DRAEM style: inside the mask the query is ``(1 - beta) * source + beta * clean``;
* ``appear``: an irregular segment of another image (or of a procedural texture) is pasted into the query;
* ``disappear``: a region present in ``clean`` is absent from the query. Either a segment of ``clean`` is filled
  with OpenCV inpainting, or an object is pasted into ``clean`` (so the prompt shows it) and the query is the crop
  without it;
* ``exchange``: a segment of ``clean`` is inpainted and a segment of another image is pasted over it;
* ``none``: the query is ``clean``.

With probability :attr:`PairSynthesisConfig.p_realization` the pair is a *texture pair* instead: ``clean`` is a
procedural stochastic texture (:data:`TEXTURE_STYLES`: wobbling stripes, blotches, speckle, fractal Perlin noise,
and periodic lattices of two crossing thread sets, as a grid, checks or a weave; with random colours and scales)
and the prompt is *another realization* of the same random process (same style, new random draws: phases,
grids, noise, the wander of lattice threads), so the model learns that statistically identical content is normal
even when no pixel matches.

Segments are irregular: a star-shaped random polygon, cut where possible along the edges of the image it comes
from (a connected component of its Otsu-thresholded, blurred grey levels). The ``prompt`` is ``clean`` after a
random affine transform (rotation, translation, scale, reflected border) and a small brightness, contrast and
saturation jitter, so prompt and query are misaligned views of the same normal content.

The mask is exact: the query differs from ``clean`` at every mask pixel, by at least
:attr:`PairSynthesisConfig.min_change` grey levels in its most changed channel, and nowhere else. Changed pixels
that end up closer than that to ``clean`` are pushed further along their own change (or, if that saturates,
brightened or darkened).

Every item depends on ``(seed, index)`` only, so workers, shuffling and resumption do not change the pairs.

Offline sources (:func:`offline_source_images`, listed in :data:`OFFLINE_SOURCES`) are images that ship with
scikit-image, scikit-learn and matplotlib. They exclude the four ``skimage.data`` images of the offline evaluation
dataset (``brick``, ``grass``, ``gravel``, ``immunohistochemistry``, see :mod:`anomalib_uas.data.demo`).

Example:
    >>> from anomalib_uas.synthesis import ChangePairDataset, offline_source_images
    >>> dataset = ChangePairDataset(offline_source_images(), length=1000, seed=0)  # doctest: +SKIP
    >>> pair = dataset[0]  # doctest: +SKIP
    >>> pair.prompt.shape, pair.query.shape, pair.mask.shape, pair.kind  # doctest: +SKIP
    (torch.Size([3, 256, 256]), torch.Size([3, 256, 256]), torch.Size([256, 256]), 'local')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from anomalib_uas.data.images import list_images, read_image
from anomalib_uas.synthesis.perlin import perlin_mask, perlin_noise

__all__ = [
    "CHANGE_KINDS",
    "LATTICE_LAYOUTS",
    "OFFLINE_SOURCES",
    "TEXTURE_STYLES",
    "ChangePair",
    "ChangePairDataset",
    "PairSynthesisConfig",
    "load_source_images",
    "offline_source_images",
]

UInt8Image = npt.NDArray[np.uint8]
BoolMask = npt.NDArray[np.bool_]

CHANGE_KINDS: tuple[str, ...] = ("local", "appear", "disappear", "exchange", "none")
"""Kinds of synthetic change, as reported by :attr:`ChangePair.kind`."""

OBJECT_KINDS: tuple[str, ...] = ("appear", "disappear", "exchange")

TEXTURE_STYLES: tuple[str, ...] = ("stripes", "blotches", "speckle", "perlin", "lattice")
"""Procedural texture families of texture pairs (and of pattern content): each draw of a style's parameters defines
a random process whose realizations are statistically identical."""

LATTICE_LAYOUTS: tuple[str, ...] = ("grid", "checks", "weave")
"""How the two thread sets of a ``lattice`` texture combine: crossing lines, a checkerboard, or threads that pass
over and under each other at alternate crossings (plain weave)."""

OFFLINE_SOURCES: tuple[str, ...] = (
    "skimage.data.astronaut",
    "skimage.data.camera",
    "skimage.data.cell",
    "skimage.data.chelsea",
    "skimage.data.clock",
    "skimage.data.coffee",
    "skimage.data.coins",
    "skimage.data.colorwheel",
    "skimage.data.hubble_deep_field",
    "skimage.data.logo",
    "skimage.data.microaneurysms",
    "skimage.data.moon",
    "skimage.data.page",
    "skimage.data.retina",
    "skimage.data.rocket",
    "skimage.data.text",
    "sklearn.datasets.load_sample_image('china.jpg')",
    "sklearn.datasets.load_sample_image('flower.jpg')",
    "matplotlib mpl-data/sample_data/grace_hopper.jpg",
)
"""The images :func:`offline_source_images` returns, in order.

``skimage.data.cat`` is the same photograph as ``chelsea`` and ``skimage.data.horse`` is a two-level silhouette, so
both are left out; ``logo``'s alpha channel (fully opaque) is dropped and grayscale images are repeated over three
channels.
"""

_MIN_IMAGE_SIZE = 32
_MIN_CROP = 32
_MIN_SEGMENT = 8
_POLYGON_VERTICES = 24
_INPAINT_RADIUS = 3


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        msg = f"{name} must be a probability in [0, 1], got {value}; pass a value in that interval."
        raise ValueError(msg)


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        msg = f"{name} must be a (min, max) pair with {low} <= min <= max <= {high}, got {bounds}; pass such a pair."
        raise ValueError(msg)


@dataclass(frozen=True)
class PairSynthesisConfig:
    """Settings of the change-pair synthesis.

    Attributes:
        image_size: Side of the square prompt, query and mask, in pixels (at least 32).
        p_local: Probability of a ``local`` (Perlin-noise region) change.
        p_object: Probability of an object-level change, split evenly among ``appear``, ``disappear`` and
            ``exchange``.
        p_none: Probability of no change (empty mask). ``p_local + p_object + p_none`` must be 1.
        max_rotation: Largest prompt-vs-query rotation, in degrees.
        max_translate: Largest prompt-vs-query translation along each axis, as a fraction of ``image_size``.
        scale_range: ``(min, max)`` prompt-vs-query scale factor.
        color_jitter: Largest relative change of the prompt's brightness, contrast and saturation.
        crop_scale: ``(min, max)`` side of the source crop as a fraction of the source's shorter side, drawn
            log-uniformly (small fractions give texture-like close-ups, 1 the whole image).
        min_change: Smallest difference, in grey levels of the most changed channel, between the query and ``clean``
            at any mask pixel (1 to 127). It makes the mask exactly the set of changed pixels.
        perlin_scale_exponents: Half-open range of ``k`` for the ``2**k`` Perlin lattice cells per axis.
        perlin_threshold: Perlin noise level above which a pixel is in a ``local`` mask. The noise is in about
            ``[-0.71, 0.71]``; DRAEM's 0.5 leaves most masks nearly empty, 0.4 covers about 3 % of the image.
        local_area: ``(min, max)`` fraction of the image a ``local`` mask covers; the threshold is moved to meet
            these bounds.
        blend_beta: ``(min, max)`` weight of ``clean`` inside a ``local`` mask (0 replaces it by the anomaly
            source, values near 1 give faint changes).
        object_size: ``(min, max)`` height and width of an object segment's box, as fractions of ``image_size``.
        p_pattern: Probability that the content of a ``local`` change or of a pasted object is a procedural pattern
            (stripes, blotches, speckle) rather than a crop of another image.
        p_disappear_restore: Probability that a ``disappear`` pair removes an object pasted into ``clean`` (the
            query is then the untouched crop) rather than inpainting a segment of the crop.
        p_realization: Probability of a texture pair: ``clean`` is a procedural texture and the prompt another
            realization of it (see the module docstring) rather than a warped view of ``clean``.

    Raises:
        ValueError: A setting out of its range, or probabilities that do not sum to 1.

    Example:
        >>> PairSynthesisConfig(image_size=128, p_local=0.5, p_object=0.5, p_none=0.0).image_size
        128
    """

    image_size: int = 256
    p_local: float = 0.45
    p_object: float = 0.35
    p_none: float = 0.2
    max_rotation: float = 10.0
    max_translate: float = 0.05
    scale_range: tuple[float, float] = (0.95, 1.05)
    color_jitter: float = 0.05
    crop_scale: tuple[float, float] = (0.15, 1.0)
    min_change: int = 10
    perlin_scale_exponents: tuple[int, int] = (0, 6)
    perlin_threshold: float = 0.4
    local_area: tuple[float, float] = (0.005, 0.4)
    blend_beta: tuple[float, float] = (0.0, 0.8)
    object_size: tuple[float, float] = (0.15, 0.6)
    p_pattern: float = 0.3
    p_disappear_restore: float = 0.5
    p_realization: float = 0.0

    def __post_init__(self) -> None:
        """Validate the settings."""
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 32:
            msg = f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {self.image_size!r}; pass e.g. 256."
            raise ValueError(msg)
        for name in ("p_local", "p_object", "p_none", "p_pattern", "p_disappear_restore", "p_realization"):
            _check_probability(name, getattr(self, name))
        total = self.p_local + self.p_object + self.p_none
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            msg = (
                f"p_local + p_object + p_none must be 1, got {self.p_local} + {self.p_object} + {self.p_none} = "
                f"{total}; rescale them to sum to 1."
            )
            raise ValueError(msg)
        self._check_geometry()
        self._check_changes()

    def _check_geometry(self) -> None:
        if not 0.0 <= self.max_rotation <= 180.0:
            msg = f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}; pass e.g. 10."
            raise ValueError(msg)
        if not 0.0 <= self.max_translate <= 0.5:
            msg = f"max_translate must be in [0, 0.5] (fraction of the image side), got {self.max_translate}."
            raise ValueError(msg)
        _check_range("scale_range", self.scale_range, 1e-3, 1e3)
        if not 0.0 <= self.color_jitter < 1.0:
            msg = f"color_jitter must be in [0, 1), got {self.color_jitter}; pass e.g. 0.05."
            raise ValueError(msg)
        _check_range("crop_scale", self.crop_scale, 1e-3, 1.0)

    def _check_changes(self) -> None:
        if isinstance(self.min_change, bool) or not isinstance(self.min_change, int) or not 1 <= self.min_change <= 127:
            msg = f"min_change must be an integer in [1, 127] grey levels, got {self.min_change!r}; pass e.g. 10."
            raise ValueError(msg)
        low, high = self.perlin_scale_exponents
        if not 0 <= low < high <= 10:
            msg = f"perlin_scale_exponents must satisfy 0 <= min < max <= 10, got {self.perlin_scale_exponents}."
            raise ValueError(msg)
        _check_range("local_area", self.local_area, 0.0, 1.0)
        if self.local_area[0] <= 0.0:
            msg = f"local_area[0] must be > 0 so that local masks are never empty, got {self.local_area}."
            raise ValueError(msg)
        _check_range("blend_beta", self.blend_beta, 0.0, 0.99)
        _check_range("object_size", self.object_size, 0.01, 1.0)


@dataclass(frozen=True)
class ChangePair:
    """One synthetic change pair.

    Attributes:
        prompt: ``[3, S, S]`` float32 in ``[0, 1]``: the normal view, misaligned with the query.
        query: ``[3, S, S]`` float32 in ``[0, 1]``: the view with the change.
        mask: ``[S, S]`` float32 in ``{0, 1}``: exactly the query pixels the change altered.
        kind: One of :data:`CHANGE_KINDS`.
    """

    prompt: torch.Tensor
    query: torch.Tensor
    mask: torch.Tensor
    kind: str


def _to_rgb_uint8(image: np.ndarray, name: str) -> UInt8Image:
    """Convert a grayscale, RGB or RGBA image of any common dtype to a contiguous ``(H, W, 3)`` uint8 array."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in {1, 3, 4}:
        array = array[..., :3] if array.shape[2] != 1 else array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        msg = f"{name} has shape {array.shape}; pass (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) images."
        raise ValueError(msg)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        msg = f"{name} has dtype {array.dtype}; pass uint8, uint16, bool or float images in [0, 1]."
        raise ValueError(msg)
    return np.ascontiguousarray(array)


def _read_only(image: UInt8Image) -> UInt8Image:
    image.setflags(write=False)
    return image


@cache
def _offline_images() -> tuple[UInt8Image, ...]:
    import skimage.data
    from PIL import Image

    try:
        import matplotlib as mpl
        from sklearn.datasets import load_sample_image
    except ImportError as exc:
        msg = (
            f"The offline source images need scikit-learn and matplotlib ({exc}); install them "
            "(pip install 'anomalib-uas[pipeline]') or pass image folders to load_source_images."
        )
        raise ImportError(msg) from exc

    images = [
        _to_rgb_uint8(getattr(skimage.data, source.rsplit(".", 1)[1])(), source)
        for source in OFFLINE_SOURCES
        if source.startswith("skimage.data.")
    ]
    images += [_to_rgb_uint8(load_sample_image(name), name) for name in ("china.jpg", "flower.jpg")]
    with Image.open(Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg") as grace_hopper:
        images.append(_to_rgb_uint8(np.asarray(grace_hopper.convert("RGB")), "grace_hopper.jpg"))
    return tuple(_read_only(image) for image in images)


def offline_source_images() -> list[np.ndarray]:
    """Return the source images that ship with installed packages (no download), in :data:`OFFLINE_SOURCES` order.

    These are 16 ``skimage.data`` images (astronaut, camera, cell, chelsea, clock, coffee, coins, colorwheel,
    hubble_deep_field, logo, microaneurysms, moon, page, retina, rocket, text), scikit-learn's two sample images
    (china, flower) and matplotlib's ``grace_hopper.jpg``. None of them is one of the evaluation dataset's images
    (``brick``, ``grass``, ``gravel``, ``immunohistochemistry``). They are loaded once per process.

    Returns:
        19 read-only ``(H, W, 3)`` uint8 RGB arrays.

    Raises:
        ImportError: scikit-learn or matplotlib is not installed.

    Example:
        >>> images = offline_source_images()  # doctest: +SKIP
        >>> len(images), images[0].shape  # doctest: +SKIP
        (19, (512, 512, 3))
    """
    return list(_offline_images())


def load_source_images(folders: Sequence[str | Path] | str | Path, max_side: int | None = 1024) -> list[np.ndarray]:
    """Load every image under some folders (recursively, sorted per folder) as uint8 RGB arrays.

    Images are read with :func:`anomalib_uas.data.images.read_image`, so grayscale, palette, RGBA and 16-bit
    files are handled. All images are held in memory; pass a subset of a large dataset (e.g. a few thousand COCO
    or DTD images).

    Args:
        folders: Image folders (a single folder is accepted too).
        max_side: Images whose longer side exceeds this are downscaled to it, to bound memory and crop time;
            ``None`` keeps the full size.

    Returns:
        ``(H, W, 3)`` uint8 RGB arrays.

    Raises:
        FileNotFoundError: A folder does not exist.
        ValueError: No folder given, a folder without images, an unreadable image, or ``max_side`` below 32.

    Example:
        >>> images = load_source_images(["datasets/dtd/images"])  # doctest: +SKIP
    """
    if isinstance(folders, (str, Path)):
        folders = [folders]
    if not folders:
        msg = "No source folder given; pass at least one image folder."
        raise ValueError(msg)
    if max_side is not None and max_side < _MIN_IMAGE_SIZE:
        msg = f"max_side must be None or >= {_MIN_IMAGE_SIZE}, got {max_side}."
        raise ValueError(msg)
    images = []
    for folder in folders:
        if not Path(folder).is_dir():
            msg = f"Source folder {folder} does not exist or is not a folder; pass a folder of images."
            raise FileNotFoundError(msg)
        for path in list_images(folder):
            array = np.rint(read_image(path).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
            longest = max(array.shape[:2])
            if max_side is not None and longest > max_side:
                size = (round(array.shape[1] * max_side / longest), round(array.shape[0] * max_side / longest))
                array = cv2.resize(array, (max(size[0], 1), max(size[1], 1)), interpolation=cv2.INTER_AREA)
            images.append(np.ascontiguousarray(array))
    return images


def _random_crop(
    image: UInt8Image, size: tuple[int, int], crop_scale: tuple[float, float], rng: np.random.Generator
) -> UInt8Image:
    """Cut a random crop with the aspect ratio of ``size`` (height, width) and resize it to ``size``."""
    out_height, out_width = size
    height, width = image.shape[:2]
    fraction = math.exp(rng.uniform(math.log(crop_scale[0]), math.log(crop_scale[1])))
    shorter = min(height, width)
    crop_height = min(max(round(fraction * shorter), min(_MIN_CROP, shorter)), height)
    crop_width = min(max(round(crop_height * out_width / out_height), 1), width)
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    crop = image[top : top + crop_height, left : left + crop_width]
    shrink = crop_height > out_height
    crop = cv2.resize(crop, (out_width, out_height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if out_height == out_width:
        crop = np.rot90(crop, int(rng.integers(4)))
    return np.ascontiguousarray(crop)


def _recolour(image: UInt8Image, rng: np.random.Generator) -> UInt8Image:
    """Apply one random colour change (channel permutation, inversion, gamma, posterisation or solarisation)."""
    operation = int(rng.integers(6))
    if operation == 0:
        return image
    if operation == 1:
        return np.ascontiguousarray(image[..., rng.permutation(3)])
    levels = np.arange(256, dtype=np.float32)
    if operation == 2:
        table = 255.0 - levels
    elif operation == 3:
        table = 255.0 * (levels / 255.0) ** rng.uniform(0.4, 2.5)
    elif operation == 4:
        step = 2 ** int(rng.integers(5, 8))
        table = (levels // step) * step
    else:
        table = np.where(levels >= rng.uniform(64, 192), 255.0 - levels, levels)
    return cv2.LUT(image, np.clip(np.rint(table), 0, 255).astype(np.uint8))


def _texture_style(rng: np.random.Generator) -> dict[str, object]:
    """Draw the parameters of a procedural texture process (see :data:`TEXTURE_STYLES`)."""
    return {
        "style": TEXTURE_STYLES[int(rng.integers(len(TEXTURE_STYLES)))],
        "colours": rng.uniform(0, 255, size=(2, 3)).astype(np.float32),
        "angle": rng.uniform(0, math.pi),
        "period": rng.uniform(4, 32),
        "cells": int(rng.integers(2, 17)),
        "octaves": int(rng.integers(1, 4)),
        "contrast": rng.uniform(0.3, 1.0),
        "crossing": rng.uniform(math.pi / 3, 2 * math.pi / 3),
        "aspect": rng.uniform(0.7, 1.4),
        "sharpness": rng.uniform(1.0, 6.0),
        "layout": LATTICE_LAYOUTS[int(rng.integers(len(LATTICE_LAYOUTS)))],
        "jitter": rng.uniform(0.0, 0.15),
    }


def _threads(
    size: tuple[int, int], angle: float, period: float, style: dict[str, object], rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """One set of parallel threads: a sharpened profile in ``[-1, 1]`` and the index of the thread at each pixel.

    The thread positions wander smoothly by up to about ``jitter`` periods; phase and wander are new per call.
    """
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    wander = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 4 * period)
    wander *= np.float32(float(style["jitter"]) * period / max(float(wander.std()), 1e-6))
    position = (xs * math.cos(angle) + ys * math.sin(angle) + wander) / np.float32(period) + np.float32(rng.random())
    sharpness = float(style["sharpness"])
    profile = np.tanh(sharpness * np.sin(2 * math.pi * position)) / math.tanh(sharpness)
    return profile.astype(np.float32), np.floor(position).astype(np.int64)


def _texture(style: dict[str, object], size: tuple[int, int], rng: np.random.Generator) -> UInt8Image:
    """Draw one realization of a texture process: the style is fixed, phases, grids and noise are new."""
    height, width = size
    kind = style["style"]
    if kind == "stripes":
        angle, period = float(style["angle"]), float(style["period"])
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        wobble = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), period) * period
        phase = (xs * math.cos(angle) + ys * math.sin(angle) + wobble) * np.float32(2 * math.pi / period)
        weight = 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * math.pi))
    elif kind == "blotches":
        cells = int(style["cells"])
        coarse = rng.random((cells, cells)).astype(np.float32)
        weight = np.clip(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    elif kind == "speckle":
        weight = rng.random((height, width), dtype=np.float32)
    elif kind == "lattice":
        angle, period = float(style["angle"]), float(style["period"])
        first, first_index = _threads(size, angle, period, style, rng)
        crossing_angle, crossing_period = angle + float(style["crossing"]), period * float(style["aspect"])
        second, second_index = _threads(size, crossing_angle, crossing_period, style, rng)
        if style["layout"] == "grid":
            combined = np.maximum(first, second)
        elif style["layout"] == "checks":
            combined = first * second
        else:
            combined = np.where((first_index + second_index) % 2 == 0, first, second)
        weight = 0.5 + 0.5 * combined
    else:
        weight = np.zeros((height, width), np.float32)
        for octave in range(int(style["octaves"])):
            cells = float(style["cells"]) * 2**octave
            weight += perlin_noise((height, width), (cells, cells), rng).astype(np.float32) / 2**octave
        weight = np.clip(0.5 + weight, 0, 1)
    contrast = np.float32(style["contrast"])
    weight = (0.5 + contrast * (weight - 0.5))[..., None]
    colours = style["colours"]
    return np.clip(np.rint(colours[0] + weight * (colours[1] - colours[0])), 0, 255).astype(np.uint8)


def _pattern(size: tuple[int, int], rng: np.random.Generator) -> UInt8Image:
    """Draw a procedural texture of a random style."""
    return _texture(_texture_style(rng), size, rng)


def _polygon_blob(size: tuple[int, int], rng: np.random.Generator) -> BoolMask:
    """Draw a star-shaped random polygon (a smooth random radius around the centre) filling most of ``size``."""
    height, width = size
    angles = np.linspace(0, 2 * math.pi, _POLYGON_VERTICES, endpoint=False)
    radius = np.ones_like(angles)
    for harmonic in range(1, 6):
        radius += rng.uniform(0, 0.6 / harmonic) * np.cos(harmonic * angles + rng.uniform(0, 2 * math.pi))
    radius = np.maximum(radius, 0.25 * radius.max()) / radius.max()
    xs = (width - 1) / 2 * (1 + radius * np.cos(angles))
    ys = (height - 1) / 2 * (1 + radius * np.sin(angles))
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(canvas, [np.rint(np.stack([xs, ys], axis=1)).astype(np.int32)], 1)
    return canvas.astype(bool)


def _segment(patch: UInt8Image, rng: np.random.Generator) -> BoolMask:
    """Cut an irregular segment out of ``patch``, following its edges where it has some.

    The segment is the largest connected component of one side of the Otsu threshold of the blurred grey levels
    inside a random polygon; if that is less than a quarter of the polygon, the polygon itself.
    """
    blob = _polygon_blob(patch.shape[:2], rng)
    if rng.random() < 0.25:
        return blob
    grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    sigma = 1.0 + min(patch.shape[:2]) / 48.0
    grey = cv2.GaussianBlur(grey, (0, 0), sigma)
    _, binary = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if rng.random() < 0.5:
        binary = 1 - binary
    binary &= blob.view(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count < 2:
        return blob
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[best, cv2.CC_STAT_AREA] < 0.25 * np.count_nonzero(blob):
        return blob
    return labels == best


def _enforce_change(clean: UInt8Image, altered: UInt8Image, mask: BoolMask, min_change: int) -> UInt8Image:
    """Compose ``altered`` inside ``mask`` over ``clean`` so that exactly the mask pixels differ by ``min_change``.

    Mask pixels changed by less are pushed along their own change; those that saturate are brightened (dark
    pixels) or darkened (bright pixels) by ``min_change`` in every channel instead.
    """
    result = clean.copy()
    ys, xs = np.nonzero(mask)
    before = clean[ys, xs].astype(np.float32)
    after = altered[ys, xs].astype(np.float32)
    change = after - before
    strength = np.abs(change).max(axis=1)
    weak = strength < min_change
    if weak.any():
        gain = min_change / np.maximum(strength[weak], 1.0)
        pushed = np.clip(np.rint(before[weak] + change[weak] * gain[:, None]), 0, 255)
        saturated = np.abs(pushed - before[weak]).max(axis=1) < min_change
        direction = np.where(before[weak].mean(axis=1, keepdims=True) < 127.5, 1.0, -1.0)
        shifted = np.clip(before[weak] + direction * min_change, 0, 255)
        after[weak] = np.where(saturated[:, None], shifted, pushed)
    result[ys, xs] = after.astype(np.uint8)
    return result


def _inpaint(image: UInt8Image, region: BoolMask, rng: np.random.Generator) -> UInt8Image:
    """Fill ``region`` by OpenCV inpainting (Telea or Navier-Stokes), working on the region's bounding box only."""
    ys, xs = np.nonzero(region)
    margin = 2 * _INPAINT_RADIUS + 2
    top, bottom = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, image.shape[0])
    left, right = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, image.shape[1])
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    window = np.ascontiguousarray(image[top:bottom, left:right])
    window_mask = np.ascontiguousarray(region[top:bottom, left:right]).view(np.uint8)
    result = image.copy()
    result[top:bottom, left:right] = cv2.inpaint(window, window_mask, _INPAINT_RADIUS, method)
    return result


class ChangePairDataset(Dataset):
    """Synthetic change pairs drawn from source images, deterministic in ``(seed, index)``.

    Args:
        images: Normal source images (``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``; uint8, uint16, bool or float
            in ``[0, 1]``), e.g. from :func:`offline_source_images` or :func:`load_source_images`.
        length: Number of pairs.
        seed: Non-negative seed; item ``i`` uses ``np.random.default_rng([seed, i])``.
        config: Synthesis settings; defaults to :class:`PairSynthesisConfig()`.
        anomaly_sources: Images whose crops fill local changes and pasted objects; ``None`` uses the other
            ``images`` (the same image when there is only one).

    Raises:
        ValueError: No image, an image of unsupported shape or dtype, a negative ``length`` or ``seed``.

    Example:
        >>> import numpy as np
        >>> image = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
        >>> dataset = ChangePairDataset([image], length=4, seed=0, config=PairSynthesisConfig(image_size=64))
        >>> pair, clean = dataset.synthesize(0, kind="appear")
        >>> changed = (pair.query.mul(255).round().byte().permute(1, 2, 0).numpy() != clean).any(-1)
        >>> bool((changed == pair.mask.bool().numpy()).all()), pair.kind
        (True, 'appear')
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        length: int,
        seed: int = 0,
        config: PairSynthesisConfig | None = None,
        anomaly_sources: Sequence[np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        if len(images) == 0:
            msg = "images is empty; pass at least one source image (e.g. offline_source_images())."
            raise ValueError(msg)
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            msg = f"length must be a non-negative integer, got {length!r}."
            raise ValueError(msg)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            msg = f"seed must be a non-negative integer, got {seed!r}."
            raise ValueError(msg)
        if anomaly_sources is not None and len(anomaly_sources) == 0:
            msg = "anomaly_sources is empty; pass None to use the other source images, or at least one image."
            raise ValueError(msg)
        self.images = [_to_rgb_uint8(image, f"images[{i}]") for i, image in enumerate(images)]
        self.anomaly_sources = (
            None
            if anomaly_sources is None
            else [_to_rgb_uint8(image, f"anomaly_sources[{i}]") for i, image in enumerate(anomaly_sources)]
        )
        self.length = length
        self.seed = seed
        self.config = config or PairSynthesisConfig()

    def __len__(self) -> int:
        """Return the number of pairs.

        Returns:
            ``length``.
        """
        return self.length

    def __getitem__(self, index: int) -> ChangePair:
        """Synthesize pair ``index``.

        Args:
            index: Item index in ``[0, length)``.

        Returns:
            The pair.
        """
        return self.synthesize(index)[0]

    def __getitems__(self, indices: Sequence[int]) -> list[ChangePair]:
        """Synthesize the pairs of one batch, on as many threads as torch uses.

        A ``DataLoader`` fetches whole batches through this method. Pairs are made while no training step runs, so the
        cores torch computes on are free; NumPy and OpenCV release the GIL in most of the work. Each pair depends on
        ``(seed, index)`` only, so the result is the same as one after the other. In ``DataLoader`` worker processes
        torch uses one thread and the pairs are made one after the other.

        Args:
            indices: Item indices in ``[0, length)``.

        Returns:
            The pairs, in the order of ``indices``.
        """
        threads = min(torch.get_num_threads(), len(indices))
        if threads <= 1:
            return [self[index] for index in indices]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.__getitem__, indices))

    def synthesize(self, index: int, kind: str | None = None) -> tuple[ChangePair, np.ndarray]:
        """Synthesize pair ``index`` and return it with the clean image the change was applied to.

        Args:
            index: Item index in ``[0, length)``.
            kind: Force this change kind (one of :data:`CHANGE_KINDS`) instead of drawing it.

        Returns:
            ``(pair, clean)``, where ``clean`` is the ``(S, S, 3)`` uint8 image such that
            ``(round(255 * pair.query) != clean).any(channel) == pair.mask``.

        Raises:
            IndexError: ``index`` out of range.
            ValueError: Unknown ``kind``.
        """
        if not 0 <= index < self.length:
            msg = f"Index {index} is out of range for a dataset of {self.length} pairs."
            raise IndexError(msg)
        if kind is not None and kind not in CHANGE_KINDS:
            msg = f"Unknown change kind {kind!r}; pass one of {', '.join(CHANGE_KINDS)} or None."
            raise ValueError(msg)
        config = self.config
        size = config.image_size
        rng = np.random.default_rng([self.seed, int(index)])
        base = int(rng.integers(len(self.images)))
        style = _texture_style(rng) if rng.random() < config.p_realization else None
        if style is None:
            crop = _random_crop(self.images[base], (size, size), config.crop_scale, rng)
        else:
            crop = _texture(style, (size, size), rng)
        draw = rng.random()
        drawn = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
        if draw < config.p_local:
            drawn = "local"
        elif draw >= config.p_local + config.p_object:
            drawn = "none"
        kind = kind or drawn
        clean, query, mask = self._change(crop, kind, base, rng)
        prompt = self._prompt(clean if style is None else _texture(style, (size, size), rng), rng)
        # Conversions stay in numpy: tiny torch operations are slow when the cores are shared with other processes.
        pair = ChangePair(
            prompt=torch.from_numpy(np.ascontiguousarray(prompt.transpose(2, 0, 1))),
            query=torch.from_numpy(np.ascontiguousarray(query.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)),
            mask=torch.from_numpy(mask.astype(np.float32)),
            kind=kind,
        )
        return pair, clean

    def _change(
        self,
        crop: UInt8Image,
        kind: str,
        base: int,
        rng: np.random.Generator,
    ) -> tuple[UInt8Image, UInt8Image, BoolMask]:
        """Return ``(clean, query, mask)`` for one change kind."""
        min_change = self.config.min_change
        if kind == "none":
            return crop, crop.copy(), np.zeros(crop.shape[:2], dtype=bool)
        if kind == "local":
            altered, mask = self._local(crop, base, rng)
        elif kind == "appear":
            altered, mask = self._paste(crop, base, rng)
        elif kind == "disappear" and rng.random() < self.config.p_disappear_restore:
            with_object, mask = self._paste(crop, base, rng)
            return _enforce_change(crop, with_object, mask, min_change), crop.copy(), mask
        else:
            region = self._own_segment(crop, rng)
            altered = _inpaint(crop, region, rng)
            mask = region
            if kind == "exchange":
                altered, pasted = self._paste(altered, base, rng, around=region)
                mask = region | pasted
        return crop, _enforce_change(crop, altered, mask, min_change), mask

    def _source(self, base: int, rng: np.random.Generator) -> UInt8Image:
        """Pick an anomaly source image: one of ``anomaly_sources``, or another of ``images``."""
        if self.anomaly_sources is not None:
            return self.anomaly_sources[int(rng.integers(len(self.anomaly_sources)))]
        if len(self.images) == 1:
            return self.images[0]
        other = int(rng.integers(len(self.images) - 1))
        return self.images[other + (other >= base)]

    def _content(self, size: tuple[int, int], base: int, rng: np.random.Generator) -> UInt8Image:
        """Draw the content of a change: a procedural pattern or a recoloured crop of an anomaly source."""
        if rng.random() < self.config.p_pattern:
            return _pattern(size, rng)
        return _recolour(_random_crop(self._source(base, rng), size, self.config.crop_scale, rng), rng)

    def _local(self, crop: UInt8Image, base: int, rng: np.random.Generator) -> tuple[UInt8Image, BoolMask]:
        """Blend an anomaly source into ``crop`` inside a Perlin mask."""
        config = self.config
        mask = perlin_mask(
            crop.shape[:2],
            rng,
            scale_exponents=config.perlin_scale_exponents,
            threshold=config.perlin_threshold,
            area=config.local_area,
        )
        content = self._content(crop.shape[:2], base, rng)
        beta = float(rng.uniform(*config.blend_beta))
        return cv2.addWeighted(content, 1.0 - beta, crop, beta, 0.0), mask

    def _box(self, rng: np.random.Generator) -> tuple[int, int]:
        """Draw the (height, width) of an object segment's box."""
        size = self.config.image_size
        low, high = self.config.object_size
        height, width = rng.uniform(low, high, size=2) * size
        return max(round(height), _MIN_SEGMENT), max(round(width), _MIN_SEGMENT)

    def _own_segment(self, crop: UInt8Image, rng: np.random.Generator) -> BoolMask:
        """Pick a segment of ``crop`` itself (an "object" of the clean image) at a random place."""
        size = crop.shape[0]
        height, width = self._box(rng)
        top = int(rng.integers(0, size - height + 1))
        left = int(rng.integers(0, size - width + 1))
        region = np.zeros((size, size), dtype=bool)
        region[top : top + height, left : left + width] = _segment(crop[top : top + height, left : left + width], rng)
        return region

    def _paste(
        self,
        image: UInt8Image,
        base: int,
        rng: np.random.Generator,
        around: BoolMask | None = None,
    ) -> tuple[UInt8Image, BoolMask]:
        """Paste a segment of an anomaly source into ``image``; centred on ``around``'s box if given."""
        size = image.shape[0]
        if around is None:
            height, width = self._box(rng)
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
        else:
            ys, xs = np.nonzero(around)
            scale = rng.uniform(0.8, 1.25, size=2)
            height = min(max(round((ys.max() - ys.min() + 1) * scale[0]), _MIN_SEGMENT), size)
            width = min(max(round((xs.max() - xs.min() + 1) * scale[1]), _MIN_SEGMENT), size)
            top = min(max(round((ys.min() + ys.max() - height) / 2), 0), size - height)
            left = min(max(round((xs.min() + xs.max() - width) / 2), 0), size - width)
        content = self._content((height, width), base, rng)
        segment = _segment(content, rng)
        result = image.copy()
        window = result[top : top + height, left : left + width]
        window[segment] = content[segment]
        mask = np.zeros((size, size), dtype=bool)
        mask[top : top + height, left : left + width] = segment
        return result, mask

    def _prompt(self, clean: UInt8Image, rng: np.random.Generator) -> npt.NDArray[np.float32]:
        """Warp ``clean`` by a random affine transform and jitter its brightness, contrast and saturation."""
        config = self.config
        size = clean.shape[0]
        angle = rng.uniform(-config.max_rotation, config.max_rotation)
        scale = rng.uniform(*config.scale_range)
        shift = rng.uniform(-config.max_translate, config.max_translate, size=2) * size
        matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
        matrix[:, 2] += shift
        warped = cv2.warpAffine(clean, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        brightness, contrast, saturation = rng.uniform(1 - config.color_jitter, 1 + config.color_jitter, size=3)
        warped = warped.astype(np.float32) * np.float32(brightness / 255.0)
        grey = cv2.cvtColor(warped, cv2.COLOR_RGB2GRAY)
        mean = float(grey.mean())
        # Contrast scales about the mean grey level, saturation about each pixel's grey level, in one pass.
        warped *= np.float32(contrast * saturation)
        warped += (grey * np.float32(contrast * (1.0 - saturation)) + np.float32(mean * (1.0 - contrast)))[..., None]
        return np.clip(warped, 0.0, 1.0).astype(np.float32, copy=False)
