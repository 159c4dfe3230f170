# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Seeded 2-D Perlin noise and the thresholded Perlin masks of local-region changes.

:func:`perlin_noise` evaluates gradient noise on a lattice of random unit gradients at every pixel, optionally in a
rotated frame, with the quintic fade ``6t^5 - 15t^4 + 10t^3``. :func:`perlin_mask` draws the lattice resolution
per axis as a power of two, a rotation and thresholds the noise, as in DRAEM-style anomaly synthesis; it can also
bound the fraction of the image the mask covers. All randomness comes from the generator passed in.

Example:
    >>> import numpy as np
    >>> from anomalib_uas.synthesis import perlin_mask, perlin_noise
    >>> noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    >>> noise.shape, noise.dtype
    ((64, 64), dtype('float32'))
    >>> mask = perlin_mask((64, 64), np.random.default_rng(0), area=(0.01, 0.5))
    >>> bool(0.01 <= mask.mean() <= 0.5)
    True
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["perlin_mask", "perlin_noise"]

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def _fade(t: FloatArray) -> FloatArray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int],
    resolution: tuple[float, float],
    rng: np.random.Generator,
    angle: float = 0.0,
) -> FloatArray:
    """Evaluate 2-D Perlin noise with random gradients at every pixel.

    Args:
        shape: ``(height, width)`` of the output.
        resolution: Number of lattice cells ``(along y, along x)`` spanning the image; larger gives finer noise.
        rng: Generator of the lattice gradients.
        angle: Rotation of the noise pattern, in degrees.

    Returns:
        ``(height, width)`` float32 noise in about ``[-0.71, 0.71]``, zero on lattice points.

    Raises:
        ValueError: A non-positive ``shape`` or ``resolution``.
    """
    height, width = (int(side) for side in shape)
    if height < 1 or width < 1:
        msg = f"shape must be positive, got {shape}; pass (height, width) of at least (1, 1)."
        raise ValueError(msg)
    res_y, res_x = (float(value) for value in resolution)
    if not (res_y > 0 and res_x > 0):
        msg = f"resolution must be positive, got {resolution}; pass (cells along y, cells along x) > 0."
        raise ValueError(msg)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ys = (np.arange(height, dtype=np.float32) + 0.5 - height / 2)[:, None]
    xs = (np.arange(width, dtype=np.float32) + 0.5 - width / 2)[None, :]
    # Lattice coordinates of every pixel in the rotated frame, shifted to start at cell (0, 0).
    u = (cos * xs - sin * ys) * np.float32(res_x / width)
    v = (sin * xs + cos * ys) * np.float32(res_y / height)
    u -= np.floor(u.min())
    v -= np.floor(v.min())
    floor_x = np.floor(u)
    floor_y = np.floor(v)
    fx = u - floor_x
    fy = v - floor_y
    cell_x = floor_x.astype(np.int32)
    cell_y = floor_y.astype(np.int32)
    columns = int(cell_x.max()) + 2
    rows = int(cell_y.max()) + 2
    theta = rng.uniform(0.0, 2.0 * math.pi, size=rows * columns)
    grad_x = np.cos(theta).astype(np.float32)
    grad_y = np.sin(theta).astype(np.float32)
    index = cell_y * columns + cell_x

    def corner(offset_y: int, offset_x: int) -> FloatArray:
        at = index + (offset_y * columns + offset_x)
        return np.take(grad_x, at) * (fx - offset_x) + np.take(grad_y, at) * (fy - offset_y)

    weight_x = _fade(fx)
    weight_y = _fade(fy)
    top_left, top_right = corner(0, 0), corner(0, 1)
    bottom_left, bottom_right = corner(1, 0), corner(1, 1)
    top = top_left + weight_x * (top_right - top_left)
    bottom = bottom_left + weight_x * (bottom_right - bottom_left)
    return (top + weight_y * (bottom - top)).astype(np.float32, copy=False)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale_exponents: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
    max_angle: float = 90.0,
    area: tuple[float, float] | None = None,
) -> BoolArray:
    """Draw a thresholded Perlin-noise mask.

    The lattice has ``2**k`` cells along each axis, with ``k`` drawn independently per axis from
    ``[scale_exponents[0], scale_exponents[1])``; the pattern is rotated by an angle drawn from
    ``[-max_angle, max_angle]`` and the mask is ``noise > threshold``. When ``area`` is given and the mask covers
    less than ``area[0]`` or more than ``area[1]`` of the pixels, the threshold is moved to the noise level that
    meets that bound, so the result is never empty for ``area[0] > 0``.

    Args:
        shape: ``(height, width)`` of the mask.
        rng: Generator of all random draws.
        scale_exponents: Half-open range of the lattice exponents.
        threshold: Noise level above which a pixel is in the mask.
        max_angle: Largest rotation, in degrees.
        area: Optional ``(min, max)`` fraction of the pixels the mask covers, with ``0 <= min <= max <= 1``.

    Returns:
        ``(height, width)`` boolean mask.

    Raises:
        ValueError: An empty or negative ``scale_exponents`` range, or an invalid ``area``.
    """
    low, high = scale_exponents
    if not 0 <= low < high:
        msg = f"scale_exponents must satisfy 0 <= low < high, got {scale_exponents}; e.g. use (0, 6)."
        raise ValueError(msg)
    if area is not None and not 0.0 <= area[0] <= area[1] <= 1.0:
        msg = f"area must satisfy 0 <= min <= max <= 1, got {area}; e.g. use (0.005, 0.4)."
        raise ValueError(msg)
    resolution = (2.0 ** int(rng.integers(low, high)), 2.0 ** int(rng.integers(low, high)))
    angle = float(rng.uniform(-max_angle, max_angle))
    noise = perlin_noise(shape, resolution, rng, angle)
    mask = noise > threshold
    if area is None:
        return mask
    values = noise.ravel()
    count = int(np.count_nonzero(mask))
    fewest = math.ceil(area[0] * values.size)
    most = math.floor(area[1] * values.size)
    if count < fewest:
        # Keep the ``fewest`` highest noise values (and any ties).
        return noise >= np.partition(values, values.size - fewest)[values.size - fewest]
    if count > most:
        # Drop everything up to the ``size - most`` lowest noise values (and any ties).
        return noise > np.partition(values, values.size - most - 1)[values.size - most - 1]
    return mask
