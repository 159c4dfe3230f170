# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Independent one-prompt evaluation sets: nothing in them is made by the training synthesis or the demo generator.

No recipe choice of the offline MetaUAS may be tuned on these sets; they measure whether it generalises.

* ``textures``: four stochastic texture families drawn here and nowhere else (oriented band-pass noise, Voronoi
  cells, scattered spots, a jittered weave). Every image, prompt or query, is a *different realization* of its
  category's random process (never the same image shifted).
* ``materials``: a second texture set, added after the first showed that the offline recipe loses on its only
  periodic family (``weave``) and written before any model was run on it: knitted jersey (``knit``), a tartan twill
  (``plaid``), perforated sheet metal (``mesh``), all three periodic, and a nonwoven of scattered fibres
  (``fibres``). Every realization draws a new offset, a turn of up to 3 degrees and a smooth warp (and new yarn
  tension, noise or lighting), so prompt and query never align. Its defects are other kinds too
  (:data:`MATERIAL_DEFECT_KINDS`): a ragged ``hole`` showing the dark backing, a ``misweave`` (a thin band of the
  texture displaced along itself), a soft brownish ``stain``, a bright straight ``scratch``.
* ``objects``: four parts of the motorcycle of ``skimage.data.stereo_motorcycle`` (an image pair that neither the
  training sources nor the demo dataset use). Prompts are crops of the left view; queries are crops of the right
  view at the same scene point (shifted by the disparity), so prompt and query see the object from two cameras, with
  a small random offset, exposure and sensor-noise change.

Defective queries carry one small local defect, about 6 to 16 px across at 256 px (scratches and cracks up to 28 px
long). In ``textures`` and ``objects`` (:data:`DEFECT_KINDS`) it is a smooth ``dent`` (bright or dark), a thin
``crack`` (a random walk), a ``swap`` of the texture inside an ellipse by another family's texture, or a ``tint`` (a
colour shift). The masks are exact: every mask pixel differs from the clean query
by at least :data:`MIN_DELTA` grey levels in some channel, and nothing outside the mask changes.

Example:
    >>> from anomalib_uas.data.independent import independent_sets
    >>> sets = independent_sets(image_size=64, num_normal=2, num_defective=2, num_prompts=2)
    >>> sorted(sets), sorted(sets["materials"])
    (['materials', 'objects', 'textures'], ['fibres', 'knit', 'mesh', 'plaid'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFECT_KINDS",
    "MATERIAL_DEFECT_KINDS",
    "MATERIAL_FAMILIES",
    "MIN_DELTA",
    "OBJECT_PARTS",
    "TEXTURE_FAMILIES",
    "EvaluationCategory",
    "independent_sets",
]

UInt8Image = npt.NDArray[np.uint8]
BoolMask = npt.NDArray[np.bool_]
TextureFamily = Callable[[int, np.random.Generator], UInt8Image]

DEFECT_KINDS = ("dent", "crack", "swap", "tint")
MATERIAL_DEFECT_KINDS = ("hole", "misweave", "stain", "scratch")
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


TEXTURE_FAMILIES: dict[str, TextureFamily] = {
    "noise": _noise_texture,
    "cells": _cells_texture,
    "spots": _spots_texture,
    "weave": _weave_texture,
}
"""Texture categories: each call draws a new realization of the family's random process."""


def _warped_grid(size: int, rng: np.random.Generator, wander: float) -> tuple[npt.NDArray[np.float64], ...]:
    """Pixel coordinates at 256 px scale, randomly shifted, turned by up to 3 degrees and smoothly warped."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) * 256 / size
    angle = math.radians(rng.uniform(-3, 3))
    turned_x = xs * math.cos(angle) - ys * math.sin(angle) + rng.uniform(0, 256)
    turned_y = xs * math.sin(angle) + ys * math.cos(angle) + rng.uniform(0, 256)
    warp = [cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), size / 12) * wander * 12 for _ in range(2)]
    return turned_x + warp[0], turned_y + warp[1]


def _knit_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Columns of V-shaped stitches, 12 x 10 px, with per-stitch yarn tension (knitted jersey like)."""
    xs, ys = _warped_grid(size, rng, wander=1.5)
    width, height = 12.0, 10.0
    column, row = np.floor(xs / width), np.floor(ys / height)
    u, v = xs / width - column, ys / height - row
    half = np.where(u < 0.5, 2 * u, 2 * u - 1)
    slant = np.where(u < 0.5, 0.35, -0.35)
    centre = 0.5 + slant * (v - 0.5)
    yarn = np.exp(-((half - centre) ** 2) / (2 * 0.2**2)) * np.sin(np.pi * v) ** 0.5
    tension = rng.uniform(0.8, 1.0, (64, 64))[row.astype(np.int64) % 64, column.astype(np.int64) % 64]
    fuzz = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), 0.7) * 0.06
    return _colourise(np.clip(yarn * tension + fuzz, 0, 1), (35, 10, 15), (190, 60, 70))


_PLAID_SETT = ((0, 14), (1, 10), (0, 3), (2, 2), (0, 3), (1, 10), (0, 14), (3, 4))
_PLAID_COLOURS = np.array([(25, 35, 80), (30, 95, 55), (190, 40, 40), (220, 210, 150)], np.float64)


def _plaid_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """A fixed tartan sett woven as a 2/2 twill of 2 px threads (checked shirting like)."""
    xs, ys = _warped_grid(size, rng, wander=0.4)
    sett = np.concatenate([np.full(width, colour) for colour, width in _PLAID_SETT])
    warp_colour = _PLAID_COLOURS[sett[np.floor(xs).astype(np.int64) % len(sett)]]
    weft_colour = _PLAID_COLOURS[sett[np.floor(ys).astype(np.int64) % len(sett)]]
    thread_x, thread_y = np.floor(xs / 2).astype(np.int64), np.floor(ys / 2).astype(np.int64)
    warp_on_top = ((thread_x + thread_y) // 2) % 2 == 0
    shade = np.where(warp_on_top, np.sin(np.pi * (xs / 2 % 1)), np.sin(np.pi * (ys / 2 % 1))) ** 0.5
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour) * (0.7 + 0.3 * shade[..., None])
    colour += rng.normal(0, 4, colour.shape)
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)


def _mesh_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Round holes on a hexagonal lattice of pitch 15 px in brushed, unevenly lit metal (perforated sheet like)."""
    xs, ys = _warped_grid(size, rng, wander=0.3)
    pitch = 15.0
    row_step = pitch * math.sqrt(3)
    distance = np.minimum(
        np.hypot(xs % pitch - pitch / 2, ys % row_step - row_step / 2),
        np.hypot((xs + pitch / 2) % pitch - pitch / 2, (ys + row_step / 2) % row_step - row_step / 2),
    )
    metal = np.clip((distance - 0.3 * pitch) / 1.5, 0.0, 1.0)
    bevel = np.exp(-((distance - 0.3 * pitch - 1.5) ** 2) / 2.0) * 0.25
    brushed = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), sigmaX=size / 32, sigmaY=0.6) * 0.4
    angle = rng.uniform(0, 2 * math.pi)
    light = 0.8 + 0.2 * (np.cos(angle) * xs + np.sin(angle) * ys - 256) / 256
    return _colourise(np.clip(metal * (light + brushed) + bevel, 0, 1), (15, 15, 20), (200, 205, 210))


def _fibres_texture(size: int, rng: np.random.Generator) -> UInt8Image:
    """Short curved fibres scattered over a cloudy base (nonwoven or paper like)."""
    scale = size / 256
    base = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), size / 20) * 0.15
    canvas = np.zeros((size, size), np.float64)
    for _ in range(round(450 * scale**2)):
        start = rng.uniform(-10, size + 10, 2)
        heading = rng.uniform(0, 2 * math.pi)
        points = [start]
        for _ in range(5):
            heading += rng.normal(0, 0.35)
            points.append(points[-1] + rng.uniform(3, 7) * scale * np.array([math.cos(heading), math.sin(heading)]))
        line = np.rint(np.array(points)).astype(np.int32)
        cv2.polylines(canvas, [line], False, float(rng.uniform(0.2, 0.5)), 1, lineType=cv2.LINE_AA)
    return _colourise(_normalise(base - canvas), (120, 110, 95), (235, 230, 215))


MATERIAL_FAMILIES: dict[str, TextureFamily] = {
    "knit": _knit_texture,
    "plaid": _plaid_texture,
    "mesh": _mesh_texture,
    "fibres": _fibres_texture,
}
"""Categories of the second texture set: three periodic fabrics and sheets, one stochastic; new realizations."""


def _ellipse(size: int, rng: np.random.Generator, diameter: float) -> BoolMask:
    canvas = np.zeros((size, size), np.uint8)
    margin = int(diameter) + 4
    centre = (int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin)))
    axes = (max(1, round(diameter / 2)), max(1, round(diameter / 2 * rng.uniform(0.5, 1.0))))
    cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return canvas.astype(bool)


def _crack(size: int, rng: np.random.Generator, length: float, bend: float = 0.5) -> BoolMask:
    canvas = np.zeros((size, size), np.uint8)
    margin = int(length) + 4
    point = np.array([rng.integers(margin, size - margin), rng.integers(margin, size - margin)], np.float64)
    heading = rng.uniform(0, 2 * math.pi)
    points = [point.copy()]
    for _ in range(6):
        heading += rng.normal(0, bend)
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


def _blob(size: int, rng: np.random.Generator, diameter: float) -> BoolMask:
    """A disc with a ragged edge."""
    margin = int(diameter) + 4
    centre_y, centre_x = rng.integers(margin, size - margin, 2)
    grid_y, grid_x = np.mgrid[0:size, 0:size]
    radius = np.hypot(grid_y - centre_y, grid_x - centre_x) / (diameter / 2)
    ragged = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), max(1.0, diameter / 6)) * 1.5
    return radius + ragged < 1.0


def _band(size: int, rng: np.random.Generator, length: float, width: float) -> tuple[BoolMask, float]:
    """A thin rectangle along the rows or the columns, turned by up to 5 degrees; the mask and its angle."""
    canvas = np.zeros((size, size), np.uint8)
    margin = int(length) + 4
    centre = (float(rng.integers(margin, size - margin)), float(rng.integers(margin, size - margin)))
    angle = float(rng.choice([0.0, 90.0]) + rng.uniform(-5, 5))
    corners = cv2.boxPoints((centre, (length, width), angle))
    cv2.fillPoly(canvas, [np.rint(corners).astype(np.int32)], 1)
    return canvas.astype(bool), angle


def _material_defect(clean: UInt8Image, rng: np.random.Generator, kind: str) -> tuple[UInt8Image, BoolMask]:
    size = clean.shape[0]
    scale = size / 256
    image = clean.astype(np.float64)
    if kind == "hole":
        mask = _blob(size, rng, rng.uniform(6, 14) * scale)
        return _enforce(clean, image * 0.15 + 10, mask)
    if kind == "misweave":
        mask, angle = _band(size, rng, rng.uniform(12, 24) * scale, rng.uniform(3, 5) * scale)
        shift = max(1, round(rng.uniform(3, 7) * scale)) * (1 if rng.random() < 0.5 else -1)
        return _enforce(clean, np.roll(image, shift, axis=1 if abs(angle) < 45 else 0), mask)
    if kind == "stain":
        diameter = rng.uniform(8, 18) * scale
        margin = int(diameter) + 4
        centre_y, centre_x = rng.integers(margin, size - margin, 2)
        grid_y, grid_x = np.mgrid[0:size, 0:size]
        bump = np.exp(-((grid_y - centre_y) ** 2 + (grid_x - centre_x) ** 2) / (2 * (diameter / 3) ** 2))
        tint = 1 - rng.uniform(0.3, 0.5) * bump[..., None] * np.array([0.6, 0.8, 1.0])
        return _enforce(clean, image * tint, bump > 0.35)
    mask = _crack(size, rng, rng.uniform(14, 28) * scale, bend=0.1)
    return _enforce(clean, image * 0.3 + 0.7 * 235, mask)


def _defect(clean: UInt8Image, rng: np.random.Generator, kind: str) -> tuple[UInt8Image, BoolMask]:
    if kind in MATERIAL_DEFECT_KINDS:
        return _material_defect(clean, rng, kind)
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
    kinds: tuple[str, ...] = DEFECT_KINDS,
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
            query, mask = _defect(clean, rng, kinds[index % len(kinds)])
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
    """Build the ``textures``, ``materials`` and ``objects`` sets, deterministically in ``seed``.

    Args:
        image_size: Side of every image.
        num_prompts: Normal prompt candidates per category.
        num_normal: Normal queries per category.
        num_defective: Defective queries per category (the set's defect kinds in turn).
        seed: Seed of all draws.

    Returns:
        ``{"textures": {family: category}, "materials": {family: category}, "objects": {part: category}}``.
    """
    counts = (num_prompts, num_normal, num_defective)

    def texture_set(
        families: dict[str, TextureFamily], offset: int, kinds: tuple[str, ...]
    ) -> dict[str, EvaluationCategory]:
        return {
            name: _category(
                lambda rng, _role, family=family: family(image_size, rng),
                image_size,
                *counts,
                seed * 1000 + offset + index,
                kinds,
            )
            for index, (name, family) in enumerate(families.items())
        }

    textures = texture_set(TEXTURE_FAMILIES, 0, DEFECT_KINDS)
    materials = texture_set(MATERIAL_FAMILIES, 200, MATERIAL_DEFECT_KINDS)
    objects = {
        part: _category(
            lambda rng, role, part=part: _object_view(part, image_size, rng, "left" if role == "prompt" else "right"),
            image_size,
            *counts,
            seed * 1000 + 100 + index,
        )
        for index, part in enumerate(OBJECT_PARTS)
    }
    return {"textures": textures, "materials": materials, "objects": objects}
