# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The dataset check before an evaluation: empty normal folders, hidden and unreadable files are one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_uas.stages import StageError, evaluate
from anomalib_uas.stages.dataset_check import check_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _category(root: Path, name: str = "brick") -> Path:
    folder = root / name
    for index in range(3):
        _png(folder / "train" / "good" / f"{index:03d}.png", index)
    _png(folder / "test" / "good" / "000.png", 10)
    _png(folder / "test" / "crack" / "000.png", 11)
    _png(folder / "ground_truth" / "crack" / "000_mask.png", 12)
    return folder


def test_a_complete_category_passes(tmp_path: Path) -> None:
    _category(tmp_path)
    check_dataset(tmp_path, ["brick"])


def test_an_empty_test_good_is_refused_naming_the_folder(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    (folder / "test" / "good" / "000.png").unlink()
    with pytest.raises(StageError, match=r"brick/test/good holds no image.*normal_test_dir"):
        check_dataset(tmp_path, ["brick"])


def test_an_apple_double_file_is_refused_with_the_command_that_removes_it(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    (folder / "test" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    with pytest.raises(StageError, match=r"\._000\.png is a hidden file.*-name '\._\*' -delete"):
        check_dataset(tmp_path, ["brick"])


def test_a_truncated_png_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    image = folder / "test" / "crack" / "000.png"
    image.write_bytes(image.read_bytes()[:-200])
    with pytest.raises(StageError, match=r"crack/000\.png is not a readable image"):
        check_dataset(tmp_path, ["brick"])


def test_the_evaluate_stage_answers_a_truncated_test_image_in_one_line_and_keeps_its_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _category(tmp_path / "dataset")
    image = folder / "test" / "good" / "000.png"
    image.write_bytes(image.read_bytes()[:100])
    params = Path(__file__).parents[1] / "params.yaml"
    text = params.read_text().replace("categories: [brick, grass, gravel, tissue]", "categories: [brick]")
    assert text != params.read_text(), "params.yaml's demo categories moved: update this test"
    (tmp_path / "params.yaml").write_text(text)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text("{}")
    argv = ["metauas", "--params", str(tmp_path / "params.yaml"), "--dataset", str(tmp_path / "dataset")]
    argv += ["--checkpoints", str(tmp_path / "none"), "--predictions", str(tmp_path / "predictions")]
    code = evaluate.cli([*argv, "--reports", str(reports), "--feedback", str(tmp_path / "feedback")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "test/good/000.png is not a readable image" in err
    assert (reports / "metrics.json").read_text() == "{}"
