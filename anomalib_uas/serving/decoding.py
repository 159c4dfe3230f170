# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The images of one request: bytes or base64 text, decoded within the request's pixel budget and path policy.

A request's images (queries and prompts) share one pixel budget (:attr:`Limits.max_pixels`), charged from each
image's header before its pixels are decoded. Images are decoded reduced to about twice the model's input size
(:func:`~anomalib_uas.data.images.decode_image`). ``image_path`` is read only where the caller allows it: anywhere
for trusted callers (in-process and Spark scoring, where the budget holds per row), only under the serving image
root for REST requests; every refused path gets the same answer, so a client learns nothing about the server's
files.

Example:
    >>> from anomalib_uas.serving.decoding import RequestImages
    >>> images = RequestImages(Limits(), min_side=256, image_root=None, trusted=False)  # doctest: +SKIP
    >>> tensor = images.decode(png_bytes, "image")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
from concurrent.futures import Executor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from anomalib_uas.data.images import IMAGE_FORMATS, decode_image
from anomalib_uas.serving.limits import BadRequest, Limits

__all__ = ["RequestImages", "image_bytes"]

_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\r\n]+")


def image_bytes(data: bytes | str) -> bytes:
    """The encoded image of a cell: raw bytes, or base64 text (REST JSON, and lists MLflow leaves undecoded).

    Args:
        data: The cell value.

    Returns:
        The encoded image bytes (undecodable text is returned as it is, for the decoder to name the problem).
    """
    raw = data.encode("ascii", errors="replace") if isinstance(data, str) else bytes(data)
    if _BASE64_TEXT.fullmatch(raw[:64]):  # image files start with bytes outside the base64 alphabet
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(raw, validate=True)
    return raw


class RequestImages:
    """Decode the images of one request.

    Args:
        limits: The request bounds (pixel budget, aspect ratio, body size for files).
        min_side: The model's input side; images are decoded reduced while at least twice this.
        image_root: Folder under which ``image_path`` may point (REST), or ``None``.
        trusted: An in-process or Spark caller: ``image_path`` is read wherever it points and the pixel budget
            holds per row, not per request.
        decoder: Shared by the requests of a server: the few threads that decode images (so at most that many
            are decoded at once, and the memory the C allocator keeps after a large image stays with those
            threads instead of growing in every request thread); ``None`` decodes in the calling thread.
    """

    def __init__(
        self,
        limits: Limits,
        min_side: int,
        image_root: Path | None,
        trusted: bool,
        decoder: Executor | None = None,
    ) -> None:
        self.limits = limits
        self.decoder = decoder
        self.min_side = min_side
        self.image_root = image_root.resolve() if image_root is not None else None
        self.trusted = trusted
        self.pixels = 0

    def start_row(self) -> None:
        """Start the next row (a trusted caller's budget starts afresh)."""
        if self.trusted:
            self.pixels = 0

    def decode(self, data: bytes | str, name: str) -> torch.Tensor:
        """Decode an image cell, charging its pixels to the request.

        Args:
            data: Encoded image bytes or base64 text.
            name: What the image is in the request (``"image"``, ``"prompt image 2"``), for messages.

        Returns:
            ``[3, H, W]`` float tensor in ``[0, 1]``.

        Raises:
            BadRequest: Undecodable data, a format outside the allow-list, or a bound crossed.
        """
        raw = image_bytes(data)
        self._charge(raw)
        try:
            if self.decoder is None:
                return decode_image(raw, max_aspect=self.limits.max_aspect, min_side=self.min_side)
            return self.decoder.submit(decode_image, raw, None, self.limits.max_aspect, self.min_side).result()
        except ValueError as exc:
            msg = f"{name}: {exc}"
            raise BadRequest(msg) from exc

    def read(self, path: str) -> torch.Tensor:
        """Read an image named by ``image_path``, as the caller's path policy allows.

        Args:
            path: The path as sent.

        Returns:
            ``[3, H, W]`` float tensor in ``[0, 1]``.

        Raises:
            BadRequest: The path is refused (one answer for every reason), or its file is not a valid image.
        """
        data = self._allowed_bytes(path)
        if data is None:
            if self.trusted:
                msg = f"image_path {path} is not a readable image file."
            elif self.image_root is None:
                msg = "image_path is not accepted by this server: send the image itself in the 'image' column."
            else:
                msg = "image_path must name an image file under the server's image root; send the image instead."
            raise BadRequest(msg)
        return self.decode(data, "image_path")

    def _allowed_bytes(self, path: str) -> bytes | None:
        """The file's bytes, or ``None`` for a path the policy refuses or that names no readable file."""
        if not self.trusted and self.image_root is None:
            return None
        try:
            file = Path(path) if self.trusted else (self.image_root / path).resolve()
            if not self.trusted and not file.is_relative_to(self.image_root):
                return None
            if file.is_file() and (self.trusted or file.stat().st_size <= self.limits.max_body_bytes):
                return file.read_bytes()
        except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte; RuntimeError: a symlink loop
            return None
        return None

    def _charge(self, raw: bytes) -> None:
        try:
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return  # not an image: decoding names the problem
        self.pixels += width * height
        if self.pixels > self.limits.max_pixels and self.trusted:
            msg = (
                f"The images of this row hold more than {self.limits.max_megapixels:g} megapixels, the limit per row "
                "in process (uas predict --max-megapixels). Downscale the image or raise the limit."
            )
            raise BadRequest(msg, status=413, code="REQUEST_TOO_LARGE")
        if self.pixels > self.limits.max_pixels:
            msg = (
                f"The images of this request hold more than {self.limits.max_megapixels:g} megapixels, the limit per "
                "request (uas serve --max-megapixels). Send fewer or smaller images per request."
            )
            raise BadRequest(msg, status=413, code="REQUEST_TOO_LARGE")
