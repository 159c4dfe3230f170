# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""CPU latency and peak memory of the FAPrompt torch model, with and without the cached static text features.

The model is the official FAPrompt architecture (open_clip ``ViT-L-14-336`` with QuickGELU, V-V attention in the
last 19 blocks, input 518 px, the full prompt learner) with random weights, which is enough for timing. Two paths
run side by side, interleaved call by call so that a disturbance from other processes hits both alike:

* **cached**: ``model(images)`` in eval mode; the static (prior-free) text features are encoded once and reused,
  only the ten abnormal prompts with each image's prior are encoded per call;
* **uncached**: the same call after ``model.clear_text_cache()``, so the normal prompt and the ten static abnormal
  prompts are encoded again on every call (what the official test loop does).

Each value is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, in seconds per image. The
peak memory (max RSS) of the deployed configuration (cached, batch 1) is measured in a separate process started
through a trampoline (a direct child would inherit this process's ``ru_maxrss``); the peak of the benchmark process
itself is reported next to it. The Markdown report is printed and written to ``benchmarks/results/faprompt_speed.md``.

With ``--bf16-matmul`` a third path times the cached call with oneDNN computing the float32 matmuls in bfloat16
(AMX on recent Intel CPUs); it is approximate, not the default, and its deviation from float32 is reported.

Run it from the repository root:

    python benchmarks/faprompt_speed.py
    python benchmarks/faprompt_speed.py --threads 4 --repeats 5 --batches 1 2 --bf16-matmul
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from anomalib_uas.models.faprompt.torch_model import FAPromptModel

CLIP_MODEL = "ViT-L-14-336"
IMAGE_SIZE = 518
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "faprompt_speed.md"
LATENCY_TARGET_S = 6.0
MEMORY_TARGET_BYTES = 4.3e9
OFFICIAL_S = 12.0  # the official test-time code on the same kind of CPU, 2 threads (parity fixture README)
PROBE_CALLS = 3
TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:], check=False).returncode)"
DESCRIPTIONS = {
    "cached": "cached static text",
    "uncached": "uncached (static text encoded per call)",
    "cached_bf16_matmul": "cached, oneDNN matmuls in bf16 (approximate)",
}


@contextlib.contextmanager
def bf16_matmul() -> Iterator[None]:
    """Let oneDNN compute float32 matmuls in bfloat16 (AMX) inside the block.

    Yields:
        Nothing.
    """
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and batch size (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per path before timing (default 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--dap", choices=("topk", "first"), default="topk", help="DAP patch selection")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report to write")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the peak-memory subprocess")
    parser.add_argument(
        "--bf16-matmul",
        action="store_true",
        help="also time the cached path with oneDNN float32 matmuls in bfloat16 (AMX; approximate, not default)",
    )
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip-model", default=CLIP_MODEL, help=argparse.SUPPRESS)  # smoke tests of the script
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or min(args.batches) < 1:
        parser.error("--repeats, --threads and --batches must be positive and --warmup non-negative")
    return args


def cpu_model() -> str:
    """Name of the CPU.

    Returns:
        The first ``model name`` of ``/proc/cpuinfo``, else what :mod:`platform` knows.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Returns:
        ``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_model(dap: str, clip_model: str = CLIP_MODEL) -> FAPromptModel:
    """The official FAPrompt architecture with random weights.

    Args:
        dap: DAP patch selection.
        clip_model: open_clip model name.

    Returns:
        The model in eval mode.
    """
    torch.manual_seed(0)
    return FAPromptModel(clip_model, clip_pretrained=None, image_size=IMAGE_SIZE, dap_patch_selection=dap).eval()


def images_of(batch: int, seed: int) -> torch.Tensor:
    """Random stand-ins for CLIP-normalised images.

    Args:
        batch: Number of images.
        seed: Random seed.

    Returns:
        ``[batch, 3, 518, 518]`` float32.
    """
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def time_interleaved(
    runners: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Time several callables round-robin and take each one's median wall and process CPU time.

    Args:
        runners: Callables to time, by name.
        warmup: Untimed calls of each callable first.
        repeats: Timed calls of each callable.

    Returns:
        Median wall seconds and median CPU seconds (all threads of this process) per call, by name.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start, cpu = time.perf_counter(), time.process_time()
            runner()
            samples[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return {
        name: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        for name, values in samples.items()
    }


def run_memory_probe(dap: str) -> None:
    """Child-process mode: build the model, run the cached path at batch 1 and print the peak RSS as JSON.

    Args:
        dap: DAP patch selection.
    """
    after_imports = max_rss_bytes()
    model = build_model(dap)
    images = images_of(1, seed=1)
    with torch.inference_mode():
        for _ in range(PROBE_CALLS):
            model(images)
    print(json.dumps({"max_rss": max_rss_bytes(), "after_imports": after_imports}))


def measure_peak_memory(args: argparse.Namespace) -> dict[str, int] | str:
    """Run :func:`run_memory_probe` in a fresh Python process started through :data:`TRAMPOLINE`.

    Args:
        args: Command-line options (threads, DAP selection).

    Returns:
        ``max_rss`` and ``after_imports`` in bytes, or why the probe failed.
    """
    probe = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", "--threads", str(args.threads)]
    command = [sys.executable, "-c", TRAMPOLINE, *probe, "--dap", args.dap]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as error:
        return f"probe exited with {error.returncode}: {' '.join(error.stderr.split()[-30:])}"
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        return f"probe failed: {type(error).__name__}: {error}"


def report(
    args: argparse.Namespace,
    seconds: dict[int, dict[str, float]],
    cpu_seconds: dict[int, dict[str, float]],
    deviation: dict[str, float],
    memory: dict[str, int] | str | None,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    """Format the Markdown report.

    Args:
        args: Command-line options.
        seconds: Median wall seconds per image, by batch size and path.
        cpu_seconds: Median process CPU seconds per image, by batch size and path.
        deviation: Max abs differences of the bf16-matmul path from float32 (empty when it did not run).
        memory: Result of the memory probe, ``None`` when skipped.
        loads: Load averages before and after the run.

    Returns:
        The report.
    """
    now = datetime.now(tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# FAPrompt CPU speed",
        "",
        f"- date: {now}; CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
        f"{args.threads} threads",
        f"- model: `{args.clip_model}` (QuickGELU, V-V attention in the last 19 blocks) at {IMAGE_SIZE} px, random "
        f"weights, DAP `{args.dap}`; median of {args.repeats} calls after {args.warmup} warm-up call(s), the "
        "paths interleaved call by call",
        f"- load average before / after: {' '.join(f'{x:.2f}' for x in loads[0])} / "
        f"{' '.join(f'{x:.2f}' for x in loads[1])} (well above the thread count means other processes shared "
        "the CPU and the times are inflated)",
        "",
        "| batch | path | wall s/img | CPU s/img (all threads) | wall / cached |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, values in seconds.items():
        for name, value in values.items():
            lines.append(
                f"| {batch} | {DESCRIPTIONS[name]} | {value:.2f} | {cpu_seconds[batch][name]:.2f} | "
                f"{value / values['cached']:.3f} |"
            )
    if deviation:
        lines += [
            "",
            f"bf16-matmul deviation from float32 (max abs, batch {min(seconds)}): anomaly map "
            f"{deviation['anomaly_map']:.1e}, image score {deviation['pred_score']:.1e}.",
        ]
    lines += [
        "",
        f"CPU seconds / {args.threads} threads is the wall time the same work takes when no other process "
        "competes for the cores (an estimate; OpenMP spin-waiting counts as CPU time).",
    ]
    lines += ["", "| target | limit | measured | met |", "|---|---:|---:|:---:|"]
    first = seconds[min(seconds)]["cached"]
    lines.append(
        f"| latency, cached, batch {min(seconds)} | <= {LATENCY_TARGET_S:.1f} s/img (official code "
        f"~{OFFICIAL_S:.0f} s) | {first:.2f} s | {'yes' if first <= LATENCY_TARGET_S else 'no'} |"
    )
    if isinstance(memory, dict):
        peak = memory["max_rss"]
        lines.append(
            f"| peak RSS (separate process: build + {PROBE_CALLS} cached calls, batch 1) | <= "
            f"{MEMORY_TARGET_BYTES / 1e9:.1f} GB | {peak / 1e9:.2f} GB | "
            f"{'yes' if peak <= MEMORY_TARGET_BYTES else 'no'} |"
        )
        lines += ["", f"Peak RSS after imports only: {memory['after_imports'] / 1e9:.2f} GB."]
    elif memory is not None:
        lines.append(f"| peak RSS | <= {MEMORY_TARGET_BYTES / 1e9:.1f} GB | {memory} | no |")
    lines.append(f"Peak RSS of the benchmark process (all paths and batches): {max_rss_bytes() / 1e9:.2f} GB.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write the report.

    Args:
        argv: Command-line arguments without the program name.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        run_memory_probe(args.dap)
        return
    load_before = os.getloadavg()
    memory = None if args.skip_memory else measure_peak_memory(args)
    print(f"peak memory probe: {memory}", flush=True)
    model = build_model(args.dap, args.clip_model)
    seconds: dict[int, dict[str, float]] = {}
    cpu_seconds: dict[int, dict[str, float]] = {}
    deviation: dict[str, float] = {}
    for batch in args.batches:
        images = images_of(batch, seed=2)

        def uncached(images: torch.Tensor = images) -> object:
            model.clear_text_cache()
            return model(images)

        def cached_bf16(images: torch.Tensor = images) -> object:
            with bf16_matmul():
                return model(images)

        runners = {"cached": lambda images=images: model(images), "uncached": uncached}
        if args.bf16_matmul:
            runners["cached_bf16_matmul"] = cached_bf16
        with torch.inference_mode():
            reference = model(images)  # also fills the cache before the cached path is timed
            if args.bf16_matmul and not deviation:
                approximate = cached_bf16()
                deviation = {
                    name: float((getattr(approximate, name) - getattr(reference, name)).abs().max())
                    for name in ("anomaly_map", "pred_score")
                }
            timed = time_interleaved(runners, args.warmup, args.repeats)
        seconds[batch] = {name: value[0] / batch for name, value in timed.items()}
        cpu_seconds[batch] = {name: value[1] / batch for name, value in timed.items()}
        print(f"[batch {batch}] " + ", ".join(f"{k}: {v:.2f} s/img" for k, v in seconds[batch].items()), flush=True)
    text = report(args, seconds, cpu_seconds, deviation, memory, (load_before, os.getloadavg()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
