# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The offline MetaUAS recipe: training time, and what it buys over an untrained decoder and a feature baseline.

Trains MetaUAS with the pipeline's recipe (``train.metauas`` in ``params.yaml``) on the synthetic change pairs of
the offline source images, timing the wall clock, then scores the offline evaluation dataset (the ``demo`` dataset of
``params.yaml``: disjoint from the training sources) with three one-shot models that see the same single normal
prompt per category (the seeded random protocol of the paper):

* **trained**: the recipe's checkpoint, loaded with ``MetaUAS.from_checkpoint``;
* **untrained**: the same architecture and ImageNet encoder with the decoder at its seeded initialisation;
* **nearest patch**: :class:`~anomalib_uas.models.nearest_patch.torch_model.NearestPatchModel`, the L2 distance of
  each query patch to its nearest prompt patch in pooled stride-8/16 ImageNet features of the same encoder.

All three are scored by the metrics of ``MetaUAS.configure_evaluator`` on raw scores and maps (the metrics are
threshold-free). The report gives the training time in minutes and optimisation steps per second, the CPU's
vector ISA and the ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS`` overrides (AVX2 for
all three approximates an AVX2-only CPU on an AVX-512 one). The Markdown report is printed and written to
``benchmarks/results/metauas_training.md``.

Run it from the repository root:

    python benchmarks/metauas_training.py
    python benchmarks/metauas_training.py --max-steps 50   # a quick look, not the recipe
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/metauas_training.py --skip-evaluation
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from anomalib.data import MVTecAD

from anomalib_uas.data import generate_demo_dataset
from anomalib_uas.models import MetaUAS
from anomalib_uas.models.components.references import seeded_choice
from anomalib_uas.models.metauas.training import train_metauas, training_threads
from anomalib_uas.models.nearest_patch.torch_model import NearestPatchModel

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "metauas_training.md"
ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
METRICS = ("image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_F1Max", "pixel_AUPRO")

Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _metauas_scorer(module: MetaUAS) -> Scorer:
    network = module.model.eval()

    def score(images: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = network(images, prompt.expand(len(images), -1, -1, -1))
        return output.pred_score, output.anomaly_map

    return score


def _distance_scorer(module: MetaUAS) -> Scorer:
    baseline = NearestPatchModel(module.hparams.backbone, pretrained=True)

    def score(images: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        baseline.set_prompts(prompt)
        output = baseline(images)
        return output.pred_score, output.anomaly_map

    return score


@torch.no_grad()
def evaluate(scorer: Scorer, root: Path, category: str, image_size: int, seed: int) -> dict[str, float]:
    """Score one category with one seeded random normal prompt and compute the evaluator's metrics.

    Args:
        scorer: Maps normalised queries ``[B, 3, S, S]`` and one prompt ``[1, 3, S, S]`` to scores and maps.
        root: Dataset root (MVTec AD layout).
        category: Category.
        image_size: Model input size.
        seed: Prompt seed.

    Returns:
        The seven metrics.
    """
    transform = MetaUAS.configure_pre_processor(image_size).transform
    datamodule = MVTecAD(root=root, category=category, num_workers=0, eval_batch_size=8)
    datamodule.setup()
    train = datamodule.train_data
    normal = [i for i, label in enumerate(train.samples.label_index) if int(label) == 0]
    prompt = transform(train[normal[seeded_choice(len(normal), 1, seed)[0]]].image).unsqueeze(0)
    metrics = MetaUAS.configure_evaluator().test_metrics
    for batch in datamodule.test_dataloader():
        scores, maps = scorer(transform(batch.image), prompt)
        size = batch.gt_mask.shape[-2:]
        maps = torch.nn.functional.interpolate(maps.unsqueeze(1), size=size, mode="bilinear").squeeze(1)
        scored = batch.update(pred_score=scores, anomaly_map=maps, in_place=False)
        for metric in metrics:
            metric.update(scored)
    return {metric.name: float(metric.compute()) for metric in metrics}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(row[name] for row in rows) / len(rows) for name in METRICS}


def _table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| model | category | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    for model, per_category in results.items():
        rows = [*per_category.items(), ("**mean**", _mean(list(per_category.values())))]
        lines += [f"| {model} | {cat} | " + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |" for cat, row in rows]
    return "\n".join(lines)


def _isa() -> str:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def main(argv: list[str] | None = None) -> None:
    """Train with the recipe, evaluate the three models, print and write the report.

    Args:
        argv: Command-line arguments.
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, help="Override the recipe's optimisation steps.")
    parser.add_argument("--threads", type=int, help="torch threads (default: the idle cores, as the pipeline)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--skip-evaluation", action="store_true", help="time the training only")
    parser.add_argument("--checkpoint", type=Path, help="evaluate this recipe checkpoint instead of training one")
    args = parser.parse_args(argv)
    threads = args.threads or training_threads()
    torch.set_num_threads(threads)
    recipe: dict[str, Any] = dict(params["train"]["metauas"])
    if args.max_steps is not None:
        recipe["max_steps"] = args.max_steps
    data = params["data"]
    image_size = params["evaluate"]["image_size"]
    seed = params["evaluate"]["seed"]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        root = generate_demo_dataset(
            Path(workdir) / "demo", categories=data["categories"], image_size=data["image_size"], seed=data["seed"]
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        checkpoint = args.checkpoint or train_metauas(
            Path(workdir) / "training", threads=threads, enable_progress_bar=False, **recipe
        )
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        timing = (
            f"Training took **{seconds / 60:.1f} min** ({recipe['max_steps'] / seconds:.2f} steps/s, "
            f"{cpu_seconds / seconds:.2f} CPU-seconds per second)."
            if args.checkpoint is None
            else f"Not trained here: evaluates `{args.checkpoint}`."
        )
        architecture = {key: recipe[key] for key in ("backbone", "fusion", "decoder_channels", "seed")}
        untrained = MetaUAS(image_size=image_size, **architecture)
        trained = MetaUAS.from_checkpoint(checkpoint, image_size=image_size, seed=recipe["seed"])
        scorers = {
            "trained": _metauas_scorer(trained),
            "untrained": _metauas_scorer(untrained),
            "nearest patch": _distance_scorer(untrained),
        }
        results = {
            name: {category: evaluate(scorer, root, category, image_size, seed) for category in data["categories"]}
            for name, scorer in scorers.items()
            if not args.skip_evaluation
        }
    overrides = ", ".join(f"{name}={os.environ.get(name, '-')}" for name in ISA_OVERRIDES)
    recipe_text = ", ".join(f"{key}={value}" for key, value in recipe.items())
    report = "\n".join(
        [
            "# MetaUAS offline recipe",
            "",
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} with {threads} threads.",
            "",
            f"CPU: {_isa()}; overrides: {overrides}; load average before training {load[0]:.1f}.",
            "",
            f"Recipe: {recipe_text}. {timing}",
            "",
            f"One seeded random normal prompt per category, evaluated at {image_size} px on the demo dataset "
            f"({', '.join(data['categories'])}):",
            "",
            _table(results) if results else "(evaluation skipped)",
            "",
        ]
    )
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


if __name__ == "__main__":
    sys.exit(main())
