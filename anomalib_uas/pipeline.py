# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The stages of the inspection pipeline run by ``dvc repro`` (``dvc.yaml``) and by the ``uas`` command line.

Data flows one way through fixed paths, each stage reading only what the stage before it wrote:

1. :func:`prepare_data`: ``params.data`` -> ``data/dataset`` (MVTec AD layout);
2. :func:`prepare_weights`: per model -> ``checkpoints/<model>/`` (a trained or official checkpoint and
   ``status.json``; a model whose weights cannot be had is marked skipped with the reason and the fix);
3. :func:`evaluate`: per model, ``Engine.test`` on every category -> ``reports/<model>/metrics.json``, ROC and PR
   curves and per-category bars as CSV, and ``predictions/<model>/<category>/predictions.npz``;
4. :func:`~anomalib_uas.report.write_report`: one comparison table (Markdown and an offline HTML page);
5. :func:`review`: FiftyOne review datasets of every evaluation (``reports/review.json`` lists them).

Weights (``params.weights.<model>``), looked up offline first:

* ``metauas``: ``train`` (offline meta-training, ``train.metauas``), ``metauas-256`` / ``metauas-512`` (official:
  ``weights/metauas/<name>.ckpt``, the weights cache, or a sha256-checked download) or a local path;
* ``inctrl``: ``official`` = ``weights/inctrl/2/checkpoint.pyth`` (the authors' file, its CLIP tower included; for
  the k = 4 or 8 files give their path), a local path or URL, or ``train`` (``Engine.fit`` on the auxiliary
  categories of ``train.inctrl``);
* ``faprompt``: ``official`` = ``weights/faprompt/epoch_15.pth`` (the prompt learner), a local path or URL, or
  ``train`` (``train.faprompt``).

The CLIP models take their backbone from ``models_config.<model>.clip_model`` and their CLIP weights from
``models_config.<model>.clip_weights``, else ``weights/<model>/<file>`` or ``$UAS_WEIGHTS_DIR/<file>``, where
``<file>`` is the open_clip release file (``ViT-L-14-336px.pt``, ``vit_b_16_plus_240-laion400m_e32-699c4b84.pt``,
downloaded when online) or ``<clip_model>.pt`` for configurations without one. A missing file makes the model
skipped: the reason names each file, where to put it and the parameter or environment variable that points at it.
Every evaluated model is registered in MLflow per category (:func:`~anomalib_uas.tracking.register_model`).

Example:
    >>> from anomalib_uas.pipeline import load_params, prepare_data
    >>> prepare_data(load_params("params.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from sklearn.metrics import precision_recall_curve, roc_curve

from anomalib_uas import tracking
from anomalib_uas.data import generate_demo_dataset
from anomalib_uas.evaluation import METRICS, evaluate_model
from anomalib_uas.models.loading import load_model
from anomalib_uas.models.metauas.torch_model import OFFICIAL_DECODER_CHANNELS
from anomalib_uas.weights import WeightsNotFoundError, resolve_weights, weights_dir

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "build_model",
    "clip_weights_file",
    "evaluate",
    "load_params",
    "prepare_data",
    "prepare_weights",
    "read_status",
    "review",
]

MODELS = ("metauas", "inctrl", "faprompt")
DATA_DIR = Path("data/dataset")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
PREDICTIONS_DIR = Path("predictions")
REVIEW_MEDIA_DIR = Path("review")
LOCAL_WEIGHTS_DIR = Path("weights")
# Official file names of the CLIP models under ``weights/`` (the authors publish them without a checksum).
INCTRL_OFFICIAL = LOCAL_WEIGHTS_DIR / "inctrl" / "2" / "checkpoint.pyth"
FAPROMPT_OFFICIAL = LOCAL_WEIGHTS_DIR / "faprompt" / "epoch_15.pth"
# Where the authors publish them, and the open_clip tag of the CLIP weights each model was trained with.
OFFICIAL_SOURCES = {
    "inctrl": "`checkpoints/<k>/checkpoint.pyth` (k = 2, 4, 8; it holds its CLIP weights) from the authors' "
    "Google Drive folder 1McmfxF8_H0BeRvcJ_poGIB-ATQCDDEIa (linked from github.com/mala-lab/InCTRL)",
    "faprompt": "the `epoch_<N>.pth` prompt-learner checkpoint linked from github.com/mala-lab/FAPrompt",
}
CLIP_TAGS = {"inctrl": "laion400m_e32", "faprompt": "openai"}
CLIP_DEFAULTS = {"inctrl": "ViT-B-16-plus-240", "faprompt": "ViT-L-14-336"}


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the pipeline parameters.

    Args:
        path: The params file.

    Returns:
        The parameters.

    Raises:
        FileNotFoundError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Parameters file {path} does not exist; run from the repository root or pass --params."
        raise FileNotFoundError(msg)
    return yaml.safe_load(path.read_text())


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def prepare_data(params: dict[str, Any], output: Path = DATA_DIR) -> Path:
    """Build the evaluation dataset in MVTec AD layout at a fixed path.

    ``demo`` generates the offline demo dataset; ``mvtec`` and ``visa`` copy the categories from ``data.source``
    (prepared by anomalib's datamodules, which download them when online); ``folder`` arranges the user's good,
    defect and mask folders as one category.

    Args:
        params: Pipeline parameters (the ``data`` section is used).
        output: Output folder.

    Returns:
        The output folder.

    Raises:
        ValueError: For an unknown dataset name.
        FileNotFoundError: A source folder is missing.
    """
    data = params["data"]
    kind = data["dataset"]
    if output.exists():
        shutil.rmtree(output)
    if kind == "demo":
        generate_demo_dataset(output, categories=data["categories"], image_size=data["image_size"], seed=data["seed"])
    elif kind in {"mvtec", "visa"}:
        _copy_anomalib_dataset(kind, Path(data["source"]), data["categories"], output)
    elif kind == "folder":
        _copy_folder_dataset(data["folder"], data["categories"][0], output)
    else:
        msg = f"data.dataset must be demo, mvtec, visa or folder, got {kind!r}."
        raise ValueError(msg)
    return output


def _copy_anomalib_dataset(kind: str, source: Path, categories: list[str], output: Path) -> None:
    from anomalib.data import MVTecAD, Visa

    datamodule_class = MVTecAD if kind == "mvtec" else Visa
    for category in categories:
        datamodule = datamodule_class(root=source, category=category, num_workers=0)
        datamodule.prepare_data()  # downloads when the category is missing and the machine is online
        prepared = source / "visa_pytorch" / category if kind == "visa" else source / category
        if not prepared.is_dir():
            msg = f"{prepared} is missing: download {kind} to {source} (anomalib does it when online)."
            raise FileNotFoundError(msg)
        shutil.copytree(prepared, output / category)


def _copy_folder_dataset(folder: dict[str, str], category: str, output: Path) -> None:
    target = output / category
    for key, relative in (("normal_dir", "train/good"), ("abnormal_dir", "test/defect")):
        source = Path(folder[key])
        if not source.is_dir():
            msg = f"data.folder.{key} = {source} does not exist."
            raise FileNotFoundError(msg)
        shutil.copytree(source, target / relative)
    normal_test = folder.get("normal_test_dir")
    if normal_test:
        shutil.copytree(normal_test, target / "test" / "good")
    else:  # keep a third of the normal images for testing
        goods = sorted((target / "train" / "good").iterdir())
        (target / "test" / "good").mkdir(parents=True)
        for path in goods[: max(1, len(goods) // 3)]:
            path.rename(target / "test" / "good" / path.name)
    masks = folder.get("mask_dir")
    if masks:
        (target / "ground_truth" / "defect").mkdir(parents=True)
        for mask in sorted(Path(masks).iterdir()):
            name = mask.stem if mask.stem.endswith("_mask") else f"{mask.stem}_mask"
            shutil.copy(mask, target / "ground_truth" / "defect" / f"{name}{mask.suffix}")


def read_status(model: str, checkpoints: Path = CHECKPOINTS_DIR) -> dict[str, Any]:
    """Read what :func:`prepare_weights` decided for a model.

    Args:
        model: Model name.
        checkpoints: Checkpoints folder.

    Returns:
        The status: ``{"status": "ready", "checkpoint": ..., "description": ...}`` or
        ``{"status": "skipped", "reason": ...}``.
    """
    return json.loads((checkpoints / model / "status.json").read_text())


def prepare_weights(model: str, params: dict[str, Any], checkpoints: Path = CHECKPOINTS_DIR) -> dict[str, Any]:
    """Produce the checkpoint of a model, or record why it is skipped.

    Args:
        model: ``metauas``, ``inctrl`` or ``faprompt``.
        params: Pipeline parameters (``weights``, ``train`` and ``models_config`` sections).
        checkpoints: Checkpoints folder; ``<checkpoints>/<model>`` is the stage output.

    Returns:
        The status written to ``status.json``.

    Raises:
        ValueError: For an unknown model.
        WeightsError: A file exists but is not a checkpoint of the model (the stage fails with the reason).
    """
    if model not in MODELS:
        msg = f"Unknown model {model!r}; choose one of {MODELS}."
        raise ValueError(msg)
    output = checkpoints / model
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    source = params["weights"][model]
    try:
        status = _PREPARE[model](str(source), params, output)
    except WeightsNotFoundError as exc:
        status = {"status": "skipped", "reason": str(exc)}
    _write_json(output / "status.json", status)
    return status


def _metauas_weights(source: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    if source == "train":
        return _train_metauas(params, output)
    local = LOCAL_WEIGHTS_DIR / "metauas" / f"{source}.ckpt"
    try:
        path = resolve_weights(local if local.is_file() else source)
    except WeightsNotFoundError as exc:
        msg = f"{exc} In this repository you can also put it at {local}; the next `dvc repro` then evaluates it."
        raise WeightsNotFoundError(msg) from exc
    shutil.copy(path, output / "metauas.pth")
    return {
        "status": "ready",
        "checkpoint": str(output / "metauas.pth"),
        "backbone": "tf_efficientnet_b4",
        "fusion": "cat",
        "decoder_channels": list(OFFICIAL_DECODER_CHANNELS),
        "image_size": int(params["evaluate"]["image_size"]),
        "description": f"official MetaUAS checkpoint {path.name}",
    }


def _train_metauas(params: dict[str, Any], output: Path) -> dict[str, Any]:
    from anomalib_uas.models.metauas.training import train_metauas

    recipe = params["train"]["metauas"]
    with _training_run("metauas", params) as run:
        checkpoint = train_metauas(output / "training", logger=run.pop("logger"), **recipe)
    shutil.copy(checkpoint, output / "metauas.pth")
    shutil.rmtree(output / "training")
    return {
        "status": "ready",
        "checkpoint": str(output / "metauas.pth"),
        "backbone": recipe["backbone"],
        "fusion": recipe["fusion"],
        "decoder_channels": list(recipe["decoder_channels"]),
        "image_size": recipe["image_size"],
        **run,
        "description": (
            f"MetaUAS ({recipe['backbone']}, {recipe['fusion']} fusion) meta-trained offline on synthetic change "
            f"pairs for {recipe['max_steps']} steps ({run['train_minutes']:.1f} min)"
        ),
    }


@contextmanager
def _training_run(model: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A tracked, timed training run.

    Yields ``logger`` (the Engine's MLflow logger, to pop) and ``mlflow_run_id``; on exit adds ``train_minutes``, which
    is also logged as a metric.
    """
    with tracking.stage_run("train", model, params) as run:
        record: dict[str, Any] = {
            "logger": tracking.engine_logger(f"train-{model}", run.info.run_id),
            "mlflow_run_id": run.info.run_id,
        }
        start = time.perf_counter()
        yield record
        minutes = (time.perf_counter() - start) / 60.0
        mlflow.log_metric("train_minutes", minutes)
        record["train_minutes"] = round(minutes, 2)


def _models_config(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """The ``models_config.<model>`` section, with the defaults of the official models filled in."""
    config = dict((params.get("models_config") or {}).get(model) or {})
    config.setdefault("clip_model", CLIP_DEFAULTS[model])
    config.setdefault("clip_weights", None)
    return config


def clip_weights_file(model: str, clip_model: str) -> tuple[str, str | None]:
    """Name of the CLIP weights file a CLIP model needs, and where open_clip publishes it.

    Args:
        model: ``inctrl`` or ``faprompt``.
        clip_model: open_clip model name.

    Returns:
        The file name (the publisher's, e.g. ``ViT-L-14-336px.pt``; ``<clip_model>.pt`` for configs without a
        published file, such as the tiny test configs) and its URL, or ``None``.
    """
    import open_clip

    url = (open_clip.get_pretrained_cfg(clip_model, CLIP_TAGS[model]) or {}).get("url") or None
    return (url.rstrip("/").rsplit("/", 1)[-1] if url else f"{clip_model}.pt"), url


def _find_clip(model: str, config: dict[str, Any], download: bool) -> tuple[Path | None, str]:
    """Find the CLIP weights of a model: the configured file, ``weights/<model>/<file>``, the cache, or a download.

    Returns:
        The file (``None`` when missing) and, when missing, the sentence that says how to supply it.
    """
    clip_model = config["clip_model"]
    configured = config["clip_weights"]
    key = f"models_config.{model}.clip_weights"
    if configured:
        path = Path(str(configured)).expanduser()
        if path.is_file():
            return path, ""
        return None, f"the CLIP weights file {path} set in {key} does not exist: fix the path in params.yaml"
    name, url = clip_weights_file(model, clip_model)
    local = LOCAL_WEIGHTS_DIR / model / name
    if local.is_file():
        return local, ""
    cached = weights_dir() / name
    if cached.is_file():
        return cached, ""
    if url is not None and download:
        try:
            return resolve_weights(url), ""
        except WeightsNotFoundError as exc:
            logger.info("CLIP weights of %s not downloaded: %s", model, exc)
    where = f"from {url} (open_clip {clip_model} / {CLIP_TAGS[model]})" if url else "(no published file)"
    return None, (
        f"the {clip_model} CLIP weights {name} {where} are missing: put the file at {local} or in the weights "
        f"cache {weights_dir()} (environment variable UAS_WEIGHTS_DIR), or set {key} in params.yaml to its path"
        + ("; when the machine is online and UAS_OFFLINE is unset it is downloaded" if url else "")
    )


def _find_checkpoint(model: str, source: str, official: Path) -> tuple[Path | None, str]:
    """Find the model checkpoint named by ``weights.<model>``: ``official`` (under ``weights/``), a path or a URL."""
    key = f"weights.{model}"
    if source == "official":
        if official.is_file():
            return official, ""
        return None, (
            f"the official {model} checkpoint {official} is missing: download {OFFICIAL_SOURCES[model]} and put it "
            f"at {official}, or set {key} in params.yaml to the path of the file"
        )
    if not source.startswith(("http://", "https://")) and not Path(source).expanduser().is_file():
        return None, f"the {model} checkpoint {source} named by {key} does not exist: fix the path in params.yaml"
    try:
        return resolve_weights(source), ""
    except WeightsNotFoundError as exc:
        return None, f"the {model} checkpoint {key} = {source} could not be had: {exc}"


def _missing(model: str, problems: list[str]) -> WeightsNotFoundError:
    """The skip reason: every missing file, where to put it and the parameter that points at it."""
    listed = "; ".join(f"({index}) {text}" for index, text in enumerate(problems, start=1))
    msg = (
        f"{model} is skipped because files it needs are not on this machine: {listed}. "
        f"Then run `dvc repro` again: the weights stage picks the files up and {model} is evaluated."
    )
    return WeightsNotFoundError(msg)


def _inctrl_weights(source: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    from anomalib_uas.models.inctrl.checkpoint import read_official, split_official

    name = "inctrl"
    config = _models_config(name, params)
    checkpoint, problem = _find_checkpoint(name, source, INCTRL_OFFICIAL)
    if checkpoint is None:
        raise _missing(name, [problem])
    parts = split_official(read_official(checkpoint))  # WeightsError (not an InCTRL file) fails the stage
    clip, clip_problem = None, ""
    if config["clip_weights"] or parts.clip is None:
        clip, clip_problem = _find_clip(name, config, download=True)
        if clip is None:
            raise _missing(name, [clip_problem])
    shutil.copy(checkpoint, output / "inctrl.pth")
    if clip is not None:
        shutil.copy(clip, output / "clip.pt")
    clip_from = f"CLIP from {clip.name}" if clip is not None else "CLIP tower of the same file"
    return {
        "status": "ready",
        "checkpoint": str(output / "inctrl.pth"),
        "clip_model": config["clip_model"],
        "clip_weights": str(output / "clip.pt") if clip is not None else None,
        "description": f"InCTRL checkpoint {checkpoint} ({config['clip_model']}, {clip_from})",
    }


def _faprompt_weights(source: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    from anomalib_uas.models.faprompt.checkpoint import read_official

    name = "faprompt"
    config = _models_config(name, params)
    checkpoint, problem = _find_checkpoint(name, source, FAPROMPT_OFFICIAL)
    clip, clip_problem = _find_clip(name, config, download=checkpoint is not None)
    problems = [text for text in (problem, clip_problem) if text]
    if checkpoint is None or clip is None:
        raise _missing(name, problems)
    read_official(checkpoint)  # WeightsError (not a FAPrompt file) fails the stage
    shutil.copy(checkpoint, output / "faprompt.pth")
    shutil.copy(clip, output / "clip.pt")
    return {
        "status": "ready",
        "checkpoint": str(output / "faprompt.pth"),
        "clip_model": config["clip_model"],
        "clip_weights": str(output / "clip.pt"),
        "image_size": int(config.get("image_size", 518)),
        "description": f"FAPrompt prompt learner {checkpoint} ({config['clip_model']}, CLIP from {clip.name})",
    }


def _train_clip_model(model: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    """Auxiliary training through ``Engine.fit`` (``weights.<model>: train``, recipe ``train.<model>``).

    InCTRL trains its adapter and heads, FAPrompt its prompt learner, on the MVTec-layout categories of
    ``train.<model>.root``; the frozen CLIP weights must be available (see :func:`_find_clip`).
    """
    from anomalib.engine import Engine

    from anomalib_uas.data import AuxiliaryDataModule

    recipe = params["train"][model]
    config = _models_config(model, params)
    root = Path(recipe["root"])
    absent = [str(root / category) for category in recipe["categories"] if not (root / category).is_dir()]
    problems = []
    if absent:
        problems.append(
            f"the auxiliary category folders {', '.join(absent)} are missing: put MVTec-layout categories (normal and "
            f"anomalous images, with masks for faprompt) under {root}, or set train.{model}.root and "
            f"train.{model}.categories in params.yaml"
        )
    clip, clip_problem = _find_clip(model, config, download=not problems)
    if clip is None or problems:
        raise _missing(model, [*problems, *([clip_problem] if clip_problem else [])])
    datamodule = AuxiliaryDataModule(
        root,
        categories=list(recipe["categories"]),
        train_batch_size=recipe["batch_size"],
        eval_batch_size=recipe["batch_size"],
        num_workers=0,
        balanced=model == "inctrl",
        seed=recipe["seed"],
    )
    common = {"clip_model": config["clip_model"], "clip_weights": str(clip), "visualizer": False}
    common.update(auxiliary_training=True, learning_rate=recipe["learning_rate"], seed=recipe["seed"])
    if model == "inctrl":
        from anomalib_uas.models.inctrl import InCTRL

        module = InCTRL(pretrained=None, k_shot=recipe["k_shot"], **common)
    else:
        from anomalib_uas.models.faprompt import FAPrompt

        module = FAPrompt(clip_pretrained=None, image_size=int(config.get("image_size", 518)), **common)
    with _training_run(model, params) as run:
        engine = Engine(
            default_root_dir=output / "training",
            logger=run.pop("logger"),
            accelerator="cpu",
            devices=1,
            max_steps=recipe["max_steps"],
            limit_val_batches=recipe.get("limit_val_batches", 1),
        )
        engine.fit(module, datamodule=datamodule)
    shutil.rmtree(output / "training", ignore_errors=True)
    checkpoint = output / f"{model}.pth"
    if model == "inctrl":
        from anomalib_uas.models.inctrl.checkpoint import to_official

        torch.save(to_official(module.model, include_clip=False), checkpoint)
    else:
        module.save_official_checkpoint(checkpoint)
    shutil.copy(clip, output / "clip.pt")
    status = {
        "status": "ready",
        "checkpoint": str(checkpoint),
        "clip_model": config["clip_model"],
        "clip_weights": str(output / "clip.pt"),
        **run,
        "description": (
            f"{model} ({config['clip_model']}) trained on the auxiliary categories {', '.join(recipe['categories'])} "
            f"of {root} for {recipe['max_steps']} steps ({run['train_minutes']:.1f} min)"
        ),
    }
    if model == "faprompt":
        status["image_size"] = int(config.get("image_size", 518))
    return status


def _clip_model_weights(model: str, source: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    if source == "train":
        return _train_clip_model(model, params, output)
    prepare = _inctrl_weights if model == "inctrl" else _faprompt_weights
    return prepare(source, params, output)


_PREPARE = {
    "metauas": _metauas_weights,
    "inctrl": lambda source, params, output: _clip_model_weights("inctrl", source, params, output),
    "faprompt": lambda source, params, output: _clip_model_weights("faprompt", source, params, output),
}


def model_kwargs(model: str, status: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Arguments of a model's class, besides its checkpoint files, as evaluated and as registered.

    Args:
        model: Model name.
        status: The model's ``status.json`` (backbone, CLIP model, image size).
        params: Pipeline parameters (the ``evaluate`` section: image size, k-shot, prompt strategy, seed).

    Returns:
        Keyword arguments for :func:`~anomalib_uas.models.loading.load_model`.
    """
    evaluation = params["evaluate"]
    if model == "metauas":
        return {
            "image_size": evaluation["image_size"],
            "backbone": status["backbone"],
            "fusion": status["fusion"],
            "decoder_channels": status["decoder_channels"],
            "k_shot": evaluation["k_shot"],
            "prompt_strategy": evaluation["prompt_strategy"],
            "seed": evaluation["seed"],
        }
    if model == "inctrl":  # k normal prompts drawn (seeded) from the category's normal training images
        return {"clip_model": status["clip_model"], "k_shot": evaluation["k_shot"], "seed": evaluation["seed"]}
    return {"clip_model": status["clip_model"], "image_size": status["image_size"]}  # zero-shot: no image used


def build_model(model: str, status: dict[str, Any], params: dict[str, Any]) -> Any:
    """Build the anomalib model that :func:`prepare_weights` made ready.

    CLIP weights come from the checkpoint's own tower or from ``status["clip_weights"]``; a weights stage that
    found neither marked the model skipped, so nothing is downloaded here.

    Args:
        model: Model name.
        status: The model's ``status.json`` (checkpoint paths, backbone, CLIP model).
        params: Pipeline parameters (the ``evaluate`` section: k-shot, prompt strategy, seed).

    Returns:
        A fresh ``AnomalibModule`` without visualizer.
    """
    kwargs = model_kwargs(model, status, params)
    return load_model(model, status["checkpoint"], status.get("clip_weights"), visualizer=False, **kwargs)


def evaluate(model: str, params: dict[str, Any], data: Path = DATA_DIR) -> dict[str, Any]:
    """Evaluate one model on every category and write its metrics, curves and predictions.

    Args:
        model: Model name.
        params: Pipeline parameters.
        data: The dataset folder written by :func:`prepare_data`.

    Returns:
        The metrics written to ``reports/<model>/metrics.json``.
    """
    reports = REPORTS_DIR / model
    predictions = PREDICTIONS_DIR / model
    for folder in (reports, predictions):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    status = read_status(model)
    categories = list(params["data"]["categories"])
    if status["status"] != "ready":
        metrics = {"skipped": 1}
        _write_json(reports / "metrics.json", metrics)
        _write_json(reports / "skipped.json", {"reason": status["reason"]})
        _write_curves(reports, [], [], categories)
        return metrics
    with tracking.stage_run("evaluate", model, params) as run:
        rows = evaluate_model(
            lambda: build_model(model, status, params),
            data,
            categories,
            output_dir=Path("results") / model,
            predictions_dir=predictions,
            batch_size=params["evaluate"]["batch_size"],
            build_logger=lambda category: tracking.engine_logger(f"{model}-{category}", run.info.run_id),
        )
        columns = [*METRICS, "ms_per_image"]
        per_category = {row["category"]: {c: row[c] for c in columns if c in row} for row in rows}
        metrics = {"skipped": 0, "categories": per_category}
        metrics["mean"] = {c: float(np.mean([row[c] for row in rows if c in row])) for c in columns}
        _write_json(reports / "metrics.json", metrics)
        _write_json(reports / "weights.json", {"description": status["description"]})
        saved = {category: np.load(predictions / category / "predictions.npz") for category in categories}
        _write_curves(
            reports,
            [saved[c]["pred_score"] for c in categories],
            [saved[c]["gt_label"] for c in categories],
            categories,
            rows,
        )
        mlflow.log_metrics({f"mean.{k}": v for k, v in metrics["mean"].items()})
        for category, values in per_category.items():
            mlflow.log_metrics({f"{category}.{k}": v for k, v in values.items()})
        thresholds = {category: _thresholds(saved[category]) for category in categories}
        _write_json(
            reports / "evaluation.json",
            {
                "mlflow_run_id": run.info.run_id,
                "thresholds": thresholds,
                "prompt_paths": {row["category"]: row["prompt_paths"] for row in rows},
            },
        )
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        _log_figures(model)
        if params["registry"]["register"]:
            kwargs = model_kwargs(model, status, params)
            for row in rows:
                category = row["category"]
                tracking.register_model(
                    tracking.ServableModel(
                        model=model,
                        category=category,
                        checkpoint=Path(status["checkpoint"]),
                        clip_weights=Path(status["clip_weights"]) if status.get("clip_weights") else None,
                        prompt_paths=[Path(p) for p in row["prompt_paths"]],
                        config={"model": model, "category": category, "kwargs": kwargs, **thresholds[category]},
                        example_image=Path(str(saved[category]["image_path"][0])),
                    ),
                    per_category[category],
                    params["registry"]["champion_metric"],
                )
    return metrics


def _log_figures(model: str) -> None:
    """Log the ROC plot and the sample overlays of maps on images to the active run."""
    from anomalib_uas.report import figures

    with tempfile.TemporaryDirectory() as folder:
        for name, png in figures(model, REPORTS_DIR, PREDICTIONS_DIR).items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_bytes(png)
        mlflow.log_artifacts(folder)


def _thresholds(saved: np.lib.npyio.NpzFile, max_pixels: int = 200_000) -> dict[str, float]:
    """F1-optimal image and pixel thresholds on the raw scores of an evaluation."""
    image = _f1_threshold(saved["gt_label"], saved["pred_score"])
    maps = saved["anomaly_map"].astype(np.float32).ravel()
    masks = saved["gt_mask"].ravel()
    step = max(1, maps.size // max_pixels)
    return {"image_threshold": image, "pixel_threshold": _f1_threshold(masks[::step], maps[::step])}


def _f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _write_curves(
    reports: Path,
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    categories: list[str],
    rows: list[dict[str, Any]] | None = None,
) -> None:
    roc_rows, pr_rows = [], []
    for category, score, label in zip(categories, scores, labels, strict=False):
        if len(np.unique(label)) < 2:
            continue
        fpr, tpr, _ = roc_curve(label, score, drop_intermediate=True)
        roc_rows += [
            {"category": category, "fpr": f"{a:.6f}", "tpr": f"{b:.6f}"} for a, b in zip(fpr, tpr, strict=True)
        ]
        precision, recall, _ = precision_recall_curve(label, score, drop_intermediate=True)
        pr_rows += [
            {"category": category, "recall": f"{r:.6f}", "precision": f"{p:.6f}"}
            for p, r in zip(precision, recall, strict=True)
        ]
    bars = [{"category": row["category"], **{c: f"{row[c]:.6f}" for c in METRICS if c in row}} for row in rows or []]
    for name, fields, content in (
        ("roc.csv", ["category", "fpr", "tpr"], roc_rows),
        ("pr.csv", ["category", "recall", "precision"], pr_rows),
        ("per_category.csv", ["category", *METRICS], bars),
    ):
        with (reports / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(content)


def review(params: dict[str, Any], reports: Path = REPORTS_DIR) -> dict[str, Any]:
    """Build the FiftyOne review datasets of every evaluated model and category.

    Args:
        params: Pipeline parameters.
        reports: The reports folder.

    Returns:
        Per dataset name: the counts of false positives and false negatives; also written to
        ``reports/review.json``.
    """
    from anomalib_uas.review import build_review_dataset

    REVIEW_MEDIA_DIR.mkdir(parents=True, exist_ok=True)  # a stage output, even when every model is skipped
    summary: dict[str, Any] = {}
    for model in params["models"]:
        status = read_status(model)
        if status["status"] != "ready":
            continue
        evaluation = json.loads((reports / model / "evaluation.json").read_text())
        module = build_model(model, status, params)
        for category in params["data"]["categories"]:
            predictions = PREDICTIONS_DIR / model / category / "predictions.npz"
            paths = [str(p) for p in np.load(predictions)["image_path"]]
            embeddings = _embeddings(model, module, paths)
            dataset = build_review_dataset(
                model,
                category,
                predictions,
                embeddings=embeddings,
                prompt_paths=evaluation["prompt_paths"][category],
                mlflow_run_id=evaluation["mlflow_run_id"],
                media_dir=REVIEW_MEDIA_DIR / model / category,
                **evaluation["thresholds"][category],
            )
            counts = dataset.count_values("eval")
            summary[dataset.name] = {"FP": counts.get("FP", 0), "FN": counts.get("FN", 0), "samples": len(dataset)}
    _write_json(reports / "review.json", summary)
    return summary


def _embeddings(model: str, module: Any, paths: list[str], batch_size: int = 16) -> np.ndarray:
    """Global image features of the model's own encoder, for FiftyOne's similarity search.

    MetaUAS: the mean of the deepest encoder level; InCTRL: the CLIP image token; FAPrompt: the CLIP image feature.
    """
    from anomalib_uas.data.images import read_image

    network, transform = module.model.eval(), module.pre_processor.transform
    encoders = {
        "metauas": lambda images: network.encode(images)[-1].mean(dim=(2, 3)),
        "inctrl": lambda images: network.encode_images(images)[0],
        "faprompt": lambda images: network.encode_image(images)[0],
    }
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([transform(read_image(path)) for path in paths[start : start + batch_size]])
        with torch.no_grad():
            chunks.append(encoders[model](images).float().numpy())
    return np.concatenate(chunks)
