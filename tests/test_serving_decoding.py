# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Decoding of request images: the format allow-list, range scaling, reduced decoding and the header bounds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_uas.data.images import decode_image, read_image
from anomalib_uas.serving.decoding import RequestImages
from anomalib_uas.serving.limits import BadRequest, Limits


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_allowed_formats_decode(fmt: str) -> None:
    image = Image.fromarray(np.full((16, 24, 3), 200, np.uint8))
    decoded = decode_image(_encoded(image, fmt))
    assert decoded.shape == (3, 16, 24)
    np.testing.assert_allclose(decoded.numpy(), 200 / 255, atol=0.02)


def test_other_formats_are_refused_without_running_their_decoders(tmp_path: Path) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    gif = _encoded(Image.new("L", (8, 8)), "GIF")
    for data in (eps, gif):
        with pytest.raises(ValueError, match="accepted format \\(PNG, JPEG, BMP, TIFF, WEBP\\)"):
            decode_image(data)
    (tmp_path / "image.gif").write_bytes(gif)
    with pytest.raises(ValueError, match="PNG, JPEG"):
        read_image(tmp_path / "image.gif")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0.0, 127.5, 255.0]]), [0.0, 0.5, 1.0]),  # 8-bit range as floats
        (np.array([[0.0, 0.25, 1.0]]), [0.0, 0.25, 1.0]),  # already in [0, 1]
        (np.array([[0.0, 32767.5, 65535.0]]), [0.0, 0.5, 1.0]),  # 16-bit range as floats
        (np.array([[-2.0, 0.0, 2.0]]), [0.0, 0.5, 1.0]),  # anything else: its own minimum and maximum
    ],
)
def test_float_images_are_scaled_by_their_range(values: np.ndarray, expected: list[float]) -> None:
    data = _encoded(Image.fromarray(values.astype(np.float32), mode="F"), "TIFF")
    decoded = decode_image(data)
    np.testing.assert_allclose(decoded[0, 0].numpy(), expected, atol=1e-6)


def test_non_finite_float_images_are_refused() -> None:
    data = _encoded(Image.fromarray(np.array([[0.0, np.nan]], np.float32), mode="F"), "TIFF")
    with pytest.raises(ValueError, match="NaN"):
        decode_image(data)


def test_sixteen_bit_images_keep_their_range_when_reduced() -> None:
    data = _encoded(Image.fromarray(np.full((512, 512), 13107, np.uint16)), "PNG")
    decoded = decode_image(data, min_side=64)
    assert decoded.shape == (3, 128, 128)  # reduced by 4 while the short side stays at least 2 * 64
    np.testing.assert_allclose(decoded.numpy(), 0.2, atol=1e-6)


def test_large_jpeg_is_decoded_reduced() -> None:
    rng = np.random.default_rng(0)
    data = _encoded(Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)), "JPEG")
    decoded = decode_image(data, min_side=100)
    assert 200 <= min(decoded.shape[1:]) < 400
    assert decoded.shape[2] / decoded.shape[1] == pytest.approx(4 / 3, rel=0.01)
    assert decode_image(data).shape == (3, 3000, 4000)


def test_header_bounds_refuse_before_decoding() -> None:
    data = _encoded(Image.new("L", (3000, 100)), "PNG")
    with pytest.raises(ValueError, match="at most 20 times the short side"):
        decode_image(data, max_aspect=20)
    with pytest.raises(ValueError, match="at most 100000 pixels"):
        decode_image(data, max_pixels=100_000)


def test_request_pixel_budget_is_shared_by_its_images() -> None:
    data = _encoded(Image.new("RGB", (500, 500)), "PNG")  # 0.25 MP
    images = RequestImages(Limits(max_megapixels=0.6), min_side=64, image_root=None, trusted=False)
    images.decode(data, "image")
    images.decode(data, "prompt image 0")
    with pytest.raises(BadRequest, match=r"more than 0\.6 megapixels") as refused:
        images.decode(data, "prompt image 1")
    assert refused.value.status == 413
    trusted = RequestImages(Limits(max_megapixels=0.6), min_side=64, image_root=None, trusted=True)
    for _ in range(4):  # in process and Spark the budget holds per row
        trusted.start_row()
        trusted.decode(data, "image")


def test_refused_paths_get_the_one_answer_not_an_exception(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    served = RequestImages(Limits(), min_side=64, image_root=tmp_path, trusted=False)
    for path in ("good.png\x00.txt", "loop", "loop/image.png"):  # a NUL byte (ValueError), a link loop (RuntimeError)
        with pytest.raises(BadRequest, match="under the server's image root") as refused:
            served.read(path)
        assert refused.value.status == 400
    trusted = RequestImages(Limits(max_rows=None), min_side=64, image_root=None, trusted=True)
    for path in ("good.png\x00.txt", str(tmp_path / "loop")):
        with pytest.raises(BadRequest, match="is not a readable image file"):
            trusted.read(path)
