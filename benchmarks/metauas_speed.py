# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""CPU speed and memory of the MetaUAS torch model against the official MetaUAS code, side by side in one run.

Both models get the same official-format weights (the shared parity fixture: the official architecture,
EfficientNet-b4, with synthetic weights) and the same images (the fixture's query and prompt images, repeated to
the batch size). Per image size and batch size these paths run interleaved, call by call, so that a disturbance
from other processes hits all of them alike:

* **official**: the official forward, ``model({"query_image": q, "prompt_image": p})`` on images in ``[0, 1]``:
  normalisation, the encoder on the queries and on the prompts, alignment, decoder, sigmoid;
* **ours, uncached**: the same work with ``MetaUASModel``: ``model(normalize(q), normalize(p))``;
* **ours, cached**: ``model(normalize(q))`` with the prompt encoded once by ``set_prompts``;
* **ONNX Runtime** (``--onnx``): the cached path exported with ``torch.onnx.export(..., dynamo=True)``.

All run under ``torch.no_grad()``; the largest difference of each path's anomaly map from the official one is
reported. The official model comes from ``--official-repo`` (a checkout of gaobb/MetaUAS with its requirements,
the smp fork, importable), else from a stand-in written from the reference spec on the PyPI release of
segmentation-models-pytorch (``--official-deps``: a folder it is installed in with
``pip install --no-deps --target DIR segmentation-models-pytorch==0.6.0``): smp's lukemelas EfficientNet-b4
encoder with the padding of efficientnet-pytorch 0.6.3 (static "same" padding computed for 380 px in every
layer), the official soft alignment (two einsums, unscaled softmax, ``einops`` concatenation) and the fork's UNet
decoder wiring from smp's decoder blocks. Before timing, the stand-in is checked against the outputs of the real
official code stored in the parity fixture.

Each value is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, in milliseconds per
image. Peak memory (max RSS) of each path at batch 1 is measured in its own fresh Python process per image size
(imports included, and the increment over the imports), started through a trampoline process because a direct
child would inherit this process's ``ru_maxrss``; the official probe imports what the official ``metauas.py``
imports. The Markdown report is printed and written to ``benchmarks/results/metauas_speed.md``.

Run it from the repository root:

    python benchmarks/metauas_speed.py --official-deps /tmp/official-deps
    python benchmarks/metauas_speed.py --official-repo ../MetaUAS --sizes 256 --batches 1 --skip-memory
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
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
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime as ort

    from anomalib_uas.models.metauas.torch_model import MetaUASModel

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "metauas_speed.md"
DEFAULT_PARITY = Path(os.environ.get("UAS_PARITY_DIR", REPO.parent / "shared" / "parity"))
BACKBONE = "tf_efficientnet_b4"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPEEDUP_TARGET = 1.5
PROBE_CALLS = 5
# Environment variables that limit the instruction set (to emulate an AVX2-only CPU), shown in the report.
ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# Third-party modules the official metauas.py imports at the top: the official probe imports them too.
OFFICIAL_IMPORTS = ("kornia", "matplotlib.pyplot", "pytorch_lightning", "tqdm", "cv2", "PIL.Image", "einops")
# A process started straight from this one inherits its peak RSS in ``ru_maxrss`` (Linux keeps the larger of the
# pre-exec and the new peak), so the probe is started through a small Python trampoline that forks it afresh.
TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:], check=False).returncode)"
PATHS = ("official", "ours_uncached", "ours_cached", "onnx")
PROBED = ("official", "ours_uncached", "ours_cached")


def official_stand_in() -> nn.Module:
    """Build the official MetaUAS network from the PyPI segmentation-models-pytorch (see the module docstring).

    Returns:
        A module with the official state_dict keys whose forward takes ``{"query_image", "prompt_image"}`` in
        ``[0, 1]`` and returns the sigmoid map ``[B, 1, H, W]``.
    """
    from einops import rearrange
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
    from segmentation_models_pytorch.encoders import get_encoder
    from segmentation_models_pytorch.encoders._efficientnet import Conv2dStaticSamePadding
    from torchvision import transforms

    class SoftAlignment(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.alignment_layer = nn.Module()
            self.alignment_layer.dimensionality_reduction = nn.Conv2d(channels, channels // 2, 1)

        def forward(self, query: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
            project = self.alignment_layer.dimensionality_reduction
            similarity = torch.einsum("bcij,bckl->bijkl", project(query), project(prompt))
            weights = rearrange(similarity, "b i j k l -> b i j (k l)").softmax(dim=3)
            aligned = torch.einsum("bijp,bcp->bcij", weights, rearrange(prompt, "b c h w -> b c (h w)"))
            return rearrange([query, aligned], "two b c h w -> b (two c) h w")

    class ForkUnetDecoder(nn.Module):
        # The fork's wiring: 2 x 448 input, the two deepest skips doubled, no SCSE in the block without a skip.
        def __init__(self) -> None:
            super().__init__()
            wiring = zip((896, 256, 128, 64, 64), (320, 112, 32, 48, 0), (256, 128, 64, 64, 48), strict=True)
            self.blocks = nn.ModuleList(
                UnetDecoderBlock(i, s, o, attention_type="scse" if s else None) for i, s, o in wiring
            )

        def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
            sizes = [f.shape[2:] for f in reversed(features)]
            deepest_first = features[1:][::-1]
            x = deepest_first[0]
            for index, block in enumerate(self.blocks):
                skip = deepest_first[index + 1] if index + 1 < len(deepest_first) else None
                x = block(x, sizes[index + 1][0], sizes[index + 1][1], skip)
            return x

    class OfficialMetaUAS(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = get_encoder("efficientnet-b4", in_channels=3, depth=5, weights=None)
            size = self.encoder._global_params.image_size  # 380: 0.6.3 pads every layer as if it saw 380 px
            for conv in self.encoder.modules():
                if isinstance(conv, Conv2dStaticSamePadding):
                    pads: list[int] = []
                    for kernel, stride in zip(conv.kernel_size[::-1], conv.stride[::-1], strict=True):
                        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                        pads += [total // 2, total - total // 2]
                    conv.static_padding = nn.ZeroPad2d(tuple(pads)) if any(pads) else nn.Identity()
            self.preprocess = transforms.Normalize(MEAN, STD)
            self.alignment = nn.ModuleList(SoftAlignment(c) for c in (448, 160, 56))
            self.decoder = ForkUnetDecoder()
            self.mask_head = nn.Conv2d(48, 1, 1)

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            query = self.preprocess(batch["query_image"])
            prompt = self.preprocess(batch["prompt_image"])
            with torch.no_grad():
                query_features = self.encoder(query)
                prompt_features = self.encoder(prompt)
            for index, align in enumerate(self.alignment):
                query_features[-1 - index] = align(query_features[-1 - index], prompt_features[-1 - index])
            return self.mask_head(self.decoder(query_features)).sigmoid()

    return OfficialMetaUAS()


def official_from_repo(repo: Path) -> nn.Module:
    """Build the official ``MetaUAS`` from a checkout of gaobb/MetaUAS (its smp fork must be importable).

    Args:
        repo: The checkout (the folder holding ``metauas.py``).

    Returns:
        The official module; its encoder is built without downloading ImageNet weights.
    """
    sys.path.insert(0, str(repo))
    metauas = importlib.import_module("metauas")
    build_encoder = metauas.get_encoder
    metauas.get_encoder = lambda *args, **kwargs: build_encoder(*args, **{**kwargs, "weights": None})
    return metauas.MetaUAS("efficientnet-b4", "unet", 5, 5, 3, "sa", "cat")


def load_official(args: argparse.Namespace, state_dict: dict[str, torch.Tensor]) -> tuple[nn.Module, str]:
    """The official model with the benchmark weights, in eval mode.

    Args:
        args: Command-line options (``--official-repo``, ``--official-deps``).
        state_dict: Official-format weights.

    Returns:
        The model and a description of where it came from.
    """
    if args.official_repo is not None:
        model, source = official_from_repo(args.official_repo), f"official code from {args.official_repo}"
    else:
        model = official_stand_in()
        from segmentation_models_pytorch import __version__ as smp_version

        source = f"stand-in on segmentation-models-pytorch {smp_version} (see the script's docstring)"
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), source


def load_ours(state_dict: dict[str, torch.Tensor]) -> MetaUASModel:
    """Our model with the benchmark weights, mapped as ``MetaUAS.from_official_checkpoint`` maps them.

    Args:
        state_dict: Official-format weights.

    Returns:
        ``MetaUASModel(backbone="tf_efficientnet_b4")`` in eval mode, without a prompt bank.

    Raises:
        RuntimeError: The weights do not fit.
    """
    from anomalib_uas.models.metauas.checkpoint import from_official
    from anomalib_uas.models.metauas.torch_model import MetaUASModel

    model = MetaUASModel(backbone=BACKBONE, pretrained_backbone=False)
    missing, unexpected = model.load_state_dict(from_official(state_dict, model), strict=False)
    if unexpected or any(not key.startswith("prompt_bank_") for key in missing):
        msg = f"the official weights do not fit MetaUASModel: missing {missing[:3]}, unexpected {unexpected[:3]}"
        raise RuntimeError(msg)
    return model.eval()


def parity_module(parity_dir: Path) -> ModuleType:
    """Import the fixture's ``weights.py`` (deterministic synthetic state_dicts).

    Args:
        parity_dir: The shared parity folder.

    Returns:
        The module.
    """
    spec = importlib.util.spec_from_file_location("parity_weights", parity_dir / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_weights(parity_dir: Path) -> dict[str, torch.Tensor]:
    """The parity fixture's official-format state_dict (all 820 tensors of the official model).

    Args:
        parity_dir: The shared parity folder.

    Returns:
        The state_dict.
    """
    weights = parity_module(parity_dir)
    return weights.make_state_dict(weights.load_spec(parity_dir / "metauas" / "spec.json"), seed=0)


def fixture_images(parity_dir: Path, size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's first query and prompt image at ``size`` (256 or 512), in ``[0, 1]``, repeated ``batch`` times.

    Args:
        parity_dir: The shared parity folder.
        size: 256 or 512.
        batch: Batch size.

    Returns:
        ``(queries, prompts)``, each ``[batch, 3, size, size]``.
    """
    inputs = np.load(parity_dir / "metauas" / "inputs.npz")
    suffix = "" if size == 256 else f"_{size}"
    query, prompt = (torch.from_numpy(inputs[f"{name}{suffix}"][:1]) for name in ("query_image", "prompt_image"))
    return query.repeat(batch, 1, 1, 1), prompt.repeat(batch, 1, 1, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation, as the pre-processor of ``MetaUAS`` applies it.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.

    Returns:
        The normalised images.
    """
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def check_against_official_outputs(official: nn.Module, parity_dir: Path) -> dict[int, float]:
    """Largest difference between ``official`` and the real official code's outputs stored in the fixture.

    Args:
        official: The official model (or stand-in) with the fixture weights.
        parity_dir: The shared parity folder.

    Returns:
        Max abs difference of the anomaly maps by image size.
    """
    inputs = np.load(parity_dir / "metauas" / "inputs.npz")
    expected = np.load(parity_dir / "metauas" / "expected.npz")
    result = {}
    with torch.no_grad():
        for size, suffix in ((256, ""), (512, "_512")):
            batch = {key: torch.from_numpy(inputs[f"{key}{suffix}"]) for key in ("query_image", "prompt_image")}
            result[size] = float(np.abs(official(batch).numpy() - expected[f"anomaly_map{suffix}"]).max())
    return result


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
        max_abs_diff: Largest absolute difference of each path's anomaly map from the official one.
        errors: Why a path did not run.
    """

    size: int
    batch: int
    ms_per_image: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path and configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], choices=(256, 512), help="image sides")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--official-repo", type=Path, help="checkout of gaobb/MetaUAS with the smp fork importable")
    parser.add_argument("--official-deps", type=Path, help="folder with segmentation-models-pytorch 0.6.0 installed")
    parser.add_argument("--parity-dir", type=Path, default=DEFAULT_PARITY, help="the shared parity fixture folder")
    parser.add_argument("--onnx", action="store_true", help="also time the cached path in ONNX Runtime")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report to write")
    parser.add_argument("--append", action="store_true", help="append the report to --output (e.g. a second ISA)")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the peak-memory subprocesses")
    parser.add_argument("--memory-probe", choices=PROBED, help=argparse.SUPPRESS)
    parser.add_argument("--probe-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or min(args.batches) < 1:
        parser.error("--repeats, --threads and --batches must be positive and --warmup non-negative")
    if not (args.parity_dir / "metauas" / "spec.json").is_file():
        parser.error(f"no MetaUAS parity fixture in {args.parity_dir}: pass --parity-dir (the shared/parity folder)")
    if args.official_repo is not None and not (args.official_repo / "metauas.py").is_file():
        parser.error(f"--official-repo {args.official_repo} has no metauas.py: pass a checkout of gaobb/MetaUAS")
    if args.official_deps is not None:
        sys.path.insert(0, str(args.official_deps))
    if args.official_repo is None and importlib.util.find_spec("segmentation_models_pytorch") is None:
        parser.error(
            "segmentation_models_pytorch is not importable: run `pip install --no-deps --target /tmp/official-deps "
            "segmentation-models-pytorch==0.6.0` and pass --official-deps /tmp/official-deps"
        )
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
        _export(wrapper, torch.randn(2, 3, size, size), path, dynamic=True)
        result.paths = dict.fromkeys(batches, path)
        result.mode = "dynamic batch"
    except Exception as dynamic_error:  # any export failure is reported, not raised
        print(f"  dynamic-batch export at {size} px failed ({short_error(dynamic_error)}); exporting per batch")
        result.mode = "static, per batch"
        try:
            for batch in batches:
                path = directory / f"metauas_{size}_b{batch}.onnx"
                _export(wrapper, torch.randn(batch, 3, size, size), path, dynamic=False)
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
    for _ in range(warmup):
        for runner in runners.values():
            runner()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def add_onnx(
    row: Row, ours: MetaUASModel, exported: OnnxModels, sessions: dict, images: torch.Tensor, threads: int
) -> Callable[[], object] | None:
    """Open the ONNX session of this batch size and check it; failures go into ``row.errors``.

    Args:
        row: The configuration's row (gets the ONNX difference from the official map or the error).
        ours: Our model with the prompt bank of this size (its map is the reference for the ONNX map).
        exported: The exports of this size.
        sessions: Open sessions by file, shared between batch sizes.
        images: Normalised query images.
        threads: Intra-op threads.

    Returns:
        The ONNX runner, or ``None`` when it cannot run.
    """
    if exported.error:
        row.errors["onnx"] = f"export failed: {exported.error}"
        return None
    try:
        path = exported.paths[row.batch]
        session = sessions[path] = sessions.get(path) or onnx_session(path, threads)
        feed = {"images": np.ascontiguousarray(images.numpy())}
        onnx_map = session.run(["anomaly_map"], feed)[0]
        row.max_abs_diff["onnx"] = float(np.abs(onnx_map - ours(images).anomaly_map.numpy()).max())
    except Exception as error:  # a failing session is reported in the table
        row.errors["onnx"] = f"ONNX Runtime failed: {short_error(error)}"
        return None
    return lambda: session.run(None, feed)


def benchmark_size(
    official: nn.Module, ours: MetaUASModel, size: int, args: argparse.Namespace, directory: Path
) -> list[Row]:
    """Time the paths for every batch size at one image size.

    Args:
        official: The official model.
        ours: Our model.
        size: Image side.
        args: Command-line options.
        directory: Where the ONNX exports go.

    Returns:
        One row per batch size.
    """
    _, prompt = fixture_images(args.parity_dir, size, 1)
    ours.set_prompts(normalize(prompt))
    exported = OnnxModels()
    if args.onnx:
        print(f"[{size} px] exporting the cached path to ONNX ...", flush=True)
        exported = export_cached_path(ours, size, args.batches, directory)
    sessions: dict[Path, ort.InferenceSession] = {}
    rows = []
    for batch in args.batches:
        row = Row(size, batch)
        queries, prompts = fixture_images(args.parity_dir, size, batch)
        runners: dict[str, Callable[[], Any]] = {
            "official": lambda q=queries, p=prompts: official({"query_image": q, "prompt_image": p})[:, 0],
            "ours_uncached": lambda q=queries, p=prompts: ours(normalize(q), normalize(p)).anomaly_map,
            "ours_cached": lambda q=queries: ours(normalize(q)).anomaly_map,
        }
        with torch.no_grad():
            reference = runners["official"]()
            for name in ("ours_uncached", "ours_cached"):
                row.max_abs_diff[name] = float((runners[name]() - reference).abs().max())
            if args.onnx and (runner := add_onnx(row, ours, exported, sessions, normalize(queries), args.threads)):
                runners["onnx"] = runner
            seconds = time_interleaved(runners, args.warmup, args.repeats)
        row.ms_per_image = {name: value * 1000.0 / batch for name, value in seconds.items()}
        print(f"[{size} px, batch {batch}] " + ", ".join(f"{k}: {v:.1f} ms/img" for k, v in row.ms_per_image.items()))
        rows.append(row)
    return rows


def run_memory_probe(args: argparse.Namespace) -> None:
    """Child-process mode: one path at batch 1, then its peak RSS as JSON.

    The official probe first imports what the official ``metauas.py`` imports (those installed) and the official
    model's package; ours imports ``anomalib_uas.models.metauas.torch_model``. Then the model is built with the
    fixture weights and ``PROBE_CALLS`` calls run (the cached path sets its prompt first).

    Args:
        args: Command-line options with ``memory_probe`` (the path) and ``probe_size``.
    """
    path, size = args.memory_probe, args.probe_size
    if path == "official":
        for name in OFFICIAL_IMPORTS:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        importlib.import_module("segmentation_models_pytorch")
    else:
        importlib.import_module("anomalib_uas.models.metauas.torch_model")
    after_imports = max_rss_bytes()
    state_dict = official_weights(args.parity_dir)
    model = load_official(args, state_dict)[0] if path == "official" else load_ours(state_dict)
    del state_dict
    query, prompt = fixture_images(args.parity_dir, size, 1)
    with torch.no_grad():
        if path == "ours_cached":
            model.set_prompts(normalize(prompt))
        for _ in range(PROBE_CALLS):
            if path == "official":
                model({"query_image": query, "prompt_image": prompt})
            elif path == "ours_uncached":
                model(normalize(query), normalize(prompt))
            else:
                model(normalize(query))
    result = {"max_rss": max_rss_bytes(), "after_imports": after_imports, "vm_hwm": vm_hwm_bytes()}
    print(json.dumps(result))


def measure_peak_memory(path: str, size: int, args: argparse.Namespace) -> dict[str, int] | str:
    """Run :func:`run_memory_probe` in a fresh Python process (started through :data:`TRAMPOLINE`).

    Args:
        path: ``"official"``, ``"ours_uncached"`` or ``"ours_cached"``.
        size: Image side.
        args: Command-line options (threads, fixture and official-model options are passed on).

    Returns:
        ``max_rss``, ``after_imports`` and ``vm_hwm`` in bytes, or why the probe failed.
    """
    probe = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", path, "--probe-size", str(size)]
    probe += ["--threads", str(args.threads), "--parity-dir", str(args.parity_dir)]
    if args.official_repo is not None:
        probe += ["--official-repo", str(args.official_repo)]
    if args.official_deps is not None:
        probe += ["--official-deps", str(args.official_deps)]
    command = [sys.executable, "-c", TRAMPOLINE, *probe]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as error:
        return f"probe exited with {error.returncode}: {' '.join(error.stderr.split()[-30:])}"
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        return f"probe failed: {short_error(error)}"


def results_table(rows: Sequence[Row]) -> list[str]:
    """Markdown table of the timings, with speed-ups over the official code.

    Args:
        rows: One row per configuration.

    Returns:
        The table's lines.
    """
    lines = [
        "| size | batch | official ms/img | ours uncached ms/img | speed-up | ours cached ms/img | speed-up "
        "| ONNX RT (cached) ms/img | speed-up | max abs diff from official (uncached / cached / ONNX) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        official = row.ms_per_image["official"]
        cells = [str(row.size), str(row.batch), f"{official:.1f}"]
        for name in PATHS[1:]:
            if name in row.ms_per_image:
                ms = row.ms_per_image[name]
                cells += [
                    f"{ms:.1f}",
                    f"**{official / ms:.2f}x**" if name == "ours_uncached" else f"{official / ms:.2f}x",
                ]
            else:
                cells += [row.errors.get(name, "not run").replace("|", "\\|"), ""]
        diffs = [f"{row.max_abs_diff[name]:.1e}" if name in row.max_abs_diff else "-" for name in PATHS[1:]]
        lines.append("| " + " | ".join([*cells, " / ".join(diffs)]) + " |")
    return lines


def memory_table(memory: dict[tuple[str, int], dict[str, int] | str]) -> list[str]:
    """Markdown table of the peak-memory probes.

    Args:
        memory: Probe results by (path, size).

    Returns:
        The table's lines.
    """
    lines = [
        "| size | path | peak RSS | after imports | increment over imports | VmHWM |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for (path, size), probe in sorted(memory.items(), key=lambda item: (item[0][1], PROBED.index(item[0][0]))):
        if isinstance(probe, str):
            lines.append(f"| {size} | {path} | {probe.replace('|', '/')} | | | |")
            continue
        peak, imports, hwm = probe["max_rss"], probe["after_imports"], probe["vm_hwm"]
        lines.append(
            f"| {size} | {path} | {peak / 1e9:.3f} GB | {imports / 1e9:.3f} GB | {(peak - imports) / 1e9:.3f} GB "
            f"| {'n/a' if hwm is None else f'{hwm / 1e9:.3f} GB'} |"
        )
    return lines


def header(args: argparse.Namespace, source: str, load_before: tuple[float, ...], check: dict[int, float]) -> list[str]:
    """Report header: what ran where.

    Args:
        args: Command-line options.
        source: Where the official model came from.
        load_before: ``os.getloadavg()`` at the start of the run.
        check: Max abs difference of the official model from the real official outputs, by size.

    Returns:
        The header's lines.
    """
    overrides = {k: os.environ[k] for k in ISA_OVERRIDES if k in os.environ}
    load_after = os.getloadavg()
    return [
        "# MetaUAS CPU speed: ours against the official code",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), threads: {args.threads}; torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; environment overrides: "
        + (", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none"),
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- official model: {source}; its maps differ from the real official code's stored outputs by at most "
        + ", ".join(f"{v:.1e} ({k} px)" for k, v in check.items()),
        f"- weights: the parity fixture's official-format state_dict; images: the fixture's first query and prompt, "
        f"repeated to the batch size; ours: `MetaUASModel(backbone={BACKBONE!r})` with the weights mapped by "
        "`from_official`",
        f"- median of {args.repeats} timed calls after {args.warmup} warm-up calls, paths interleaved, all under "
        f"`torch.no_grad()`; load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with the hidden ``--memory-probe``, one peak-memory probe).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        run_memory_probe(args)
        return
    load_before = os.getloadavg()
    memory: dict[tuple[str, int], dict[str, int] | str] = {}
    if not args.skip_memory:
        for size in args.sizes:
            for path in PROBED:
                print(f"[{size} px] peak-memory subprocess: {path} ...", flush=True)
                memory[path, size] = measure_peak_memory(path, size, args)
    state_dict = official_weights(args.parity_dir)
    official, source = load_official(args, state_dict)
    check = check_against_official_outputs(official, args.parity_dir)
    print(f"official model: {source}; max abs diff from the stored official outputs: {check}", flush=True)
    ours = load_ours(state_dict)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="metauas_onnx_") as directory:
        for size in args.sizes:
            rows.extend(benchmark_size(official, ours, size, args, Path(directory)))
    goal = [
        f"{row.size} px: {row.ms_per_image['official'] / row.ms_per_image['ours_uncached']:.2f}x"
        for row in rows
        if row.batch == 1
    ]
    report = [
        *header(args, source, load_before, check),
        "",
        "## Speed",
        "",
        *results_table(rows),
        "",
        "ms/img: median batch time divided by the batch size; speed-up: official ms/img divided by the path's. "
        "Official and ours uncached do the same work per call (normalise, encode the queries and their prompts, "
        "align, decode); ours cached encodes the prompt once, before timing.",
        "",
        f"Goal: ours uncached >= {SPEEDUP_TARGET}x the official code at batch 1; measured " + ", ".join(goal) + ".",
    ]
    if memory:
        report += [
            "",
            "## Peak memory (batch 1)",
            "",
            *memory_table(memory),
            "",
            f"Each path in its own fresh process: imports, build with the fixture weights, {PROBE_CALLS} calls. "
            "`after imports` is the peak before the model is built (the official probe imports what the official "
            "`metauas.py` imports; ours imports `anomalib_uas.models.metauas.torch_model`: torch and timm, no "
            "anomalib).",
        ]
    text = "\n".join(report) + "\n"
    print()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a" if args.append else "w") as report_file:
        report_file.write(("\n" if args.append else "") + text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
