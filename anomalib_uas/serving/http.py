# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""REST serving of a registered model, bounded: MLflow's endpoints and payloads, answered by a guarded ASGI app.

:func:`serve` answers ``POST /invocations`` (``dataframe_split`` or ``dataframe_records`` JSON, ``params``),
``GET /ping``, ``/health`` and ``/version`` like ``mlflow models serve``, with every request bounded
(:class:`~anomalib_uas.serving.limits.Limits`):

* at most ``max_in_flight`` requests are handled at once; one more gets 503 with ``Retry-After`` before its body
  is read, so memory stays bounded at any number of clients;
* bodies over ``max_body_bytes`` get 413 before they are read whole (declared or streamed);
* rows and megapixels per request are bounded (413), images by format and aspect ratio (400);
* a body that does not arrive within ``timeout_s`` gets 408; a request that outlives it gets 504, and its work
  stops when it or its client gives up;
* ``image_path`` is read only under ``image_root``.

Every refused request gets a 4xx JSON ``{"error_code", "message"}`` naming the problem and the fix, never a stack
trace or a server path; an unexpected failure is logged and answered 500 without details.

Example:
    >>> from anomalib_uas.serving.http import serve
    >>> serve("models:/anomalib-uas-brick@champion", port=5055)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from anomalib_uas.serving.decoding import RequestImages
from anomalib_uas.serving.limits import BadRequest, Limits
from anomalib_uas.serving.pyfunc import COLUMNS, Cancelled, UASPyfuncModel

logger = logging.getLogger(__name__)

__all__ = ["ScoringApp", "serve"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Scope = MutableMapping[str, Any]
FORMATS = ("dataframe_split", "dataframe_records")
DECODE_THREADS = 2  # images decoded at once, whatever the number of requests: the peak of decoding memory


def _rows(payload: Any) -> tuple[list[dict[str, Any]], str]:
    """The rows and ``map_format`` of a parsed ``/invocations`` payload."""
    if not isinstance(payload, dict) or sum(key in payload for key in FORMATS) != 1:
        msg = 'Send a JSON object with one of "dataframe_split" or "dataframe_records" (and optionally "params").'
        raise BadRequest(msg)
    params = payload.get("params") or {}
    map_format = params.get("map_format", "png") if isinstance(params, dict) else None
    if not isinstance(map_format, str):
        msg = '"params" must be an object like {"map_format": "png"}.'
        raise BadRequest(msg)
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        columns = split.get("columns") if isinstance(split, dict) else None
        data = split.get("data") if isinstance(split, dict) else None
        if not isinstance(columns, list) or not isinstance(data, list) or not all(isinstance(r, list) for r in data):
            msg = '"dataframe_split" needs "columns" (a list of names) and "data" (a list of rows, each a list).'
            raise BadRequest(msg)
        if any(len(row) != len(columns) for row in data):
            msg = f'Every row of "data" needs one value per column ({len(columns)}).'
            raise BadRequest(msg)
        rows = [dict(zip(columns, row, strict=True)) for row in data]
        names = set(columns)
    else:
        rows = payload["dataframe_records"]
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            msg = '"dataframe_records" must be a list of objects, one per row.'
            raise BadRequest(msg)
        names = {name for row in rows for name in row}
    if not all(isinstance(name, str) for name in names) or names - set(COLUMNS):
        msg = f"Unknown columns; a row may have {', '.join(COLUMNS)}."
        raise BadRequest(msg)
    for row in rows:
        for name in ("image", "image_path"):
            if row.get(name) is not None and not isinstance(row[name], str):
                msg = f'"{name}" must be a string (base64 image data for "image").'
                raise BadRequest(msg)
        prompts = row.get("prompt_images")
        if prompts is not None and not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            msg = '"prompt_images" must be a list of base64-encoded images.'
            raise BadRequest(msg)
    return rows, map_format


def _parse(body: bytes) -> tuple[list[dict[str, Any]], str]:
    try:
        payload = json.loads(body)
    except RecursionError as exc:
        msg = "The JSON is nested too deeply; send the dataframe_split format."
        raise BadRequest(msg) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = f": {exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else " UTF-8"
        msg = f"The body is not valid JSON{detail}. Send the dataframe_split format."
        raise BadRequest(msg) from exc
    return _rows(payload)


class ScoringApp:
    """ASGI app answering MLflow's scoring endpoints for one loaded pyfunc, within :class:`Limits`.

    Args:
        model: The loaded pyfunc (``PyFuncModel.unwrap_python_model()``).
        limits: The bounds.
        version: Text answered on ``/version``.
    """

    def __init__(self, model: UASPyfuncModel, limits: Limits, version: str) -> None:
        self.model = model
        self.limits = limits
        self.version = version
        self.in_flight = 0
        # work of given-up requests runs on until its next row or forward, so there are threads for both
        self.executor = concurrent.futures.ThreadPoolExecutor(2 * limits.max_in_flight, thread_name_prefix="uas")
        self.decoder = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="uas-decode")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route a request.

        Args:
            scope: ASGI connection scope.
            receive: ASGI receive channel.
            send: ASGI send channel.
        """
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route in {("GET", "/ping"), ("GET", "/health")}:
            await _answer(send, 200, b"\n", b"application/json")
        elif route == ("GET", "/version"):
            await _answer(send, 200, self.version.encode(), b"text/plain")
        elif route == ("POST", "/invocations"):
            await self._invocations(scope, receive, send)
        else:
            await _error(send, 404, "NOT_FOUND", "Use POST /invocations, GET /ping, /health or /version.")

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        if self.in_flight >= self.limits.max_in_flight:
            message = (
                f"The server is handling {self.limits.max_in_flight} requests, its limit (uas serve "
                "--max-in-flight); retry after a second."
            )
            await _error(send, 503, "TEMPORARILY_UNAVAILABLE", message, [(b"retry-after", b"1")])
            return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            message = "Send the request as JSON (Content-Type: application/json) in the dataframe_split format."
            await _error(send, 415, "UNSUPPORTED_MEDIA_TYPE", message)
            return
        self.in_flight += 1
        try:
            body = await asyncio.wait_for(self._body(headers, receive, send), self.limits.timeout_s)
            if body is not None:
                await self._score(body, receive, send)
        except asyncio.TimeoutError:  # a body that does not arrive must not hold its place in flight
            message = f"The request body did not arrive within {self.limits.timeout_s:g} s (uas serve --timeout)."
            await _error(send, 408, "REQUEST_TIMEOUT", message)
        finally:
            self.in_flight -= 1

    async def _body(self, headers: dict[bytes, bytes], receive: Receive, send: Send) -> bytes | None:
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            message = (
                f"The request body has {int(declared)} bytes; at most {limit} are accepted (uas serve --max-body-mb). "
                "Send fewer or smaller images per request."
            )
            await _error(send, 413, "REQUEST_TOO_LARGE", message)
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                message = (
                    f"The request body has more than {limit} bytes, the limit (uas serve --max-body-mb). Send fewer "
                    "or smaller images per request."
                )
                await _error(send, 413, "REQUEST_TOO_LARGE", message)
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _work(self, body: bytes, cancel: threading.Event) -> list[dict[str, Any]]:
        rows, map_format = _parse(body)
        images = RequestImages(
            self.limits, self.model.min_side, self.limits.image_root, trusted=False, decoder=self.decoder
        )
        return self.model.score(rows, map_format, images, cancel)

    async def _score(self, body: bytes, receive: Receive, send: Send) -> None:
        cancel = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(self.executor, self._work, body, cancel)
        left = asyncio.ensure_future(_disconnected(receive))
        done, _ = await asyncio.wait({work, left}, timeout=self.limits.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if work not in done:
            cancel.set()  # the work stops at its next row or forward
            work.add_done_callback(lambda task: task.exception())  # retrieved: nobody waits for it any more
            if left in done:
                return
            message = (
                f"The request took more than {self.limits.timeout_s:g} s, the limit (uas serve --timeout); its work "
                "was stopped. Send fewer images per request."
            )
            await _error(send, 504, "TIMEOUT", message)
            return
        try:
            predictions = work.result()
        except BadRequest as exc:
            await _error(send, exc.status, exc.code, exc.message)
            return
        except Cancelled:
            return
        except Exception:
            logger.exception("Scoring failed")
            await _error(send, 500, "INTERNAL_ERROR", "The server failed to score this request; see its log.")
            return
        await _answer(send, 200, json.dumps({"predictions": predictions}).encode(), b"application/json")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send: Send, status: int, body: bytes, content_type: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, code: str, message: str, extra: list | None = None) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await _answer(send, status, body, b"application/json", extra)


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5055, limits: Limits | None = None) -> None:
    """Serve a registered model over REST until interrupted (``/invocations``, ``/ping``, ``/health``, ``/version``).

    Args:
        model_uri: MLflow model URI, e.g. ``models:/anomalib-uas-brick@champion``.
        host: Interface to listen on.
        port: Port.
        limits: Request bounds (defaults: :class:`Limits`).

    Raises:
        ValueError: No such registered model in the tracking store.
    """
    import mlflow
    import uvicorn
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except MlflowException as exc:
        msg = (
            f"Cannot load {model_uri} from {mlflow.get_tracking_uri()}: {exc.message.rstrip('.')}. Register it "
            "first (the evaluate stage with registry.register), or set MLFLOW_TRACKING_URI to the store holding it."
        )
        raise ValueError(msg) from exc
    app = ScoringApp(model, limits or Limits(), mlflow.__version__)
    logger.info("Serving %s on http://%s:%d/invocations", model_uri, host, port)
    uvicorn.run(app, host=host, port=port, workers=1, log_level="warning")
