# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""What runs a served model's forward: its exported ONNX graph, and one worker that micro-batches the requests.

At registration, :func:`export_graph` exports the model's torch forward on pre-processed images, with the
registered prompt images and text features baked in, to ONNX with a dynamic batch dimension, and :func:`check_graph`
compares ONNX Runtime's outputs with the eager ones (also for a graph reused from an earlier version). The check
reads the outputs on the scale serving uses them at: anomaly-map differences relative to the maps' range, score
differences relative to the scores' magnitude (:data:`GRAPH_TOLERANCE`), and it counts the labels and mask pixels
that change at the registered thresholds. The served pyfunc runs a checked graph (:class:`GraphRunner`); versions
registered without one run the eager model. The sha256 of the graph's files is recorded at registration
(:func:`graph_digests`) and checked before the graph is served (:func:`verify_graph`): a graph changed, truncated or
replaced in the artifact store, or one that ONNX Runtime cannot read, raises :class:`GraphFileError`.

Every forward of a served model runs in the single thread of a :class:`MicroBatcher`: the query images that wait
together, from any number of concurrent requests, go through one batched forward; a job whose request timed out
or whose client left is dropped before it runs.

Example:
    >>> from anomalib_uas.serving.runtime import GraphRunner, MicroBatcher
    >>> batcher = MicroBatcher(GraphRunner("graph/"))  # doctest: +SKIP
    >>> score, anomaly_map = batcher.submit(image, cancel).result()  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomalib_uas.weights import sha256sum

logger = logging.getLogger(__name__)

__all__ = [
    "GRAPH_TOLERANCE",
    "EagerRunner",
    "GraphDifference",
    "GraphFileError",
    "GraphMismatchError",
    "GraphRunner",
    "GraphTolerance",
    "MicroBatcher",
    "check_graph",
    "compare_outputs",
    "export_graph",
    "graph_digests",
    "verify_graph",
]

GRAPH_FILE = "model.onnx"
GRAPH_INPUT = "images"
GRAPH_OUTPUTS = ("pred_score", "anomaly_map")
MAX_BATCH = 4  # more images per forward gain no speed on the CPU, only activation memory

Outputs = tuple[np.ndarray, np.ndarray]  # scores [B] and anomaly maps [B, H, W]
Forward = Callable[[torch.Tensor], Outputs]


class _ScoreAndMap(nn.Module):
    """The eval-mode forward of a torch model as a pair of tensors (what ONNX exports)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(images)
        return output.pred_score, output.anomaly_map


class EagerRunner:
    """The torch model's own forward on a batch of pre-processed images.

    Args:
        model: The torch model in eval mode, prompts and text features set.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> Outputs:
        """Score a batch.

        Args:
            images: ``[B, 3, H, W]`` pre-processed images.
            prompts: Optional ``[B, k, 3, H, W]`` prompt images replacing the registered ones.

        Returns:
            Scores ``[B]`` and anomaly maps ``[B, H, W]``.
        """
        with torch.inference_mode():
            output = self.model(images) if prompts is None else self.model(images, prompts)
        return output.pred_score.float().numpy(), output.anomaly_map.float().numpy()


class GraphFileError(ValueError):
    """A graph file that is not the one registered (changed, truncated, missing) or that ONNX Runtime cannot read.

    Args:
        path: The file.
        problem: What is wrong with it, in words that follow the path.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem


def graph_digests(folder: Path) -> dict[str, str]:
    """The sha256 of each file of a graph folder, by file name: what a version records of the graph it serves.

    Args:
        folder: The graph folder.

    Returns:
        ``{"model.onnx": "<sha256>", ...}``.
    """
    return {path.name: sha256sum(path) for path in sorted(folder.iterdir()) if path.is_file()}


def verify_graph(folder: Path, digests: Mapping[str, str]) -> None:
    """Check that a graph folder holds the files recorded by :func:`graph_digests`.

    Args:
        folder: The graph folder.
        digests: The recorded sha256 of each file.

    Raises:
        GraphFileError: A recorded file is missing or has another sha256.
    """
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            raise GraphFileError(path, "is missing")
        found = sha256sum(path)
        if found != digest:
            raise GraphFileError(path, f"has sha256 {found[:16]}..., not the {digest[:16]}... registered")


class GraphRunner:
    """An exported graph run by ONNX Runtime on the CPU, with as many threads as torch uses and no memory arena.

    Args:
        path: The graph folder (``model.onnx``, and its weights file when they exceed 2 GB) or the ``.onnx`` file.

    Raises:
        GraphFileError: ONNX Runtime cannot read the graph (a corrupt or truncated file, a missing weights file).
    """

    def __init__(self, path: str | Path) -> None:
        import onnxruntime
        from onnxruntime.capi.onnxruntime_pybind11_state import (
            Fail,
            InvalidArgument,
            InvalidGraph,
            InvalidProtobuf,
            NoSuchFile,
        )

        path = Path(path) / GRAPH_FILE if Path(path).is_dir() else Path(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Without the arena a batch's activations are freed after it (the arena keeps its peak for good: about
        # 1 GB for 8 MetaUAS-b4 images at 256 px); idle threads sleep instead of spinning, leaving the cores to
        # the request threads that decode and encode.
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GraphFileError(path, f"cannot be read by ONNX Runtime ({first})") from error

    def __call__(self, images: torch.Tensor) -> Outputs:
        """Score a batch.

        Args:
            images: ``[B, 3, H, W]`` pre-processed images.

        Returns:
            Scores ``[B]`` and anomaly maps ``[B, H, W]``.
        """
        scores, maps = self.session.run(list(GRAPH_OUTPUTS), {GRAPH_INPUT: images.numpy()})
        return scores, maps


def export_graph(model: nn.Module, images: torch.Tensor, folder: Path) -> Path:
    """Export a torch model's eval forward to ONNX with a dynamic batch dimension.

    Args:
        model: The torch model in eval mode, with its prompts and text features set (they become constants).
        images: Pre-processed images ``[B, 3, H, W]`` (the graph keeps their size); the first two trace the graph.
        folder: Folder to write ``model.onnx`` to (with a separate weights file when they exceed 2 GB).

    Returns:
        ``folder``; check the graph with :func:`check_graph` before serving it.
    """
    wrapper = _ScoreAndMap(model).eval()
    example = images[:2] if len(images) > 1 else torch.cat([images, images.flip(-1)])
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[GRAPH_INPUT],
            output_names=list(GRAPH_OUTPUTS),
            dynamic_shapes=({0: batch_dim},),
            opset_version=18,
            verbose=False,
        )
    folder.mkdir(parents=True, exist_ok=True)
    program.save(str(folder / GRAPH_FILE))
    return folder


class GraphMismatchError(RuntimeError):
    """An exported graph's outputs differ from the eager model's by more than :data:`GRAPH_TOLERANCE`."""


@dataclass(frozen=True)
class GraphTolerance:
    """How far a served graph's outputs may lie from the eager model's, relative to the outputs' own scale.

    Args:
        map_relative: Largest anomaly-map difference over the eager maps' range (max - min over the checked images).
        score_relative: Largest image-score difference over the largest eager score magnitude.
    """

    map_relative: float
    score_relative: float


# Set from the worst cases measured by benchmarks/export_tolerance.py (every model at full size, every instruction
# set the CPU had): maps 5.0e-3 of their range (the model's own float32 noise), scores 9e-6 of their scale; the
# README states the margins.
GRAPH_TOLERANCE = GraphTolerance(map_relative=1e-2, score_relative=1e-3)
# Outputs flatter than this (a query that equals its prompt gives a map of float noise around 0) are compared on
# this scale: the three models' maps and scores lie in [0, 1], where 1e-3 of it is 1e-6.
SCALE_FLOOR = 1e-3


@dataclass(frozen=True)
class GraphDifference:
    """What serving a graph instead of the eager model changes on the checked images.

    Args:
        map_relative: Largest anomaly-map difference over the eager maps' range.
        score_relative: Largest score difference over the largest eager score magnitude.
        labels_changed: Images whose label at the registered image threshold differs.
        mask_pixels_changed: Pixels whose mask value at the registered pixel threshold differs.
        images: Images checked.
    """

    map_relative: float
    score_relative: float
    labels_changed: int
    mask_pixels_changed: int
    images: int

    def describe(self) -> str:
        """One line for logs and tags.

        Returns:
            The differences in words.
        """
        return (
            f"map {self.map_relative:.1e} of its range, score {self.score_relative:.1e} of its scale, "
            f"{self.labels_changed} labels and {self.mask_pixels_changed} mask pixels changed on {self.images} images"
        )


def _scale(values: np.ndarray, spread: bool) -> float:
    """The range (``spread``) or largest magnitude of the eager values, at least :data:`SCALE_FLOOR`."""
    magnitude = float(np.abs(values).max())
    return max(float(values.max() - values.min()) if spread else magnitude, SCALE_FLOOR)


def compare_outputs(
    exported: Outputs, expected: Outputs, thresholds: tuple[float, float] | None = None
) -> GraphDifference:
    """Measure how a graph's outputs differ from the eager ones, on the scale serving reads them at.

    Args:
        exported: The graph's scores ``[B]`` and maps ``[B, H, W]``.
        expected: The eager model's.
        thresholds: The registered ``(image_threshold, pixel_threshold)``; labels and masks are compared at them.

    Returns:
        The differences (infinite when the shapes differ).
    """
    (scores, maps), (eager_scores, eager_maps) = exported, expected
    if scores.shape != eager_scores.shape or maps.shape != eager_maps.shape:
        return GraphDifference(math.inf, math.inf, len(eager_scores), eager_maps.size, len(eager_scores))
    image_threshold, pixel_threshold = thresholds if thresholds is not None else (math.inf, math.inf)
    return GraphDifference(
        map_relative=float(np.abs(maps - eager_maps).max()) / _scale(eager_maps, spread=True),
        score_relative=float(np.abs(scores - eager_scores).max()) / _scale(eager_scores, spread=False),
        labels_changed=int(((scores > image_threshold) != (eager_scores > image_threshold)).sum()),
        mask_pixels_changed=int(((maps > pixel_threshold) != (eager_maps > pixel_threshold)).sum()),
        images=len(eager_scores),
    )


def check_graph(
    model: nn.Module,
    images: torch.Tensor,
    folder: Path,
    thresholds: tuple[float, float] | None = None,
    tolerance: GraphTolerance | None = None,
) -> GraphDifference:
    """Check that an exported graph gives the eager model's outputs, one image at a time and as one batch.

    Args:
        model: The torch model in eval mode, as it was exported.
        images: Pre-processed images ``[B, 3, H, W]`` of the graph's input size.
        folder: The graph folder.
        thresholds: The registered ``(image_threshold, pixel_threshold)``, to count changed labels and mask pixels.
        tolerance: The differences accepted; :data:`GRAPH_TOLERANCE` when ``None``.

    Returns:
        The largest differences found.

    Raises:
        GraphMismatchError: A difference beyond ``tolerance``, or outputs of another shape.
    """
    tolerance = tolerance or GRAPH_TOLERANCE
    runner, eager = GraphRunner(folder), EagerRunner(model)
    singles = [runner(image.unsqueeze(0)) for image in images]
    one_by_one = (np.concatenate([s for s, _ in singles]), np.concatenate([m for _, m in singles]))
    expected = eager(images)
    single, batched = (compare_outputs(exported, expected, thresholds) for exported in (one_by_one, runner(images)))
    worst = GraphDifference(
        *(max(getattr(single, name), getattr(batched, name)) for name in GraphDifference.__dataclass_fields__)
    )
    for name, value, limit in (
        ("anomaly_map", worst.map_relative, tolerance.map_relative),
        ("pred_score", worst.score_relative, tolerance.score_relative),
    ):
        if not value <= limit:
            msg = (
                f"the exported graph's {name} differs from the eager model's by {value:.2e} of its scale "
                f"(at most {limit:g} is accepted)"
            )
            raise GraphMismatchError(msg)
    return worst


@dataclass
class _Job:
    cancel: threading.Event
    images: torch.Tensor | None = None  # one pre-processed image, batchable with others of its shape
    call: Callable[[], Outputs] | None = None  # a forward of its own (prompt overrides)
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Run every forward in one worker thread, stacking the images that wait together into one batch.

    Args:
        forward: Batched forward on ``[B, 3, H, W]``.
        max_batch: Most images per forward.
    """

    def __init__(self, forward: Forward, max_batch: int = MAX_BATCH) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._work, name="uas-forward", daemon=True).start()

    def submit(self, image: torch.Tensor, cancel: threading.Event) -> Future:
        """Queue one pre-processed image.

        Args:
            image: ``[3, H, W]``.
            cancel: Set when the request is given up; the job is then dropped if it has not run.

        Returns:
            A future of the image's score (a float) and anomaly map ``[H, W]``.
        """
        return self._queue(_Job(cancel, images=image))

    def submit_call(self, call: Callable[[], Outputs], cancel: threading.Event) -> Future:
        """Queue a forward that cannot be batched with others (one image with its own prompts).

        Args:
            call: Returns scores ``[1]`` and maps ``[1, H, W]``.
            cancel: As for :meth:`submit`.

        Returns:
            A future of the score and anomaly map.
        """
        return self._queue(_Job(cancel, call=call))

    def _queue(self, job: _Job) -> Future:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()
        return job.future

    def _next(self) -> list[_Job]:
        with self._ready:
            while not self._jobs:
                self._ready.wait()
            first = self._jobs.popleft()
            if first.images is None:
                return [first]
            batch, others = [first], []
            while self._jobs and len(batch) < self.max_batch:
                job = self._jobs.popleft()
                fits = job.images is not None and job.images.shape == first.images.shape
                (batch if fits else others).append(job)
            self._jobs.extendleft(reversed(others))
            return batch

    def _work(self) -> None:
        while True:
            jobs = []
            for job in self._next():
                if job.cancel.is_set():
                    job.future.cancel()
                elif job.future.set_running_or_notify_cancel():
                    jobs.append(job)
            if not jobs:
                continue
            try:
                if jobs[0].call is not None:
                    scores, maps = jobs[0].call()
                else:
                    scores, maps = self.forward(torch.stack([job.images for job in jobs]))
            except Exception as exc:  # handed to the waiting requests, which answer 500
                logger.exception("Forward failed")
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for index, job in enumerate(jobs):
                job.future.set_result((float(scores[index]), maps[index]))
