# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Stage ``data``: build the evaluation dataset named in ``params.yaml`` (``data``) in MVTec AD layout.

``demo`` generates the offline demo dataset; ``mvtec`` and ``visa`` copy the categories from ``data.source``, where
anomalib's datamodules download them when the machine is online and ``UAS_OFFLINE`` is unset (the only download this
stage ever starts); ``folder`` arranges the user's good, defect and mask folders as one category. Every source is
checked before anything is written; the previous dataset is replaced only when the new one is complete.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from anomalib_uas.params import DataParams, FolderData, load_params
from anomalib_uas.stages import StageError, run_stage
from anomalib_uas.stages.outputs import replacing
from anomalib_uas.weights import is_offline

__all__ = ["cli", "main"]


def main(params_file: Path, output: Path) -> Path:
    """Build the dataset.

    Args:
        params_file: ``params.yaml``.
        output: The dataset folder (``data/dataset``).

    Returns:
        The dataset folder.

    Raises:
        StageError: A source folder or category is missing (nothing is changed).
    """
    data = load_params(params_file).data
    sources = _check_sources(data)
    with replacing(output) as (staging,):
        if data.dataset == "demo":
            from anomalib_uas.data.demo import generate_demo_dataset

            generate_demo_dataset(
                staging,
                categories=data.categories,
                image_size=data.image_size,
                num_train=data.train_normals,
                num_test_good=data.test_normals,
                seed=data.seed,
            )
        elif data.dataset == "folder":
            _copy_folder_dataset(data.folder, data.categories[0], staging)
        else:
            for category, source in sources.items():
                shutil.copytree(source, staging / category)
    return output


def _check_sources(data: DataParams) -> dict[str, Path]:
    """Check every source before anything is written; fetch MVTec AD / VisA categories when allowed.

    Returns:
        The source folder of each category (``mvtec`` and ``visa``).
    """
    if data.dataset == "folder":
        for key in ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir"):
            value = getattr(data.folder, key)
            if (value or key in {"normal_dir", "abnormal_dir"}) and not Path(value).is_dir():
                msg = f"data.folder.{key} = {value!r} is not a folder: fix the path in params.yaml"
                raise StageError(msg)
        return {}
    if data.dataset == "demo":
        from anomalib_uas.data.demo import DEMO_CATEGORIES

        unknown = [category for category in data.categories if category not in DEMO_CATEGORIES]
        if unknown:
            msg = (
                f"data.categories {unknown} are not demo categories ({', '.join(DEMO_CATEGORIES)}): fix data.categories"
            )
            raise StageError(msg)
        return {}
    root = Path(data.source)
    prepared = root / "visa_pytorch" if data.dataset == "visa" else root
    sources = {category: prepared / category for category in data.categories}
    absent = [category for category, path in sources.items() if not (path / "test").is_dir()]
    if absent and not is_offline():
        _download(data.dataset, root, absent)
        absent = [category for category in absent if not (sources[category] / "test").is_dir()]
    if absent:
        how = (
            "UAS_OFFLINE is set, so nothing is downloaded"
            if is_offline()
            else "anomalib could not download them (is the machine online?)"
        )
        msg = (
            f"data.categories {absent} are not in {prepared} ({how}): put the {data.dataset} categories there, set "
            "data.source to where they are, or fix data.categories"
        )
        raise StageError(msg)
    return sources


def _download(dataset: str, root: Path, categories: list[str]) -> None:
    """Let anomalib's datamodule download the missing categories into ``data.source``."""
    from anomalib.data import MVTecAD, Visa

    datamodule_class = MVTecAD if dataset == "mvtec" else Visa
    for category in categories:
        try:
            datamodule_class(root=root, category=category, num_workers=0).prepare_data()
        except (OSError, RuntimeError, ValueError) as exc:
            msg = f"downloading {dataset} category {category!r} into {root} failed: {exc}"
            raise StageError(msg) from exc


def _copy_folder_dataset(folder: FolderData, category: str, output: Path) -> None:
    target = output / category
    shutil.copytree(folder.normal_dir, target / "train" / "good")
    shutil.copytree(folder.abnormal_dir, target / "test" / "defect")
    if folder.normal_test_dir:
        shutil.copytree(folder.normal_test_dir, target / "test" / "good")
    else:  # keep a third of the normal images for testing
        goods = sorted((target / "train" / "good").iterdir())
        (target / "test" / "good").mkdir(parents=True)
        for path in goods[: max(1, len(goods) // 3)]:
            path.rename(target / "test" / "good" / path.name)
    if folder.mask_dir:
        (target / "ground_truth" / "defect").mkdir(parents=True)
        for mask in sorted(Path(folder.mask_dir).iterdir()):
            name = mask.stem if mask.stem.endswith("_mask") else f"{mask.stem}_mask"
            shutil.copy(mask, target / "ground_truth" / "defect" / f"{name}{mask.suffix}")


def cli(argv: Sequence[str] | None = None) -> int:
    """``uas data``: build the dataset.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="uas data", description="Build the evaluation dataset (params: data).")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="Parameters file (%(default)s).")
    parser.add_argument("--output", type=Path, default=Path("data/dataset"), help="Dataset folder (%(default)s).")
    return run_stage("data", parser, lambda args: f"Dataset ready at {main(args.params, args.output)}", argv)
