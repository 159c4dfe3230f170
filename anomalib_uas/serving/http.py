# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""REST serving of a registered model, bounded: MLflow's endpoints and payloads, answered by a guarded ASGI app.

:func:`serve` answers ``POST /invocations`` (``dataframe_split`` or ``dataframe_records`` JSON, ``params``),
``GET /ping``, ``/health`` and ``/version`` like ``mlflow models serve``, with every request bounded
(:class:`~anomalib_uas.serving.limits.Limits`):

* a body is read whole before its request takes one of ``max_in_flight`` slots, so slow clients hold none;
  one more request gets 503 with ``Retry-After`` (before its body is sent when the slots are busy scoring);
* bodies still arriving hold at most ``max_in_flight * max_body_bytes`` bytes together (503 with
  ``Retry-After`` beyond it), and each must keep arriving at ``min_body_rate`` after ``body_grace_s`` and whole
  within ``timeout_s`` (408, and its connection is closed);
* bodies over ``max_body_bytes`` get 413 before they are read whole (declared or streamed), and so do bodies with
  more JSON structure than ``max_rows`` rows need, counted as they arrive, before any parsing;
* rows and megapixels per request are bounded (413), images by format and aspect ratio (400), JSON numbers to
  ``MAX_NUMBER_CHARS`` characters (400);
* a request that outlives ``timeout_s`` gets 504, and its work stops when it or its client gives up;
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
import functools
import json
import logging
import socket
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
MAX_NUMBER_CHARS = 100
# JSON structure (the bytes [ { ,) bounds the number of values json.loads builds, and is counted as the body
# arrives. A row needs at most 13: its list or object, two commas between its three cells, the prompt list with
# seven commas between eight prompts, the comma before the next row and its "index" entry (pandas' split orient);
# base64 holds none. Allowed: 32 per row (room for the comma of a data URI per image and for a longer prompt list,
# both refused later with their own message) plus 1024 for the rest (keys, params, commas in image paths).
STRUCTURE = b"[{,"
STRUCTURE_PER_ROW = 32
STRUCTURE_SLACK = 1024
# 503: come back soon; 408: a slow client's connection is closed, not kept waiting for the rest of its body
HEADERS = {503: [(b"retry-after", b"1")], 408: [(b"connection", b"close")]}


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


def _number(kind: type[int | float], text: str) -> int | float:
    """A JSON number, refused before its conversion when longer than any payload needs (images are strings)."""
    if len(text) > MAX_NUMBER_CHARS:
        msg = (
            f"The body holds a number of {len(text)} characters; numbers of at most {MAX_NUMBER_CHARS} are accepted. "
            "Send images as base64 strings in the dataframe_split format."
        )
        raise BadRequest(msg)
    return kind(text)


def _parse(body: bytes | bytearray) -> tuple[list[dict[str, Any]], str]:
    try:
        payload = json.loads(
            body, parse_int=functools.partial(_number, int), parse_float=functools.partial(_number, float)
        )
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
        self.arriving = 0  # bytes of request bodies still arriving
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
        try:
            self._check_free_slot()  # the slots are busy scoring: refused before the body is sent
            _check_content_type(headers)
            body = await self._body(headers, receive)
            if body is None:  # the client went away
                return
            self._check_free_slot()
        except BadRequest as exc:
            await _error(send, exc.status, exc.code, exc.message, HEADERS.get(exc.status))
            return
        self.in_flight += 1  # no await since the check: the slot is this request's
        try:
            await self._score(body, receive, send)
        finally:
            self.in_flight -= 1

    def _check_free_slot(self) -> None:
        if self.in_flight >= self.limits.max_in_flight:
            msg = (
                f"The server is handling {self.limits.max_in_flight} requests, its limit (uas serve --max-in-flight); "
                "retry after a second."
            )
            raise BadRequest(msg, status=503, code="TEMPORARILY_UNAVAILABLE")

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytearray | None:
        """The whole body, read before the request takes a slot, within the body bounds.

        Raises:
            BadRequest: 413 for a body over the size or structure bound, 408 for one that arrives too slowly,
                503 while the bodies still arriving hold their bound of memory.
        """
        _check_declared_size(headers, self.limits.max_body_bytes)
        body, structure, start = bytearray(), 0, asyncio.get_running_loop().time()
        try:
            while True:
                message = await self._chunk(receive, start, len(body))
                if message["type"] != "http.request":
                    return None
                chunk = message.get("body", b"")
                structure += sum(map(chunk.count, STRUCTURE))
                self._check_body(len(body) + len(chunk), structure)
                self._hold(len(chunk))
                body += chunk
                if not message.get("more_body", False):
                    return body
        finally:
            self.arriving -= len(body)

    async def _chunk(self, receive: Receive, start: float, received: int) -> Message:
        """The next message of a body, if it comes before the body falls behind its deadlines.

        Raises:
            BadRequest: 408 naming the deadline the body missed.
        """
        limits, now = self.limits, asyncio.get_running_loop().time()
        by_rate = start + limits.body_grace_s + received / limits.min_body_rate
        try:
            return await asyncio.wait_for(receive(), min(by_rate, start + limits.timeout_s) - now)
        except asyncio.TimeoutError as exc:
            if by_rate < start + limits.timeout_s:
                msg = (
                    f"The request body arrived slower than {limits.min_body_rate / 1000:g} kB/s after its first "
                    f"{limits.body_grace_s:g} s (uas serve --min-body-rate, --body-grace). Send the body at once."
                )
            else:
                msg = f"The request body did not arrive within {limits.timeout_s:g} s (uas serve --timeout)."
            raise BadRequest(msg, status=408, code="REQUEST_TIMEOUT") from exc

    def _hold(self, size: int) -> None:
        """Count ``size`` more bytes of bodies still arriving, within their bound.

        Raises:
            BadRequest: 503 beyond ``max_buffered_bytes``.
        """
        if self.arriving + size > self.limits.max_buffered_bytes:
            msg = (
                f"The server holds {self.arriving} bytes of request bodies still arriving, its limit "
                "(uas serve --max-in-flight times --max-body-mb); retry after a second."
            )
            raise BadRequest(msg, status=503, code="TEMPORARILY_UNAVAILABLE")
        self.arriving += size

    def _check_body(self, size: int, structure: int) -> None:
        """Refuse a body over the size bound, or with more JSON structure than the row bound needs.

        Raises:
            BadRequest: 413 naming the bound.
        """
        limit, rows = self.limits.max_body_bytes, self.limits.max_rows
        if size > limit:
            msg = (
                f"The request body has more than {limit} bytes, the limit (uas serve --max-body-mb). Send fewer or "
                "smaller images per request."
            )
            raise BadRequest(msg, status=413, code="REQUEST_TOO_LARGE")
        if rows is not None and structure > rows * STRUCTURE_PER_ROW + STRUCTURE_SLACK:
            msg = (
                f"The request body holds more JSON brackets, braces and commas than {rows} rows need; at most {rows} "
                "rows are accepted per request (uas serve --max-rows). Split it into smaller requests."
            )
            raise BadRequest(msg, status=413, code="REQUEST_TOO_LARGE")

    def _work(self, body: bytearray, cancel: threading.Event) -> list[dict[str, Any]]:
        rows, map_format = _parse(body)
        images = RequestImages(
            self.limits, self.model.min_side, self.limits.image_root, trusted=False, decoder=self.decoder
        )
        return self.model.score(rows, map_format, images, cancel)

    async def _score(self, body: bytearray, receive: Receive, send: Send) -> None:
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


def _check_content_type(headers: dict[bytes, bytes]) -> None:
    if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != b"application/json":
        msg = "Send the request as JSON (Content-Type: application/json) in the dataframe_split format."
        raise BadRequest(msg, status=415, code="UNSUPPORTED_MEDIA_TYPE")


def _check_declared_size(headers: dict[bytes, bytes], limit: int) -> None:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        msg = (
            f"The request body has {int(declared)} bytes; at most {limit} are accepted (uas serve --max-body-mb). "
            "Send fewer or smaller images per request."
        )
        raise BadRequest(msg, status=413, code="REQUEST_TOO_LARGE")


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


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, for uvicorn to listen on once the model has loaded.

    Raises:
        ValueError: The address cannot be bound (in use, no interface of this machine, a privileged port).
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        msg = f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Choose another --port or --host."
        raise ValueError(msg) from exc
    return listener


def _load(model_uri: str) -> UASPyfuncModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except MlflowException as exc:
        msg = (
            f"Cannot load {model_uri} from {mlflow.get_tracking_uri()}: {exc.message.rstrip('.')}. Register it "
            "first (the evaluate stage with registry.register), or set MLFLOW_TRACKING_URI to the store holding it."
        )
        raise ValueError(msg) from exc


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5055, limits: Limits | None = None) -> None:
    """Serve a registered model over REST until interrupted (``/invocations``, ``/ping``, ``/health``, ``/version``).

    Args:
        model_uri: MLflow model URI, e.g. ``models:/anomalib-uas-brick@champion``.
        host: Interface to listen on.
        port: Port.
        limits: Request bounds (defaults: :class:`Limits`).

    Raises:
        ValueError: The address cannot be bound (checked before the model loads), or no such registered model in
            the tracking store.
    """
    import mlflow
    import uvicorn

    with _bind(host, port) as listener:
        app = ScoringApp(_load(model_uri), limits or Limits(), mlflow.__version__)
        logger.info("Serving %s on http://%s:%d/invocations", model_uri, host, port)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
