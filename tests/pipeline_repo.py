# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""A temporary git + DVC repository holding this project's pipeline, for the `dvc repro` tests."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_command(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command to success and return its standard output."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(
    root: Path,
    tune: Callable[[dict[str, Any]], None],
    weights: dict[str, Path] | None = None,
) -> dict[str, str]:
    """Copy the pipeline into ``root``, tune its params, and commit it in a fresh git + DVC repository.

    Args:
        root: An empty folder.
        tune: Edits the parameters in place (tiny sizes and step counts).
        weights: Files to place under ``weights/``, by their path there.

    Returns:
        The environment to run `dvc` with: offline, an empty weights cache, no analytics, the default MLflow store.
    """
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("pipelines", "weights", "anomalib_uas"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for target, source in (weights or {}).items():
        (root / "weights" / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / "weights" / target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    tune(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI: without it the stages use the project's mlflow.db
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(UAS_OFFLINE="1", UAS_WEIGHTS_DIR=str(root / "empty-cache"), DVC_NO_ANALYTICS="1")
    run_command(["git", "init", "-q"], root, env)
    run_command(["dvc", "init", "-q"], root, env)
    run_command(["git", "add", "-A"], root, env)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root, env)
    return env


def served_predictions(command: list[str], images: list[Path], cwd: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Start ``uas serve`` (``command`` without ``--port``), send it the images in one request, stop it.

    Returns:
        The ``predictions`` of its 200 answer.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [*command, "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    rows = [[base64.b64encode(image.read_bytes()).decode()] for image in images]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = (response.status, json.loads(response.read()))
            except OSError:
                time.sleep(1)
        assert answer is not None, process.stdout.read().decode()[-3000:] if process.poll() is not None else "no answer"
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert answer[0] == 200
    return answer[1]["predictions"]
