# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""CPU speed and memory of the InCTRL torch model: our vectorised, cached path against a straightforward one.

The model is the official architecture (open_clip ``ViT-B-16-plus-240``, 208 M parameters) with random weights,
which is enough for timing, and k = 2 normal prompt images. Two paths score the same query images, interleaved
repeat by repeat so that a disturbance from other processes hits both alike:

* **ours**: ``InCTRLModel.forward`` with the prompt features encoded once (``set_prompts``), the text features
  of the category encoded once (``set_category``) and the patch residual as one batched matrix product;
* **straightforward**: what the official forward does for every query image: encode the k prompt images again,
  encode the 154 + 88 text prompts again (open_clip ``encode_text`` over the full 77-token context) and compute
  the patch residual with a Python loop over the 3 layers and 225 query patches. It gives the same scores (the
  largest difference is reported).

Each value is the median over ``--repeats`` timed calls (``--naive-repeats`` for the slow path) after one
untimed call, in seconds per image. A breakdown times each part on its own (query encoding, prompt encoding,
text encoding with the full and the cut context, loop and vectorised residual). The peak memory (max RSS) of the
target configuration (ours, batch 1) is measured in a separate process, started through a trampoline because a
direct child inherits this process's ``ru_maxrss``. The Markdown report is printed and written to
``benchmarks/results/inctrl_speed.md``.

Run it from the repository root:

    python benchmarks/inctrl_speed.py
    python benchmarks/inctrl_speed.py --threads 4 --repeats 5 --batches 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_uas.models.inctrl.prompts import prompt_texts
from anomalib_uas.models.inctrl.torch_model import TEXT_LOGIT_SCALE, InCTRLModel, _tokenizer

CLIP_MODEL = "ViT-B-16-plus-240"
K_SHOT = 2
CATEGORY = "bottle"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "inctrl_speed.md"
LATENCY_TARGET_S = 0.6
MEMORY_TARGET_BYTES = 4e9
PROBE_CALLS = 3
TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:], check=False).returncode)"


def build_model(seed: int = 0) -> InCTRLModel:
    """The official architecture with random weights, in eval mode.

    Args:
        seed: Seed of the random initialisation.

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    return InCTRLModel(CLIP_MODEL).eval()


def naive_patch_residual(query: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The patch residual of one image as the official code computes it: a loop over layers and query patches.

    Args:
        query: Query patch features ``[L, P, W]``.
        prompts: Prompt patch features ``[L, k * P, W]``.

    Returns:
        ``M`` ``[P]``.
    """
    layers, patches, _ = query.shape
    residual = torch.zeros(patches)
    for layer in range(layers):
        for index in range(patches):
            cosine = F.cosine_similarity(query[layer, index].unsqueeze(0), prompts[layer], dim=-1)
            residual[index] += (0.5 * (1.0 - cosine)).min() / layers
    return residual


def naive_text_features(model: InCTRLModel, category: str) -> torch.Tensor:
    """Text features without any cache, through open_clip's ``encode_text`` over the full context.

    Args:
        model: The model.
        category: Category name.

    Returns:
        ``[2, D]`` normal and anomaly features.
    """
    normal, anomaly = prompt_texts(category)
    tokens = _tokenizer(model.clip_model)(normal + anomaly)
    embeddings = F.normalize(model.clip.encode_text(tokens), dim=-1)
    means = torch.stack([embeddings[: len(normal)].mean(0), embeddings[len(normal) :].mean(0)])
    return F.normalize(means, dim=-1)


@torch.no_grad()
def naive_forward(model: InCTRLModel, images: torch.Tensor, prompts: torch.Tensor, category: str) -> torch.Tensor:
    """Score images one at a time, recomputing prompts and text for each, with the per-patch loop.

    Args:
        model: The model.
        images: Normalised query images ``[B, 3, 240, 240]``.
        prompts: Normalised prompt images ``[k, 3, 240, 240]``.
        category: Category name.

    Returns:
        Final scores ``[B]``.
    """
    scores = []
    for image in images:
        token, patches = model.encode_images(image.unsqueeze(0))
        prompt_tokens, prompt_patches = model.encode_images(prompts)
        text = naive_text_features(model, category)
        layers = prompt_patches.shape[1]
        flat = prompt_patches.transpose(0, 1).reshape(layers, -1, prompt_patches.shape[-1])
        residual = naive_patch_residual(patches[0], flat).unsqueeze(0)
        text_score = (TEXT_LOGIT_SCALE * F.normalize(token, dim=-1) @ text.T).softmax(-1)[:, 1]
        token_ref = model.adapter(prompt_tokens).mean(0, keepdim=True) - model.adapter(token)
        img_ref_score = model.diff_head_ref(token_ref).squeeze(1)
        holistic = text_score[:, None] + img_ref_score[:, None] + residual
        scores.append((model.diff_head(holistic).squeeze(1) + residual.amax(1)) / 2)
    return torch.cat(scores)


def _timed(function: Callable[[], object]) -> tuple[float, float]:
    """Wall time and process CPU time (all threads) of one call.

    Args:
        function: The call.

    Returns:
        Wall seconds and CPU seconds.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _median_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_memory() -> None:
    """Child process: build the target configuration, run a few calls, print the peak RSS as JSON."""
    torch.set_num_threads(int(os.environ.get("INCTRL_BENCH_THREADS", "2")))
    model = build_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.set_prompts(torch.randn(K_SHOT, 3, 240, 240, generator=generator))
        model.set_category(CATEGORY)
        for _ in range(PROBE_CALLS):
            model(torch.randn(1, 3, 240, 240, generator=generator))
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").is_file() else ""
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), None)
    print(json.dumps({"max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vm_hwm": hwm}))


def measure_memory(threads: int) -> dict[str, int | None]:
    """Peak memory of the target configuration in a fresh process.

    Args:
        threads: Torch threads of the probe.

    Returns:
        ``max_rss`` and ``vm_hwm`` in bytes.
    """
    command = [sys.executable, "-c", TRAMPOLINE, sys.executable, str(Path(__file__).resolve()), "--probe"]
    env = {**os.environ, "INCTRL_BENCH_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env, timeout=1800)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> str:
    """Run the benchmark.

    Args:
        args: Parsed command-line arguments.

    Returns:
        The Markdown report.
    """
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = build_model()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randn(K_SHOT, 3, 240, 240, generator=generator)
    with torch.no_grad():
        start = time.perf_counter()
        model.set_prompts(prompts)
        prompt_setup = time.perf_counter() - start
        start = time.perf_counter()
        model.set_category(CATEGORY)
        text_setup = time.perf_counter() - start

    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, 240, 240, generator=generator)
        with torch.no_grad():
            ours_scores = model(images).pred_score
            naive_scores = naive_forward(model, images, prompts, CATEGORY) if batch == 1 else None
            ours, naive = [], []
            for _ in range(max(args.repeats, args.naive_repeats if batch == 1 else 0)):
                if len(ours) < args.repeats:
                    wall, cpu = _timed(lambda images=images: model(images))
                    ours.append((wall / batch, cpu / batch))
                if batch == 1 and len(naive) < args.naive_repeats:
                    naive.append(_timed(lambda images=images: naive_forward(model, images, prompts, CATEGORY)))
        diff = float((ours_scores - naive_scores).abs().max()) if naive_scores is not None else None
        rows.append(
            {
                "batch": batch,
                "ours": statistics.median(wall for wall, _ in ours),
                "ours_cpu": statistics.median(cpu for _, cpu in ours),
                "ours_min": min(wall for wall, _ in ours),
                "naive": statistics.median(wall for wall, _ in naive) if naive else None,
                "naive_cpu": statistics.median(cpu for _, cpu in naive) if naive else None,
                "diff": diff,
            }
        )

    # breakdown of one image's work
    image = torch.randn(1, 3, 240, 240, generator=generator)
    normal, anomaly = prompt_texts(CATEGORY)
    tokens = _tokenizer(CLIP_MODEL)(normal + anomaly)
    with torch.no_grad():
        _, query_patches = model.encode_images(image)
        _, prompt_patches = model.encode_images(prompts)
        flat = F.normalize(prompt_patches, dim=-1).transpose(0, 1).reshape(3, -1, prompt_patches.shape[-1])
        breakdown = {
            "query encoding (1 image)": _median_time(lambda: model.encode_images(image), args.repeats),
            f"prompt encoding ({K_SHOT} images)": _median_time(lambda: model.encode_images(prompts), args.repeats),
            "text encoding, 242 prompts, full 77-token context (open_clip)": _median_time(
                lambda: model.clip.encode_text(tokens), 1
            ),
            "text encoding, 242 prompts, context cut after the last end token (ours)": _median_time(
                lambda: model.encode_text(tokens), 1
            ),
            "patch residual, Python loop over 3 x 225 patches": _median_time(
                lambda: naive_patch_residual(query_patches[0], flat), 1
            ),
            "patch residual, one batched matmul (ours)": _median_time(
                lambda: model.patch_residual(query_patches, flat), args.repeats
            ),
        }
        loop_map = naive_patch_residual(query_patches[0], flat)
        residual_diff = float((model.patch_residual(query_patches, flat)[0] - loop_map).abs().max())
    breakdown["max abs difference of the two patch residual maps"] = residual_diff
    memory = None if args.skip_memory else measure_memory(args.threads)
    load_after = os.getloadavg()
    return report(args, rows, breakdown, memory, prompt_setup, text_setup, load_before, load_after)


def report(
    args: argparse.Namespace,
    rows: list[dict],
    breakdown: dict[str, float],
    memory: dict[str, int | None] | None,
    prompt_setup: float,
    text_setup: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    """Format the Markdown report.

    Args:
        args: Parsed command-line arguments.
        rows: Timings per batch size.
        breakdown: Seconds per part of one image's work.
        memory: Peak memory of the probe, or ``None`` when skipped.
        prompt_setup: Seconds to encode the prompt images once.
        text_setup: Seconds to encode the text prompts of a category once.
        load_before: Load average before the run.
        load_after: Load average after the run.

    Returns:
        The report.
    """
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# InCTRL CPU speed",
        "",
        f"- date: {now}; CPU: {_cpu_name()}; torch threads: {args.threads}; torch {torch.__version__}",
        f"- model: open_clip {CLIP_MODEL} (random weights), k = {K_SHOT} prompts, 240 x 240 input, float32",
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.2f}' for x in load_after)} (shared machine; well above the thread count means the "
        "numbers are inflated)",
        f"- one-off setup of our path: prompt encoding {prompt_setup:.2f} s, text features of a category "
        f"{text_setup:.2f} s",
        f"- medians of {args.repeats} (ours) and {args.naive_repeats} (straightforward) timed calls after one "
        "untimed call",
        "",
        "## Seconds per image",
        "",
        "Wall-clock seconds per image, and in brackets the process CPU seconds per image (all threads). On an idle "
        f"machine wall time is about CPU time / {args.threads}; a ratio near 1 means the cores were shared.",
        "",
        "| batch | ours (cached, vectorised) | ours, fastest call | straightforward (per image: prompts, text, "
        "patch loop) | speed-up | max abs score diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        naive = f"{row['naive']:.2f} ({row['naive_cpu']:.2f})" if row["naive"] is not None else "not run"
        speedup = f"{row['naive'] / row['ours']:.0f}x" if row["naive"] is not None else ""
        diff = f"{row['diff']:.1e}" if row["diff"] is not None else ""
        ours = f"{row['ours']:.3f} ({row['ours_cpu']:.3f})"
        lines.append(f"| {row['batch']} | {ours} | {row['ours_min']:.3f} | {naive} | {speedup} | {diff} |")
    lines += ["", "## Breakdown (seconds, one call)", "", "| part | s |", "|---|---:|"]
    lines += [f"| {name} | {value:.3g} |" for name, value in breakdown.items()]
    target = next(row for row in rows if row["batch"] == min(r["batch"] for r in rows))
    lines += ["", "## Targets", "", "| target | limit | measured | met |", "|---|---:|---:|---|"]
    met = "yes" if target["ours"] <= LATENCY_TARGET_S else "no"
    lines.append(
        f"| latency, ours, batch {target['batch']}, median | <= {LATENCY_TARGET_S} s/image | {target['ours']:.3f} s "
        f"(CPU {target['ours_cpu']:.3f} s; fastest call {target['ours_min']:.3f} s) | {met} |"
    )
    if memory is not None:
        rss = memory["max_rss"]
        met = "yes" if rss <= MEMORY_TARGET_BYTES else "no"
        hwm = f" (VmHWM {memory['vm_hwm'] / 1e9:.2f} GB)" if memory.get("vm_hwm") else ""
        lines.append(f"| peak RSS, ours, batch 1, own process | <= 4 GB | {rss / 1e9:.2f} GB{hwm} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--naive-repeats", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_memory()
        return
    text = run(args)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
