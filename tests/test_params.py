# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""params.yaml schema: every bad value is one line naming the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from anomalib_uas.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def _error(path: Path) -> str:
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    return str(caught.value)


def _write(tmp_path: Path, edit: Any) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_the_project_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.models == ["metauas", "inctrl", "faprompt", "nearest_patch"]
    assert params.evaluate.prompt_strategy == "random"
    assert params.registry.register_models is True
    assert params.as_dict()["registry"]["register"] is True


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("evaluate", "k_shot", "two", "evaluate.k_shot = 'two' is not allowed"),
        ("evaluate", "k_shot", 1.5, "evaluate.k_shot = 1.5 is not allowed"),
        ("evaluate", "k_shot", 9, "less than or equal to 8"),
        ("evaluate", "prompt_strategy", "pol", "'random', 'retrieval' or 'pool'"),
        ("data", "dataset", "mvtecad", "'demo', 'mvtec', 'visa' or 'folder'"),
        ("registry", "champion_metric", "pixel_aupro", "'pixel_AUPRO'"),
        ("evaluate", "image_size", 250, "multiple of 32"),
        ("evaluate", "image_size", 4096, "less than or equal to 1024"),
        ("data", "image_size", 4096, "less than or equal to 1024"),
        ("data", "categories", [], "at least 1 item"),
        ("data", "categories", ["brick", "brick"], "must not repeat"),
        ("data", "categories", ["../etc"], "data.categories.0"),
        ("models_config", "faprompt", {"image_size": 500}, "multiple of 14"),
        ("calibrate", "target_fpr", 0.0, "greater than 0"),
        ("calibrate", "confidence", 1.0, "less than 1"),
        ("data", "train_normals", 0, "greater than or equal to 1"),
    ],
)
def test_bad_values_name_key_value_and_allowed(
    tmp_path: Path, section: str, key: str, value: Any, expected: str
) -> None:
    path = _write(tmp_path, lambda p: p[section].__setitem__(key, value))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message
    assert message.startswith(f"{path}: {section}.{key}")


def test_unknown_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda p: p["evaluate"].__setitem__("k_shots", 2))
    message = _error(path)
    assert "unknown key evaluate.k_shots" in message
    assert "k_shot" in message.split("allowed:")[1]


def test_the_old_target_fpr_key_names_its_new_section(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda p: p["evaluate"].__setitem__("target_fpr", 0.05))
    message = _error(path)
    assert "target_fpr moved to its own section" in message
    assert "calibrate: {target_fpr" in message


def test_the_old_prompt_source_key_names_its_new_name(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda p: p["evaluate"].__setitem__("prompt_source", "datasets/pool"))
    message = _error(path)
    assert "\n" not in message
    assert "prompt_source was renamed: write evaluate.few_shot_source" in message


def test_pool_needs_its_few_shot_source(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda p: p["evaluate"].__setitem__("prompt_strategy", "pool"))
    assert "set evaluate.few_shot_source" in _error(path)
    path = _write(tmp_path, lambda p: p["evaluate"].update(prompt_strategy="pool", few_shot_source="datasets/pool"))
    assert load_params(path).evaluate.few_shot_source == "datasets/pool"


def test_missing_section_says_what_to_add(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda p: p.pop("evaluate"))
    assert _error(path) == (f"{path}: evaluate is missing: add it (see the comments in params.yaml and the README)")


def test_weights_needed_for_every_model(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda p: p["weights"].pop("inctrl"))
    assert "add weights.inctrl" in _error(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data: [unclosed\n", "is not valid YAML at line 2"),
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping of sections"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    message = _error(path)
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.yaml")


def test_synthesis_settings_are_the_synthesis_config_fields() -> None:
    from dataclasses import fields

    from anomalib_uas.params import PairSynthesis
    from anomalib_uas.synthesis import PairSynthesisConfig

    assert set(PairSynthesis.model_fields) == {field.name for field in fields(PairSynthesisConfig)} - {"image_size"}
