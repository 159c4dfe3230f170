# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The bounds of a served request, and the error a request gets when it crosses one.

Every bound is named in the answer a refused request gets, together with the ``uas serve`` option that sets it.

Example:
    >>> from anomalib_uas.serving.limits import Limits
    >>> Limits(max_rows=4).max_rows
    4
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BODY_GRACE_S",
    "DEFAULT_MAX_BODY_MB",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_MEGAPIXELS",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MIN_BODY_KB_PER_S",
    "DEFAULT_TIMEOUT_S",
    "MAX_ASPECT",
    "MAX_PROMPTS",
    "BadRequest",
    "Limits",
]

DEFAULT_MAX_BODY_MB = 64.0
DEFAULT_MAX_ROWS = 16
DEFAULT_MAX_MEGAPIXELS = 40.0
DEFAULT_MAX_IN_FLIGHT = 8
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_BODY_GRACE_S = 5.0
DEFAULT_MIN_BODY_KB_PER_S = 16.0
MAX_ASPECT = 20.0
MAX_PROMPTS = 8


class BadRequest(ValueError):  # noqa: N818 (named for the HTTP answer it becomes)
    """A request the server refuses: the HTTP status and a message naming the problem and the fix.

    Args:
        message: What is wrong and what to send instead.
        status: HTTP status (400, 413, ...).
        code: Machine-readable error code.
    """

    def __init__(self, message: str, status: int = 400, code: str = "INVALID_PARAMETER_VALUE") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Limits:
    """Bounds on the work of one request and on the server's concurrent work.

    Args:
        max_body_bytes: Largest request body (HTTP 413 beyond it).
        max_rows: Most rows per request (HTTP 413); ``None`` for in-process and Spark scoring.
        max_megapixels: Most megapixels per request, summed over query and prompt images (HTTP 413); every
            single image is also held to this bound.
        max_aspect: Largest ratio of an image's long to short side (HTTP 400).
        max_in_flight: Requests handled at once; one more gets HTTP 503 with ``Retry-After``.
        timeout_s: Seconds a request may take; beyond it the answer is HTTP 504 and its work stops.
        image_root: Folder under which REST requests may name images by ``image_path``; ``None`` refuses them.
        body_grace_s: Seconds a request body may take before ``min_body_rate`` applies.
        min_body_rate: Bytes per second a body must keep arriving at after ``body_grace_s``: by ``t`` seconds
            after its request started, at least ``min_body_rate * (t - body_grace_s)`` bytes (HTTP 408).
    """

    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1_000_000)
    max_rows: int | None = DEFAULT_MAX_ROWS
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_aspect: float = MAX_ASPECT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    timeout_s: float = DEFAULT_TIMEOUT_S
    image_root: Path | None = None
    body_grace_s: float = DEFAULT_BODY_GRACE_S
    min_body_rate: float = DEFAULT_MIN_BODY_KB_PER_S * 1000

    def __post_init__(self) -> None:
        """Refuse bounds that would refuse everything or nothing.

        Raises:
            ValueError: A bound that is not a finite positive number.
        """
        bounds = {
            "max_body_bytes": self.max_body_bytes,
            "max_rows": self.max_rows,
            "max_megapixels": self.max_megapixels,
            "max_aspect": self.max_aspect,
            "max_in_flight": self.max_in_flight,
            "timeout_s": self.timeout_s,
            "body_grace_s": self.body_grace_s,
            "min_body_rate": self.min_body_rate,
        }
        for name, value in bounds.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                msg = f"Limits.{name} must be a finite number above 0, got {value}."
                raise ValueError(msg)

    @property
    def max_buffered_bytes(self) -> int:
        """Bytes of request bodies still arriving that the server holds at once (HTTP 503 beyond it).

        Returns:
            ``max_in_flight`` bodies of ``max_body_bytes``.
        """
        return self.max_in_flight * self.max_body_bytes

    @property
    def max_pixels(self) -> int:
        """Pixels per request.

        Returns:
            ``max_megapixels`` in pixels.
        """
        return int(self.max_megapixels * 1_000_000)
