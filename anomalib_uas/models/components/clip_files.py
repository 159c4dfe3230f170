# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Where the files of the CLIP models (InCTRL, FAPrompt) come from, and their auxiliary training.

A CLIP model needs its own checkpoint and the frozen CLIP weights it was trained with. Both are looked up offline
first: a path set in ``params.yaml``, the model's folder ``weights/<model>/``, the weights cache
(``$UAS_WEIGHTS_DIR``), and, for the CLIP weights open_clip publishes, a download when the machine is online.

A file that is simply not on the machine raises :class:`~anomalib_uas.weights.WeightsNotFoundError` whose message
names every missing file, where to put it and the parameter that points at it: the pipeline reports the model as
skipped. A path the user set that does not exist, or a file that is not a checkpoint of the model, raises
:class:`~anomalib_uas.weights.WeightsError`: the stage fails and keeps its previous outputs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib_uas.models.spec import ModelFiles
from anomalib_uas.weights import WeightsError, WeightsNotFoundError, resolve_weights, weights_dir

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule
    from lightning.pytorch.loggers import Logger

    from anomalib_uas.params import AuxiliaryTraining, ClipConfig

logger = logging.getLogger(__name__)

__all__ = ["ClipModelFiles", "train_auxiliary"]


@dataclass(frozen=True)
class ClipModelFiles:
    """The files of one CLIP model and where they are published.

    Args:
        model: Model name (``inctrl``, ``faprompt``); ``weights/<model>/`` is its folder.
        clip_model: open_clip architecture of the official model.
        clip_pretrained: open_clip pretrained tag of the CLIP weights the model was trained with.
        official_checkpoint: The official checkpoint's path inside ``weights/<model>/``.
        published_at: Where the authors publish the official checkpoint.
    """

    model: str
    clip_model: str
    clip_pretrained: str
    official_checkpoint: str
    published_at: str

    def clip_file(self, clip_model: str) -> tuple[str, str | None]:
        """Name of the CLIP weights file an architecture needs, and the URL open_clip publishes it at.

        Args:
            clip_model: open_clip architecture.

        Returns:
            The publisher's file name (``<clip_model>.pt`` for configurations without a release, such as the tiny
            test configurations) and its URL, or ``None``.
        """
        import open_clip

        url = (open_clip.get_pretrained_cfg(clip_model, self.clip_pretrained) or {}).get("url") or None
        return (url.rstrip("/").rsplit("/", 1)[-1] if url else f"{clip_model}.pt"), url

    def find_checkpoint(self, source: str, folder: Path) -> tuple[Path | None, str]:
        """The checkpoint named by ``weights.<model>``: ``official`` (in ``folder``), a local path or a URL.

        Args:
            source: The ``weights.<model>`` value.
            folder: The model's weights folder (``weights/<model>``).

        Returns:
            The file, or ``None`` with the sentence that says how to supply the official file.

        Raises:
            WeightsError: A path or URL that does not resolve (the value in params.yaml is wrong).
        """
        key = f"weights.{self.model}"
        if source == "official":
            official = folder / self.official_checkpoint
            if official.is_file():
                return official, ""
            return None, (
                f"the official {self.model} checkpoint {official} is missing: download {self.published_at} and put it "
                f"at {official}, or set {key} in params.yaml to the path of the file"
            )
        if not source.startswith(("http://", "https://")) and not Path(source).expanduser().is_file():
            msg = (
                f"{key} = {source!r} is neither 'official', 'train', an existing file nor a URL: fix it in params.yaml"
            )
            raise WeightsError(msg)
        try:
            return resolve_weights(source), ""
        except WeightsNotFoundError as exc:
            msg = f"{key} = {source!r} could not be fetched: {exc}"
            raise WeightsError(msg) from exc

    def find_clip(self, config: ClipConfig, folder: Path, download: bool) -> tuple[Path | None, str]:
        """The CLIP weights: the configured file, ``folder/<file>``, the weights cache, or a download.

        Args:
            config: ``models_config.<model>``.
            folder: The model's weights folder.
            download: Whether to try the download when the file is not on the machine.

        Returns:
            The file, or ``None`` with the sentence that says how to supply it.

        Raises:
            WeightsError: ``clip_weights`` names a file that does not exist.
        """
        clip_model = config.clip_model or self.clip_model
        key = f"models_config.{self.model}.clip_weights"
        if config.clip_weights:
            path = Path(config.clip_weights).expanduser()
            if path.is_file():
                return path, ""
            msg = f"{key} = {config.clip_weights!r} does not exist: fix the path in params.yaml or set it to null"
            raise WeightsError(msg)
        name, url = self.clip_file(clip_model)
        for candidate in (folder / name, weights_dir() / name):
            if candidate.is_file():
                return candidate, ""
        if url is not None and download:
            try:
                return resolve_weights(url), ""
            except WeightsNotFoundError as exc:
                logger.info("CLIP weights of %s not downloaded: %s", self.model, exc)
        where = f"from {url} (open_clip {clip_model} / {self.clip_pretrained})" if url else "(no published file)"
        return None, (
            f"the {clip_model} CLIP weights {name} {where} are missing: put the file at {folder / name} or in the "
            f"weights cache {weights_dir()} (environment variable UAS_WEIGHTS_DIR), or set {key} in params.yaml to "
            "its path" + ("; when the machine is online and UAS_OFFLINE is unset it is downloaded" if url else "")
        )

    def missing(self, problems: list[str]) -> WeightsNotFoundError:
        """The skip reason: every missing file, where to put it and the parameter that points at it.

        Args:
            problems: One sentence per missing file.

        Returns:
            The error to raise.
        """
        listed = "; ".join(f"({index}) {text}" for index, text in enumerate(problems, start=1))
        msg = (
            f"{self.model} is skipped because files it needs are not on this machine: {listed}. "
            f"Then run `dvc repro` again: the weights stage picks the files up and {self.model} is evaluated."
        )
        return WeightsNotFoundError(msg)


def train_auxiliary(
    files: ClipModelFiles,
    recipe: AuxiliaryTraining,
    config: ClipConfig,
    folder: Path,
    output: Path,
    build: Callable[[str, Path], AnomalibModule],
    save: Callable[[AnomalibModule, Path], None],
    engine_logger: Logger | bool,
    balanced: bool = False,
) -> ModelFiles:
    """Auxiliary training of a CLIP model through ``Engine.fit`` on MVTec-layout categories.

    Args:
        files: The model's files.
        recipe: ``train.<model>``.
        config: ``models_config.<model>``.
        folder: The model's weights folder (for the CLIP weights).
        output: Folder to write the trained checkpoint into.
        build: ``(clip_model, clip_weights) -> module`` set up for auxiliary training.
        save: Writes the trained module's official-format checkpoint.
        engine_logger: The Engine's logger.
        balanced: Draw exactly balanced batches of normal and anomalous images (InCTRL's official sampler).

    Returns:
        The trained checkpoint and the CLIP weights it needs.

    Raises:
        WeightsNotFoundError: The auxiliary categories or the CLIP weights are missing (the model is skipped).
    """
    from anomalib.engine import Engine

    from anomalib_uas.data import AuxiliaryDataModule

    root = Path(recipe.root)
    absent = [str(root / category) for category in recipe.categories if not (root / category).is_dir()]
    problems = []
    if absent:
        problems.append(
            f"the auxiliary category folders {', '.join(absent)} are missing: put MVTec-layout categories (normal and "
            f"anomalous images, with masks) under {root}, or set train.{files.model}.root and "
            f"train.{files.model}.categories in params.yaml"
        )
    clip, clip_problem = files.find_clip(config, folder, download=not problems)
    if clip is None or problems:
        raise files.missing([*problems, *([clip_problem] if clip_problem else [])])
    clip_model = config.clip_model or files.clip_model
    datamodule = AuxiliaryDataModule(
        root,
        categories=list(recipe.categories),
        train_batch_size=recipe.batch_size,
        eval_batch_size=recipe.batch_size,
        num_workers=0,
        balanced=balanced,
        seed=recipe.seed,
    )
    module = build(clip_model, clip)
    engine = Engine(
        default_root_dir=output / "training",
        logger=engine_logger,
        accelerator="cpu",
        devices=1,
        max_steps=recipe.max_steps,
        limit_val_batches=recipe.limit_val_batches,
    )
    engine.fit(module, datamodule=datamodule)
    checkpoint = output / f"{files.model}.pth"
    save(module, checkpoint)
    shutil.rmtree(output / "training", ignore_errors=True)
    kwargs: dict[str, Any] = {"clip_model": clip_model}
    return ModelFiles(
        checkpoint=checkpoint,
        clip_weights=clip,
        kwargs=kwargs,
        description=(
            f"{files.model} ({clip_model}) trained on the auxiliary categories {', '.join(recipe.categories)} of "
            f"{root} for {recipe.max_steps} steps"
        ),
    )
