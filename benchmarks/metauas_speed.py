# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""CPU speed and memory of the MetaUAS torch model: eager PyTorch (with and without prompt cache) against ONNX Runtime.

The model is the official MetaUAS architecture (EfficientNet-b4 encoder, ``tf_efficientnet_b4``) with random
weights, which is enough for timing. For every image size and batch size three paths run side by side, interleaved
repeat by repeat so that a disturbance from other processes hits all of them alike:

* **eager, cached**: ``model(images)`` with one normal prompt encoded once by ``set_prompts``;
* **eager, uncached**: ``model(images, prompts)`` with one prompt per query, encoded on every call;
* **ONNX Runtime**: the cached path exported with ``torch.onnx.export(..., dynamo=True)`` (dynamic batch if the
  export allows it, else one export per batch size) and run on the CPU execution provider.

Each value is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, given in milliseconds per
image and images per second. The peak memory (max RSS) of the target configuration (b4, one cached prompt,
batch 1) is measured in a separate subprocess per image size, because the peak RSS of this process also holds the
other paths, the exports and the ONNX sessions (the subprocess is started through a trampoline process, as a
direct child would inherit this process's ``ru_maxrss``). The Markdown report is printed and written to
``benchmarks/results/metauas_speed.md``.

Run it from the repository root:

    python benchmarks/metauas_speed.py
    python benchmarks/metauas_speed.py --threads 4 --repeats 10 --sizes 256 --batches 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from anomalib_uas.models.metauas.torch_model import MetaUASModel

if TYPE_CHECKING:
    import onnxruntime as ort

BACKBONE = "tf_efficientnet_b4"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "metauas_speed.md"
# Targets for the official b4 architecture, one cached prompt, batch 1 (the official code: ~130 and ~740 ms).
LATENCY_TARGETS_MS = {256: 85.0, 512: 490.0}
OFFICIAL_MS = {256: 130.0, 512: 740.0}
MEMORY_TARGET_BYTES = 1.8e9
PROBE_CALLS = 5
# A process started straight from this one inherits its peak RSS in ``ru_maxrss`` (Linux keeps the larger of the
# pre-exec and the new peak), so the probe is started through a small Python trampoline that forks it afresh.
TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:], check=False).returncode)"
PATHS = ("eager_cached", "eager_uncached", "onnx")


class CachedPath(nn.Module):
    """The cached-prompt path of :class:`MetaUASModel` as a plain tensor-in, tensors-out module for export.

    Args:
        model: A MetaUAS model in eval mode whose prompt bank is set.
    """

    def __init__(self, model: MetaUASModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images against the cached prompt bank.

        Args:
            images: Normalised images ``[B, 3, H, W]``.

        Returns:
            ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, H, W]``.
        """
        output = self.model(images)
        return output.pred_score, output.anomaly_map


@dataclass
class OnnxModels:
    """Result of exporting the cached path for one image size.

    Attributes:
        paths: ONNX file per batch size; a dynamic-batch export maps every batch size to the same file.
        mode: ``"dynamic batch"`` or ``"static, per batch"``.
        error: Why the export failed (empty when it succeeded).
        seconds: Wall time of the export(s).
    """

    paths: dict[int, Path] = field(default_factory=dict)
    mode: str = ""
    error: str = ""
    seconds: float = 0.0


@dataclass
class Row:
    """Timings of one (image size, batch size) configuration.

    Attributes:
        size: Image side in pixels.
        batch: Batch size.
        ms_per_image: Median milliseconds per image for each path; missing when the path did not run.
        errors: Why a path did not run.
        onnx_max_abs_diff: Largest absolute difference between the ONNX and the eager anomaly maps.
    """

    size: int
    batch: int
    ms_per_image: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    onnx_max_abs_diff: float | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides, multiples of 32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report to write")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the peak-memory subprocesses")
    parser.add_argument("--memory-probe", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(size % 32 for size in args.sizes):
        parser.error("every --sizes value must be a multiple of 32")
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


def vm_hwm_bytes() -> int | None:
    """Peak resident set size of this process image from ``/proc/self/status`` (reset by ``exec``).

    Returns:
        ``VmHWM`` in bytes, or ``None`` where ``/proc`` is missing.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def normalised_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """Random stand-ins for ImageNet-normalised images (zero mean, unit variance per channel).

    Args:
        batch: Number of images.
        size: Image side.
        seed: Random seed.

    Returns:
        A float32 tensor ``[batch, 3, size, size]``.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def build_model() -> MetaUASModel:
    """Build the official MetaUAS architecture with random weights.

    Returns:
        The model in eval mode, without a prompt bank.
    """
    torch.manual_seed(0)
    return MetaUASModel(backbone=BACKBONE, pretrained_backbone=False).eval()


def short_error(error: BaseException, limit: int = 160) -> str:
    """One-line description of an exception, fit for a Markdown table cell.

    Args:
        error: The exception.
        limit: Maximum length.

    Returns:
        ``"Type: message"`` on one line, with pipes escaped and cut to ``limit`` characters.
    """
    text = " ".join(f"{type(error).__name__}: {error}".split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter reports progress on stdout and warns a lot; neither is part of the report.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            path,
            dynamo=True,
            dynamic_shapes=({0: batch},) if dynamic else None,
            input_names=["images"],
            output_names=["pred_score", "anomaly_map"],
            verbose=False,
        )


def export_cached_path(model: MetaUASModel, size: int, batches: Sequence[int], directory: Path) -> OnnxModels:
    """Export the cached path (prompt bank baked in) for one image size.

    A dynamic-batch export is tried first; if it fails, one static export per batch size.

    Args:
        model: Model whose prompt bank holds the prompt of this size.
        size: Image side.
        batches: Batch sizes that will run.
        directory: Where the ONNX files go.

    Returns:
        The exported files, or the reason why there are none.
    """
    wrapper = CachedPath(model).eval()
    start = time.perf_counter()
    result = OnnxModels()
    try:
        path = directory / f"metauas_{size}_dynamic.onnx"
        _export(wrapper, normalised_images(2, size, seed=1), path, dynamic=True)
        result.paths = dict.fromkeys(batches, path)
        result.mode = "dynamic batch"
    except Exception as dynamic_error:  # any export failure is reported, not raised
        print(f"  dynamic-batch export at {size} px failed ({short_error(dynamic_error)}); exporting per batch")
        result.mode = "static, per batch"
        try:
            for batch in batches:
                path = directory / f"metauas_{size}_b{batch}.onnx"
                _export(wrapper, normalised_images(batch, size, seed=1), path, dynamic=False)
                result.paths[batch] = path
        except Exception as static_error:
            result.error = f"dynamic: {short_error(dynamic_error, 100)}; static: {short_error(static_error, 100)}"
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    """Open an ONNX Runtime session on the CPU execution provider.

    Args:
        path: ONNX file.
        threads: Intra-op threads.

    Returns:
        The session, with all graph optimisations enabled and sequential execution.
    """
    import onnxruntime as ort  # imported here so that the memory probe does not load it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_interleaved(runners: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Time several callables round-robin and take each one's median.

    Args:
        runners: Callables to time, by name.
        warmup: Untimed calls of each callable first.
        repeats: Timed calls of each callable.

    Returns:
        Median seconds per call, by name.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def benchmark_size(model: MetaUASModel, size: int, args: argparse.Namespace, directory: Path) -> list[Row]:
    """Time the three paths for every batch size at one image size.

    Args:
        model: The MetaUAS model.
        size: Image side.
        args: Command-line options.
        directory: Where the ONNX exports go.

    Returns:
        One row per batch size.
    """
    model.set_prompts(normalised_images(1, size, seed=0))
    print(f"[{size} px] exporting the cached path to ONNX ...", flush=True)
    exported = export_cached_path(model, size, args.batches, directory)
    status = f"failed: {exported.error}" if exported.error else f"{exported.mode}, {exported.seconds:.1f} s"
    print(f"[{size} px] ONNX export: {status}", flush=True)
    sessions: dict[Path, ort.InferenceSession] = {}
    rows = []
    for batch in args.batches:
        row = Row(size, batch)
        images = normalised_images(batch, size, seed=2)
        prompts = normalised_images(batch, size, seed=3)
        runners: dict[str, Callable[[], object]] = {
            "eager_cached": lambda images=images: model(images),
            "eager_uncached": lambda images=images, prompts=prompts: model(images, prompts),
        }
        if exported.error:
            row.errors["onnx"] = f"export failed: {exported.error}"
        else:
            try:
                path = exported.paths[batch]
                session = sessions[path] = sessions.get(path) or onnx_session(path, args.threads)
                feed = {"images": np.ascontiguousarray(images.numpy())}
                onnx_map = session.run(["anomaly_map"], feed)[0]
                with torch.inference_mode():
                    eager_map = model(images).anomaly_map.numpy()
                row.onnx_max_abs_diff = float(np.abs(onnx_map - eager_map).max())
                runners["onnx"] = lambda session=session, feed=feed: session.run(None, feed)
            except Exception as error:  # a failing session is reported in the table
                row.errors["onnx"] = f"ONNX Runtime failed: {short_error(error)}"
        with torch.inference_mode():
            seconds = time_interleaved(runners, args.warmup, args.repeats)
        row.ms_per_image = {name: value * 1000.0 / batch for name, value in seconds.items()}
        print(f"[{size} px, batch {batch}] " + ", ".join(f"{k}: {v:.1f} ms/img" for k, v in row.ms_per_image.items()))
        rows.append(row)
    return rows


def run_memory_probe(size: int) -> None:
    """Child-process mode: run only the target configuration and print its peak RSS as JSON.

    The configuration is the official b4 architecture, one cached prompt, batch 1, at ``size`` pixels: build the
    model, set the prompt bank, then ``PROBE_CALLS`` inference calls. ``VmHWM`` is printed as a cross-check.

    Args:
        size: Image side.
    """
    after_imports = max_rss_bytes()
    model = build_model()
    model.set_prompts(normalised_images(1, size, seed=0))
    images = normalised_images(1, size, seed=2)
    with torch.inference_mode():
        for _ in range(PROBE_CALLS):
            model(images)
    result = {"size": size, "max_rss": max_rss_bytes(), "after_imports": after_imports}
    hwm = vm_hwm_bytes()
    if hwm is not None:
        result["vm_hwm"] = hwm
    print(json.dumps(result))


def measure_peak_memory(size: int, threads: int) -> dict[str, int] | str:
    """Run :func:`run_memory_probe` in a fresh Python process (started through :data:`TRAMPOLINE`).

    Args:
        size: Image side.
        threads: Torch threads of the child.

    Returns:
        ``max_rss``, ``after_imports`` and (on Linux) ``vm_hwm`` in bytes, or why the probe failed.
    """
    probe = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(size), "--threads", str(threads)]
    command = [sys.executable, "-c", TRAMPOLINE, *probe]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as error:
        return f"probe exited with {error.returncode}: {' '.join(error.stderr.split()[-30:])}"
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        return f"probe failed: {short_error(error)}"


def _cell(row: Row, name: str) -> tuple[str, str]:
    if name not in row.ms_per_image:
        return row.errors.get(name, "n/a"), "n/a"
    ms = row.ms_per_image[name]
    return f"{ms:.1f}", f"{1000.0 / ms:.2f}"


def results_table(rows: Sequence[Row]) -> list[str]:
    """Markdown table of the timings.

    Args:
        rows: One row per configuration.

    Returns:
        The table's lines.
    """
    lines = [
        "| size | batch | eager cached ms/img | img/s | eager uncached ms/img | img/s | ONNX RT ms/img | img/s "
        "| ONNX/eager (cached) | ONNX max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [str(row.size), str(row.batch)]
        for name in PATHS:
            cells.extend(_cell(row, name))
        if "onnx" in row.ms_per_image:
            cells.append(f"{row.ms_per_image['onnx'] / row.ms_per_image['eager_cached']:.2f}")
        else:
            cells.append("n/a")
        cells.append("n/a" if row.onnx_max_abs_diff is None else f"{row.onnx_max_abs_diff:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "**met**" if value <= limit else "**not met**"


def targets_table(rows: Sequence[Row], memory: dict[int, dict[str, int] | str]) -> list[str]:
    """Markdown table comparing the target configuration with the targets.

    Args:
        rows: Timings; the batch-1 rows are the target configuration.
        memory: Peak-memory probe results by image size.

    Returns:
        The table's lines.
    """
    lines = [
        "| target (b4, one cached prompt, batch 1) | limit | official code | eager cached | met (eager) "
        "| ONNX RT | met (ONNX) |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    batch_one = {row.size: row for row in rows if row.batch == 1}
    for size, limit in LATENCY_TARGETS_MS.items():
        row = batch_one.get(size)
        eager = row.ms_per_image.get("eager_cached") if row else None
        onnx = row.ms_per_image.get("onnx") if row else None
        lines.append(
            f"| latency at {size} px | <= {limit:.0f} ms/img | ~{OFFICIAL_MS[size]:.0f} ms/img "
            f"| {'n/a' if eager is None else f'{eager:.1f} ms'} | {_verdict(eager, limit)} "
            f"| {'n/a' if onnx is None else f'{onnx:.1f} ms'} | {_verdict(onnx, limit)} |"
        )
    for size in sorted(memory):
        probe = memory[size]
        if isinstance(probe, str):
            measured, verdict = probe.replace("|", "\\|"), "not measured"
        else:
            peak, imports, hwm = probe["max_rss"], probe["after_imports"], probe.get("vm_hwm")
            cross_check = "" if hwm is None else f", VmHWM {hwm / 1e9:.2f} GB"
            measured = (
                f"{peak / 1e9:.2f} GB ({peak / 2**20:.0f} MiB{cross_check}), after imports {imports / 1e9:.2f} GB"
            )
            verdict = _verdict(peak, MEMORY_TARGET_BYTES)
        lines.append(
            f"| peak process memory (max RSS), {size} px | <= {MEMORY_TARGET_BYTES / 1e9:.1f} GB | n/a "
            f"| {measured} | {verdict} | n/a | n/a |"
        )
    return lines


def header(args: argparse.Namespace, load_before: tuple[float, ...]) -> list[str]:
    """Report header: what ran where.

    Args:
        args: Command-line options.
        load_before: ``os.getloadavg()`` at the start of the run.

    Returns:
        The header's lines.
    """
    import onnxruntime as ort

    load_after = os.getloadavg()
    return [
        "# MetaUAS CPU speed",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- model: `MetaUASModel(backbone={BACKBONE!r}, pretrained_backbone=False)` (official b4 architecture, "
        "random weights), one prompt image of the query size",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), threads: {args.threads} (torch and ONNX Runtime)",
        f"- python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__} "
        "(CPUExecutionProvider)",
        f"- median of {args.repeats} timed calls after {args.warmup} warm-up calls, paths interleaved; "
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        "- eager cached: `model(images)` with `set_prompts`; eager uncached: `model(images, prompts)` with "
        "one prompt per query; ONNX RT: the cached path exported with `torch.onnx.export(dynamo=True)`",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with the hidden ``--memory-probe``, one peak-memory probe).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        run_memory_probe(args.memory_probe)
        return
    load_before = os.getloadavg()
    memory: dict[int, dict[str, int] | str] = {}
    if not args.skip_memory:
        for size in sorted(LATENCY_TARGETS_MS):
            print(f"[{size} px] peak-memory subprocess ...", flush=True)
            memory[size] = measure_peak_memory(size, args.threads)
    model = build_model()
    rows: list[Row] = []
    export_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="metauas_onnx_") as directory:
        for size in args.sizes:
            rows.extend(benchmark_size(model, size, args, Path(directory)))
    for row in rows:
        if "onnx" in row.errors:
            export_notes.append(f"- {row.size} px, batch {row.batch}: {row.errors['onnx']}")
    report = [
        *header(args, load_before),
        "",
        "## Throughput",
        "",
        *results_table(rows),
        "",
        "ms/img: median batch time divided by the batch size. ONNX/eager < 1 means ONNX Runtime is faster.",
        *(["", "ONNX problems:", "", *export_notes] if export_notes else []),
        "",
        "## Targets",
        "",
        *targets_table(rows, memory),
        "",
        "Peak memory: `ru_maxrss` of a separate Python process that only builds the model, sets one prompt and "
        f"runs {PROBE_CALLS} batch-1 calls at that size (imports included).",
    ]
    text = "\n".join(report) + "\n"
    print()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
