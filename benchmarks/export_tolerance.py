# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""How far the served ONNX graph lies from the eager model, for every model at full size and every instruction set.

Each model is built as a registered version is (:func:`anomalib_uas.serving.pyfunc.load_servable`: prompts and text
features set), exported (:func:`anomalib_uas.serving.runtime.export_graph`) and compared with its eager forward on
images of the demo dataset, one at a time and as one batch, with the measures the registration check uses
(:func:`anomalib_uas.serving.runtime.compare_outputs`). Every (model, instruction set) pair runs in its own process
with ``ATEN_CPU_CAPABILITY`` and the matching ``ONEDNN_MAX_CPU_ISA`` set; instruction sets this CPU lacks are
reported as not run.

Models: MetaUAS with the official architecture at 256 and 512 px and CLIP-model files in the official formats (the
shared parity specs' weights, written by ``scripts/official_files.py``: real shapes, synthetic values),
offline-recipe MetaUAS checkpoints given with ``--metauas-checkpoints`` (e.g. ``checkpoints/metauas/metauas.pth``
of the main job, or checkpoints trained with other seeds), and the nearest-patch model on its ImageNet encoder (the
file its weights stage writes).

Example:
    $ python benchmarks/export_tolerance.py --metauas-checkpoints checkpoints/metauas/metauas.pth
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ISAS = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}  # ATEN_CPU_CAPABILITY -> ONEDNN_MAX_CPU_ISA
CPU_FLAGS = {"default": None, "avx2": "avx2", "avx512": "avx512f"}
CATEGORY = "brick"
KWARGS = {
    "metauas": {"k_shot": 1, "prompt_strategy": "random", "few_shot_source": None, "seed": 0},
    "inctrl": {"clip_model": "ViT-B-16-plus-240", "k_shot": 1, "seed": 0},
    "faprompt": {"clip_model": "ViT-L-14-336", "image_size": 518},
    "nearest_patch": {"image_size": 256, "k_shot": 1, "seed": 0},
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``).

    Returns:
        The flags of the first processor.
    """
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cases(official: dict[str, Path], checkpoints: list[Path]) -> list[dict[str, Any]]:
    """The model configurations measured.

    Args:
        official: The model files by model (``metauas``, ``inctrl``, ``faprompt``, ``faprompt_clip``: official
            formats; ``nearest_patch``: its weights stage's file).
        checkpoints: Offline-recipe MetaUAS checkpoints.

    Returns:
        One ``{"name", "model", "checkpoint", "clip", "kwargs"}`` per case.
    """
    from anomalib_uas.params import load_params

    architecture = load_params(REPO / "params.yaml").train.metauas  # the offline recipe's, as its weights stage records
    recipe = {"backbone": architecture.backbone, "fusion": architecture.fusion,
              "decoder_channels": list(architecture.decoder_channels)}  # fmt: skip
    found = [
        *[
            {"name": f"MetaUAS official {size}", "model": "metauas", "checkpoint": official["metauas"], "clip": None,
             "kwargs": {**KWARGS["metauas"], "image_size": size}}
            for size in (256, 512)
        ],
        *[
            {"name": f"MetaUAS offline {path}", "model": "metauas", "checkpoint": path, "clip": None,
             "kwargs": {**KWARGS["metauas"], **recipe, "image_size": 256}}
            for path in checkpoints
        ],
        {"name": "InCTRL official (ViT-B-16-plus-240)", "model": "inctrl", "checkpoint": official["inctrl"],
         "clip": None, "kwargs": KWARGS["inctrl"]},
        {"name": "FAPrompt official (ViT-L-14-336, 518 px)", "model": "faprompt", "checkpoint": official["faprompt"],
         "clip": official["faprompt_clip"], "kwargs": KWARGS["faprompt"]},
        {"name": "nearest patch (ImageNet efficientnet_lite0)", "model": "nearest_patch",
         "checkpoint": official["nearest_patch"], "clip": None, "kwargs": KWARGS["nearest_patch"]},
    ]  # fmt: skip
    return [
        {**case, "checkpoint": str(case["checkpoint"]), "clip": case["clip"] and str(case["clip"])} for case in found
    ]


def measure(case: dict[str, Any], dataset: Path, images: int) -> dict[str, Any]:
    """Export one case and compare graph and eager outputs (runs in the worker process).

    Args:
        case: One entry of :func:`cases`.
        dataset: The demo dataset.
        images: Test images compared (half normal, half defective).

    Returns:
        Largest absolute and relative differences, one image at a time and as one batch, and timings.
    """
    import numpy as np
    import torch

    from anomalib_uas.data.images import read_image
    from anomalib_uas.serving.pyfunc import load_servable
    from anomalib_uas.serving.runtime import EagerRunner, GraphRunner, compare_outputs, export_graph

    torch.set_num_threads(2)
    folder = dataset / CATEGORY
    normal = sorted((folder / "test" / "good").glob("*.png"))
    defects = sorted(path for path in (folder / "test").glob("*/*.png") if path.parent.name != "good")
    paths = normal[: images // 2] + defects[: images - images // 2]
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = {"checkpoint": case["checkpoint"], **({"clip": case["clip"]} if case["clip"] else {})}
        if case["model"] != "faprompt":
            artifacts["prompts"] = str(Path(scratch) / "prompts")
            Path(artifacts["prompts"]).mkdir()
            first = sorted((folder / "train" / "good").glob("*.png"))[0]
            (Path(artifacts["prompts"]) / first.name).write_bytes(first.read_bytes())
        config = {"model": case["model"], "category": CATEGORY, "kwargs": case["kwargs"]}
        module = load_servable(config, artifacts)
        batch = torch.stack([module.pre_processor.transform(read_image(path)) for path in paths])
        start = time.perf_counter()
        export_graph(module.model, batch, Path(scratch) / "graph")
        export_s = time.perf_counter() - start
        runner, eager = GraphRunner(Path(scratch) / "graph"), EagerRunner(module.model)
        expected = eager(batch)
        singles = [runner(image.unsqueeze(0)) for image in batch]
        results = {}
        for mode, exported in (
            ("single", (np.concatenate([s for s, _ in singles]), np.concatenate([m for _, m in singles]))),
            ("batch", runner(batch)),
        ):
            difference = compare_outputs(exported, expected)
            results[mode] = {
                "map_abs": float(np.abs(exported[1] - expected[1]).max()),
                "score_abs": float(np.abs(exported[0] - expected[0]).max()),
                "map_relative": difference.map_relative,
                "score_relative": difference.score_relative,
            }
        map_range = float(expected[1].max() - expected[1].min())
        reference = copy.deepcopy(module.model).double()  # the model's own float32 noise: eager against float64
        with torch.inference_mode():
            output = reference(batch.double())
        results["float64"] = {
            "map_abs": float(np.abs(expected[1] - output.anomaly_map.numpy()).max()),
            "score_abs": float(np.abs(expected[0] - output.pred_score.numpy()).max()),
        }
    return {"export_s": export_s, "map_range": map_range, "images": len(paths), **results}


def run_worker(case: dict[str, Any], isa: str, dataset: Path, images: int) -> dict[str, Any]:
    """Run :func:`measure` in a new process under one instruction set.

    Args:
        case: One entry of :func:`cases`.
        isa: ``default``, ``avx2`` or ``avx512``.
        dataset: The demo dataset.
        images: Images compared.

    Returns:
        The worker's measurement, or ``{"error": ...}``.
    """
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "ONEDNN_MAX_CPU_ISA": ISAS[isa], "UAS_OFFLINE": "1"}
    command = [sys.executable, __file__, "--worker", json.dumps(case), "--dataset", str(dataset), "--images"]
    result = subprocess.run([*command, str(images)], env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table.

    Args:
        rows: ``{"case", "isa", **measurement}``.

    Returns:
        The table.
    """
    lines = [
        "| model | ISA | map range | graph map diff | / range | graph score diff | / abs(score) "
        "| eager f32 map diff to f64 | eager f32 score diff to f64 | export s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['isa']} | {row['error']} | | | | | | | |")
            continue
        worst = {key: max(row["single"][key], row["batch"][key]) for key in row["single"]}
        lines.append(
            f"| {row['case']} | {row['isa']} | {row['map_range']:.3g} | {worst['map_abs']:.2e} | "
            f"{worst['map_relative']:.2e} | {worst['score_abs']:.2e} | {worst['score_relative']:.2e} | "
            f"{row['float64']['map_abs']:.2e} | {row['float64']['score_abs']:.2e} | {row['export_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help="Demo dataset at 256 px (generated when not given).")
    parser.add_argument("--images", type=int, default=6, help="Test images compared per case (%(default)s).")
    parser.add_argument("--parity", type=Path, help="shared/parity folder (UAS_PARITY_DIR or ../shared/parity).")
    parser.add_argument("--metauas-checkpoints", type=Path, nargs="*", default=[], help="Offline-recipe files.")
    parser.add_argument("--isa", nargs="+", choices=list(ISAS), default=list(ISAS))
    parser.add_argument("--models", nargs="+", default=["metauas", "inctrl", "faprompt", "nearest_patch"])
    parser.add_argument("--only", help="Run only the cases whose name contains this text (e.g. offline).")
    parser.add_argument("--output", type=Path, help="Also write the Markdown results here.")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker), args.dataset, args.images)))
        return
    sys.path.insert(0, str(REPO / "scripts"))
    from official_files import DEFAULT_PARITY, FILES, write_official_files

    from anomalib_uas.data import generate_demo_dataset
    from anomalib_uas.models import get_spec
    from anomalib_uas.params import load_params

    flags = cpu_flags()
    runnable = [isa for isa in args.isa if CPU_FLAGS[isa] is None or CPU_FLAGS[isa] in flags]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dataset = args.dataset or generate_demo_dataset(root / "demo", categories=[CATEGORY], image_size=256, seed=0)
        write_official_files(args.parity or DEFAULT_PARITY, root / "weights", tuple(set(args.models) & set(FILES)))
        official = {model: root / "weights" / files[0] for model, files in FILES.items()}
        official["faprompt_clip"] = root / "weights" / FILES["faprompt"][1]
        params = load_params(REPO / "params.yaml")
        official["nearest_patch"] = get_spec("nearest_patch").fetch("imagenet", params, root, root).checkpoint
        rows = []
        for case in cases(official, args.metauas_checkpoints):
            if case["model"] not in args.models or (args.only and args.only not in case["name"]):
                continue
            for isa in runnable:
                row = {"case": case["name"], "isa": isa, **run_worker(case, isa, dataset, args.images)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    skipped = sorted(set(args.isa) - set(runnable))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    header = (
        f"CPU: {cpu}, {os.cpu_count()} cores; instruction sets not on this CPU, not run: {skipped or 'none'}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.1f}"
    )
    text = f"{header}\n\n{table(rows)}\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
