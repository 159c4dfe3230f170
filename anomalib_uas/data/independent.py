# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Independent one-prompt evaluation sets: nothing in them is made by the training synthesis or the demo generator.

No recipe choice of the offline MetaUAS may be tuned on these sets; they measure whether it generalises.

* ``textures``: four stochastic texture families drawn here and nowhere else (oriented band-pass noise, Voronoi
  cells, scattered spots, a jittered weave). Every image, prompt or query, is a *different realization* of its
  category's random process (never the same image shifted).
* ``objects``: four parts of the motorcycle of ``skimage.data.stereo_motorcycle`` (an image pair that neither the
  training sources nor the demo dataset use). Prompts are crops of the left view; queries are crops of the right
  view at the same scene point (shifted by the disparity), so prompt and query see the object from two cameras, with
  a small random offset, exposure and sensor-noise change.

Defective queries carry one small local defect, about 6 to 16 px across at 256 px (:data:`DEFECT_KINDS`): a smooth
``dent`` (bright or dark), a thin ``crack`` (a random walk), a ``swap`` of the texture inside an ellipse by another
family's texture, or a ``tint`` (a colour shift). The masks are exact: every mask pixel differs from the clean query
by at least :data:`MIN_DELTA` grey levels in some channel, and nothing outside the mask changes.

Example:
    >>> from anomalib_uas.data.independent import independent_sets
    >>> sets = independent_sets(image_size=64, num_normal=2, num_defective=2, num_prompts=2)
    >>> sorted(sets), sorted(sets["textures"])
    (['objects', 'textures'], ['cells', 'noise', 'spots', 'weave'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["DEFECT_KINDS", "MIN_DELTA", "OBJECT_PARTS", "TEXTURE_FAMILIES", "EvaluationCategory", "independent_sets"]

UInt8Image = npt.NDArray[np.uint8]
BoolMask = npt.NDArray[np.bool_]

DEFECT_KINDS = ("dent", "crack", "swap", "tint")
MIN_DELTA = 12
OBJECT_PARTS: dict[str, tuple[int, int]] = {  # centre (x, y) in the left view of stereo_motorcycle
    "engine": (405, 295),
    "rear_wheel": (200, 330),
    "front_wheel": (600, 370),
    "headlight": (530, 160),
}
_OBJECT_CROP = 160


@dataclass(frozen=True)
class EvaluationCategory:
    """One category of an independent set.

    Attributes:
        prompts: Candidate normal prompts ``[P, S, S, 3]`` uint8 (a seed picks one).
        queries: Queries ``[Q, S, S, 3]`` uint8.
        masks: Defect masks ``[Q, S, S]`` bool (all false for normal queries).
        labels: ``[Q]`` int, 1 for defective queries.
    """

    prompts: UInt8Image
    queries: UInt8Image
    masks: BoolMask
    labels: npt.NDArray[np.int64]


def _normalise(field: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    low, high = np.percentile(field, [1, 99])
    return np.clip((field - low) / max(high - low, 1e-6), 0.0, 1.0)


def _colourise(field: npt.NDArray[np.float64], dark: tuple[int, ...], light: tuple[int, ...]) -> UInt8Image:
    dark_rgb, light_rgb = np.array(dark, np.float64), np.array(light, np.float64)
    return np.clip(np.rint(dark_rgb + field[..., None] * (light_rgb - dark_rgb)), 0, 255).astype(np.uint8)


def _noise_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Oriented band-pass Gaussian noise (wood or brushed-metal like)."""
    frequency_y = np.fft.fftfreq(size)[:, None]
    frequency_x = np.fft.fftfreq(size)[None, :]
    angle = 0.6
    along = frequency_x * math.cos(angle) + frequency_y * math.sin(angle)
    across = -frequency_x * math.sin(angle) + frequency_y * math.cos(angle)
    envelope = np.exp(-((np.abs(along) - 0.06) ** 2) / (2 * 0.02**2) - across**2 / (2 * 0.008**2))
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * envelope
    return _colourise(_normalise(np.real(np.fft.ifft2(spectrum))), (70, 45, 25), (200, 150, 100))


def _cells_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Voronoi cells with dark borders and a per-cell grey level (leather or cobblestone like)."""
    count = max(8, round(60 * (size / 256) ** 2))
    points = rng.uniform(0, size, (count, 2))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    distances = np.sqrt((xs[..., None] - points[:, 0]) ** 2 + (ys[..., None] - points[:, 1]) ** 2)
    nearest = np.sort(distances, axis=2)
    border = np.clip((nearest[..., 1] - nearest[..., 0]) / (3.0 * size / 256), 0.0, 1.0)
    shade = rng.uniform(0.55, 1.0, count)[np.argmin(distances, axis=2)]
    return _colourise(border * shade, (40, 40, 50), (170, 175, 190))


def _spots_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Scattered soft spots of random radius on a mottled background (speckled granite like)."""
    field = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), size / 40) * 0.3
    canvas = np.zeros((size, size), np.float64)
    for _ in range(round(140 * (size / 256) ** 2)):
        centre = (int(rng.integers(size)), int(rng.integers(size)))
        radius = max(1, round(rng.uniform(1.5, 5.0) * size / 256))
        cv2.circle(canvas, centre, radius, float(rng.uniform(0.6, 1.0)), -1, lineType=cv2.LINE_AA)
    return _colourise(_normalise(field + canvas), (150, 135, 120), (240, 235, 225))


def _weave_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Two crossing gratings whose phases wander smoothly (woven fabric like)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) * 256 / size
    wander = [cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), size / 16) * 40 for _ in range(2)]
    warp = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), size / 32) * 0.15
    threads = np.sin(2 * np.pi * xs / 9 + wander[0]) * np.sin(2 * np.pi * ys / 9 + wander[1]) + warp
    return _colourise(_normalise(threads), (30, 60, 110), (150, 180, 220))


TEXTURE_FAMILIES: dict[str, Callable[[int, np.random.Generator], UInt8Image]] = {
    "noise": _noise_texture,
    "cells": _cells_texture,
    "spots": _spots_texture,
    "weave": _weave_texture,
}
"""Texture categories: each call draws a new realization of the family's random process."""


def _ellipse(size: int, rng: np.random.Generator, diameter: float) -> BoolMask:
    canvas = np.zeros((size, size), np.uint8)
    margin = int(diameter) + 4
    centre = (int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin)))
    axes = (max(1, round(diameter / 2)), max(1, round(diameter / 2 * rng.uniform(0.5, 1.0))))
    cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return canvas.astype(bool)


def _crack(size: int, rng: np.random.Generator, length: float) -> BoolMask:
    canvas = np.zeros((size, size), np.uint8)
    margin = int(length) + 4
    point = np.array([rng.integers(margin, size - margin), rng.integers(margin, size - margin)], np.float64)
    heading = rng.uniform(0, 2 * math.pi)
    points = [point.copy()]
    for _ in range(6):
        heading += rng.normal(0, 0.5)
        point += length / 6 * np.array([math.cos(heading), math.sin(heading)])
        points.append(point.copy())
    thickness = max(1, round(size / 160))
    cv2.polylines(canvas, [np.rint(np.array(points)).astype(np.int32)], False, 1, thickness)
    return canvas.astype(bool)


def _enforce(clean: UInt8Image, altered: npt.NDArray[np.float64], mask: BoolMask) -> tuple[UInt8Image, BoolMask]:
    """Keep the alteration inside the mask only, pushing weak mask pixels to at least ``MIN_DELTA`` of change."""
    before = clean.astype(np.float64)
    change = np.where(mask[..., None], altered - before, 0.0)
    strength = np.abs(change).max(axis=2)
    weak = mask & (strength < MIN_DELTA)
    direction = np.where(before.mean(axis=2, keepdims=True) < 128, 1.0, -1.0)
    change[weak] = direction[weak] * MIN_DELTA
    return np.clip(np.rint(before + change), 0, 255).astype(np.uint8), mask


def _defect(clean: UInt8Image, rng: np.random.Generator, kind: str) -> tuple[UInt8Image, BoolMask]:
    size = clean.shape[0]
    scale = size / 256
    diameter = rng.uniform(6, 16) * scale
    image = clean.astype(np.float64)
    if kind == "crack":
        mask = _crack(size, rng, rng.uniform(10, 22) * scale)
        return _enforce(clean, image * rng.uniform(0.25, 0.5), mask)
    mask = _ellipse(size, rng, diameter)
    if kind == "dent":
        ys, xs = np.nonzero(mask)
        centre_y, centre_x = ys.mean(), xs.mean()
        grid_y, grid_x = np.mgrid[0:size, 0:size]
        bump = np.exp(-((grid_y - centre_y) ** 2 + (grid_x - centre_x) ** 2) / (2 * (diameter / 3) ** 2))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return _enforce(clean, image + sign * rng.uniform(35, 70) * bump[..., None], mask)
    if kind == "swap":
        family = list(TEXTURE_FAMILIES.values())[int(rng.integers(len(TEXTURE_FAMILIES)))]
        return _enforce(clean, family(size, rng).astype(np.float64), mask)
    shift = rng.uniform(-60, 60, 3)
    return _enforce(clean, image + shift, mask)


@cache
def _stereo() -> tuple[UInt8Image, UInt8Image, npt.NDArray[np.float32]]:
    import skimage.data

    left, right, disparity = skimage.data.stereo_motorcycle()
    return left, right, disparity


def _object_view(part: str, size: int, rng: np.random.Generator, view: str) -> UInt8Image:
    left, right, disparity = _stereo()
    centre_x, centre_y = OBJECT_PARTS[part]
    half = _OBJECT_CROP // 2
    jitter = rng.integers(-6, 7, size=2)
    top, left_x = centre_y - half + int(jitter[1]), centre_x - half + int(jitter[0])
    image = left
    if view == "right":
        window = disparity[top : top + _OBJECT_CROP, left_x : left_x + _OBJECT_CROP]
        shift = float(np.median(window[np.isfinite(window)]))
        left_x = round(left_x - shift)
        image = right
    crop = image[top : top + _OBJECT_CROP, left_x : left_x + _OBJECT_CROP].astype(np.float64)
    crop = 255.0 * (crop / 255.0) ** rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1)
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    crop += rng.normal(0, 2.0, crop.shape)
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


def _category(
    draw: Callable[[np.random.Generator, str], UInt8Image],
    size: int,
    num_prompts: int,
    num_normal: int,
    num_defective: int,
    seed: int,
) -> EvaluationCategory:
    rng = np.random.default_rng(seed)
    prompts = np.stack([draw(rng, "prompt") for _ in range(num_prompts)])
    queries, masks = [], []
    for index in range(num_normal + num_defective):
        clean = draw(rng, "query")
        if index < num_normal:
            queries.append(clean)
            masks.append(np.zeros((size, size), bool))
        else:
            query, mask = _defect(clean, rng, DEFECT_KINDS[index % len(DEFECT_KINDS)])
            queries.append(query)
            masks.append(mask)
    labels = np.array([0] * num_normal + [1] * num_defective, np.int64)
    return EvaluationCategory(prompts=prompts, queries=np.stack(queries), masks=np.stack(masks), labels=labels)


def independent_sets(
    image_size: int = 256,
    num_prompts: int = 5,
    num_normal: int = 16,
    num_defective: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, EvaluationCategory]]:
    """Build the ``textures`` and ``objects`` sets, deterministically in ``seed``.

    Args:
        image_size: Side of every image.
        num_prompts: Normal prompt candidates per category.
        num_normal: Normal queries per category.
        num_defective: Defective queries per category (the defect kinds in turn).
        seed: Seed of all draws.

    Returns:
        ``{"textures": {family: category}, "objects": {part: category}}``.
    """
    textures = {
        name: _category(
            lambda rng, _role, family=family: family(image_size, rng),
            image_size,
            num_prompts,
            num_normal,
            num_defective,
            seed * 1000 + index,
        )
        for index, (name, family) in enumerate(TEXTURE_FAMILIES.items())
    }
    objects = {
        part: _category(
            lambda rng, role, part=part: _object_view(part, image_size, rng, "left" if role == "prompt" else "right"),
            image_size,
            num_prompts,
            num_normal,
            num_defective,
            seed * 1000 + 100 + index,
        )
        for index, part in enumerate(OBJECT_PARTS)
    }
    return {"textures": textures, "objects": objects}
