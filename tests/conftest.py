# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the parity fixtures folder and a deterministic CPU setup."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

# FiftyOne reads its configuration at import: a private database for the test session, no tracking. The
# acceptance tests work on the user's own database (tests/test_acceptance.py), recorded here. pytest-xdist's
# workers inherit the session's private database from the process that starts them.
if "UAS_TEST_FIFTYONE_DATABASE_DIR" not in os.environ:
    if "FIFTYONE_DATABASE_DIR" in os.environ:
        os.environ.setdefault("UAS_USER_FIFTYONE_DATABASE_DIR", os.environ["FIFTYONE_DATABASE_DIR"])
    os.environ["UAS_TEST_FIFTYONE_DATABASE_DIR"] = tempfile.mkdtemp(prefix="uas-fiftyone-")
os.environ["FIFTYONE_DATABASE_DIR"] = os.environ["UAS_TEST_FIFTYONE_DATABASE_DIR"]
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The modules whose tests start or use a FiftyOne database (or need none to be running). A FiftyOne process attaches
# to any database service its user runs, so under pytest-xdist (`-n 2 --dist loadgroup`, scripts/test.sh) they run
# one after another on one worker; every other module is a group of its own (its module fixtures built once).
DATABASE_MODULES = {
    "test_acceptance",
    "test_errors",
    "test_feedback",
    "test_pipeline",
    "test_pipeline_clip",
    "test_pipeline_fullsize",
    "test_predict",
    "test_review",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the tests for pytest-xdist: :data:`DATABASE_MODULES` together, every other module by itself.

    Args:
        items: The collected tests.
    """
    for item in items:
        if item.module is not None:
            name = item.module.__name__
            item.add_marker(pytest.mark.xdist_group("database" if name in DATABASE_MODULES else name))


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = Path(os.environ.get("UAS_PARITY_DIR", REPO.parent / "shared" / "parity"))
    if not (path / "weights.py").is_file():
        pytest.fail(f"Parity fixtures not found at {path}; set UAS_PARITY_DIR to the shared/parity folder.")
    return path


@pytest.fixture(scope="session")
def parity_weights(parity_dir: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("parity_weights", parity_dir / "weights.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity_weights"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated MVTec-layout dataset (64 px, two categories)."""
    from anomalib_uas.data import DEMO_CATEGORIES, generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(
        root, categories=DEMO_CATEGORIES[:2], image_size=64, num_train=4, num_test_good=2, num_test_defect=2, seed=0
    )


@pytest.fixture(scope="session")
def demo_category() -> str:
    from anomalib_uas.data import DEMO_CATEGORIES

    return DEMO_CATEGORIES[0]
