# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""REST serving of a registered model: MLflow's scoring server behind a request-body limit.

``mlflow models serve`` reads every request body into memory before the model sees it, so one huge body can
exhaust the server's memory. :func:`serve` runs the same scoring app (same endpoints, payloads and answers) behind
:class:`BodyLimit`, which answers HTTP 413 to bodies over the limit, declared or streamed, without buffering more
than the limit.

Example:
    >>> from anomalib_uas.server import serve
    >>> serve("models:/anomalib-uas-brick@champion", port=5055)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_MB", "BodyLimit", "serve"]

DEFAULT_MAX_BODY_MB = 64.0

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware that refuses request bodies larger than ``max_bytes`` with HTTP 413.

    A declared ``Content-Length`` over the limit is refused before any byte is read; a streamed (chunked) body is
    buffered up to the limit and refused as soon as it exceeds it.

    Args:
        app: The wrapped ASGI application.
        max_bytes: Largest accepted body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Pass requests within the limit on to the app.

        Args:
            scope: ASGI connection scope.
            receive: ASGI receive channel.
            send: ASGI send channel.
        """
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int) -> None:
        body = json.dumps(
            {
                "error_code": "REQUEST_TOO_LARGE",
                "message": (
                    f"The request body has {'more than ' if size > self.max_bytes else ''}{size} bytes; at most "
                    f"{self.max_bytes} are accepted. Send fewer or smaller images per request."
                ),
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5055, max_body_mb: float = DEFAULT_MAX_BODY_MB) -> None:
    """Serve a registered model over REST until interrupted (``/invocations``, ``/ping``, ``/health``, ``/version``).

    Args:
        model_uri: MLflow model URI, e.g. ``models:/anomalib-uas-brick@champion``.
        host: Interface to listen on.
        port: Port.
        max_body_mb: Largest accepted request body in MB (10^6 bytes).
    """
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    app = BodyLimit(scoring_server.init(model), int(max_body_mb * 1_000_000))
    logger.info("Serving %s on http://%s:%d/invocations", model_uri, host, port)
    uvicorn.run(app, host=host, port=port, workers=1)
