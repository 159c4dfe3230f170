# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""dvc.yaml lists as a stage's deps exactly the project modules the stage's command imports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from import_graph import REPO, project_imports

from anomalib_uas.params import load_params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
MODELS = load_params(REPO / "params.yaml").models
CODE = ("anomalib_uas", "pipelines")


def _spec_lookups(models: list[str]) -> dict[str, set[str]]:
    """``get_spec(name)`` imports ``anomalib_uas.models.<name>.spec`` by name: the edges the source does not show."""
    return {"anomalib_uas.models": {f"anomalib_uas.models.{model}.spec" for model in models}}


def _resolve(text: str, model: str | None) -> str:
    paths = DVC["vars"][0]["path"]
    text = re.sub(r"\$\{path\.(\w+)\}", lambda match: paths[match.group(1)], text)
    return text.replace("${item.model}", model or "")


def _instances() -> list[tuple[str, str | None]]:
    return [
        (name, model) for name, stage in DVC["stages"].items() for model in (MODELS if "matrix" in stage else [None])
    ]


def _code_deps(stage: dict, model: str | None) -> list[Path]:
    deps = [_resolve(dep, model) for dep in stage["deps"]]
    return [REPO / dep for dep in deps if dep.split("/")[0] in CODE]


def _covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


@pytest.mark.parametrize(("name", "model"), _instances())
def test_every_imported_module_is_a_dep(name: str, model: str | None) -> None:
    stage = DVC["stages"][name]
    script = REPO / _resolve(stage["cmd"], model).split()[1]
    imported = project_imports(script, extra=_spec_lookups([model] if model else MODELS))
    deps = _code_deps(stage, model)
    missing = sorted(str(path.relative_to(REPO)) for path in imported if not _covered(path, deps))
    assert not missing, f"{name}@{model} imports modules dvc.yaml does not list as its deps: {missing}"


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_every_code_dep_is_imported(name: str) -> None:
    stage = DVC["stages"][name]
    models = MODELS if "matrix" in stage else [None]
    for dep_text in stage["deps"]:
        if dep_text.split("/")[0] not in CODE:
            continue
        used = False
        for model in models:
            dep = REPO / _resolve(dep_text, model)
            script = REPO / _resolve(stage["cmd"], model).split()[1]
            imported = project_imports(script, extra=_spec_lookups([model] if model else MODELS))
            used = used or any(_covered(path, [dep]) for path in imported)
        assert used, f"{name} lists {dep_text} as a dep but imports nothing in it"


def test_review_and_report_code_rerun_only_their_stage() -> None:
    users = {}
    for name, model in _instances():
        stage = DVC["stages"][name]
        deps = _code_deps(stage, model)
        for module in ("anomalib_uas/review.py", "anomalib_uas/stages/review.py", "anomalib_uas/report.py"):
            if _covered(REPO / module, deps):
                users.setdefault(module, set()).add(name)
    assert users == {
        "anomalib_uas/review.py": {"review", "feedback"},  # feedback reads FiftyOne through review.py; it always runs
        "anomalib_uas/stages/review.py": {"review"},
        "anomalib_uas/report.py": {"report"},
    }


def test_data_paths_are_declared_once_under_vars() -> None:
    for name, stage in DVC["stages"].items():
        entries = [dep for dep in stage["deps"] if dep.split("/")[0] not in CODE]
        for kind in ("outs", "metrics", "plots"):
            entries += [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(kind, [])]
        literal = [entry for entry in entries if not entry.startswith("${path.")]
        assert not literal, f"{name} names data paths outside vars.path: {literal}"
        outs = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage["outs"]]
        assert all(out in stage["cmd"] for out in outs), f"{name}'s command is not given all its outputs"


@pytest.mark.parametrize(("name", "model"), [instance for instance in _instances() if instance[1] is not None])
def test_every_path_dep_of_a_model_stage_is_in_a_fresh_clone(name: str, model: str) -> None:
    """DVC refuses a stage whose dep is missing: each model's folders (e.g. ``weights/<model>``) are tracked by git."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    produced = {
        _resolve(out, model)
        for stage in DVC["stages"].values()
        for key in ("outs", "metrics", "plots")
        for item in stage.get(key, [])
        for out in (item if isinstance(item, dict) else {item: None})
    }
    for dep in (_resolve(dep, model) for dep in DVC["stages"][name]["deps"]):
        if any(dep == out or dep.startswith(out.rstrip("/") + "/") for out in produced):
            continue  # made by a stage
        assert any(path == dep or path.startswith(dep.rstrip("/") + "/") for path in tracked), (
            f"{name}@{model} depends on {dep}, which a fresh clone does not have"
        )


def test_bytecode_caches_are_not_part_of_a_code_dep() -> None:
    """Any import writes ``__pycache__/*.pyc`` into the package: hashed, it would rerun stages after `uas serve`."""
    from dvc.repo import Repo

    ignore = Repo(str(REPO)).dvcignore
    for folder in ("anomalib_uas/serving", "anomalib_uas/models", "anomalib_uas/models/components"):
        assert ignore.is_ignored_dir(str(REPO / folder / "__pycache__"))
        assert ignore.is_ignored_file(str(REPO / folder / "http.cpython-311.pyc"))
