# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS meta-training on synthetic change pairs (the official repository has no training code).

:func:`train_metauas` runs ``Engine.fit`` with ``MetaUAS(meta_train=True)`` on a
:class:`~anomalib_uas.synthesis.ChangePairDataModule`: frozen encoder (optionally trainable), BCE on the change logits,
AdamW, channels-last tensors, OpenCV single-threaded while the pairs are made (its thread pool would compete with
torch's for the same cores), and as many torch threads as there are idle cores when fitting starts
(:func:`idle_cores`): an OpenMP thread that shares a core with another busy process stalls every parallel region of
the step, so two threads on two cores of which one is taken are many times slower than one thread. Lightning
checkpoints (``last.ckpt``, for resuming) and ``metauas.pth`` (the official state_dict format with the architecture
and training size recorded, see :func:`~anomalib_uas.models.metauas.checkpoint.save_checkpoint`; loaded with
:meth:`MetaUAS.from_checkpoint`) are written to the output folder.

Example:
    >>> from anomalib_uas.models.metauas.training import train_metauas
    >>> checkpoint = train_metauas("weights/metauas-lite0", max_steps=600)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger

from anomalib_uas.models.metauas.checkpoint import save_checkpoint
from anomalib_uas.models.metauas.lightning_model import MetaUAS
from anomalib_uas.models.metauas.torch_model import OFFICIAL_DECODER_CHANNELS
from anomalib_uas.synthesis import ChangePairDataModule, PairSynthesisConfig

__all__ = [
    "CHECKPOINT_FILENAME",
    "MetaUASCheckpoint",
    "WeightEMA",
    "idle_cores",
    "train_metauas",
    "training_threads",
]

CHECKPOINT_FILENAME = "metauas.pth"
CPU_STAT = Path("/proc/stat")


def _cpu_times(cores: set[int]) -> tuple[int, int]:
    """Idle and total jiffies summed over ``cores``, from ``/proc/stat``."""
    idle = total = 0
    for line in CPU_STAT.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            times = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle += times[3] + times[4]
            total += sum(times)
    return idle, total


def idle_cores(interval: float = 0.5) -> int:
    """Count the cores this process may use that other processes leave idle, sampled over ``interval`` seconds.

    Args:
        interval: Sampling time.

    Returns:
        The rounded number of idle cores among those in this process's CPU affinity, at least 1; without
        ``/proc/stat`` (not Linux) every usable core.
    """
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    if not CPU_STAT.is_file():
        return len(cores)
    idle, total = _cpu_times(cores)
    time.sleep(interval)
    idle_after, total_after = _cpu_times(cores)
    if total_after <= total:
        return len(cores)
    return max(1, round(len(cores) * (idle_after - idle) / (total_after - total)))


class MetaUASCheckpoint(Callback):
    """Write the self-describing MetaUAS checkpoint after every epoch and at the end of fitting.

    Args:
        path: Output file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            save_checkpoint(pl_module.model, self.path, pl_module.hparams.image_size)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write after each epoch.

        Args:
            trainer: The trainer.
            pl_module: The MetaUAS module.
        """
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write once fitting ends (also after ``max_steps`` mid-epoch).

        Args:
            trainer: The trainer.
            pl_module: The MetaUAS module.
        """
        self._write(trainer, pl_module)


class WeightEMA(Callback):
    """Keep an exponential moving average of the trained weights and put it into the network when fitting ends.

    With a constant learning rate the last iterate carries the noise of its last few hundred batches; their average
    is a smoother solution at no extra training cost. Step ``t`` of ``n`` gets the weight
    ``(1 - decay) * decay ** (n - t) / (1 - decay ** n)`` (the bias-corrected average: the untrained network gets
    none, so short runs average what they trained). Only the entries that change are averaged: parameters that
    require gradients and the floating-point buffers of their modules (batch-norm running statistics); frozen
    encoder weights stay bit-exact. The average is part of the callback state, so resuming from ``last.ckpt``
    continues it.

    Args:
        decay: Weight of the previous average at each step (0.995 averages over about the last 200 steps).

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            msg = f"ema_decay must be in (0, 1), got {decay}; pass e.g. 0.995, or None to train without an average."
            raise ValueError(msg)
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._names: list[str] = []
        self._tensors: list[torch.Tensor] = []

    @staticmethod
    def _tracked(pl_module: LightningModule) -> dict[str, torch.Tensor]:
        network = pl_module.model
        trained = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
        modules = {name.rpartition(".")[0] for name in trained}
        return {
            name: value
            for name, value in network.state_dict(keep_vars=True).items()
            if name in trained or (name.rpartition(".")[0] in modules and value.is_floating_point())
        }

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Collect the tracked tensors (the optimiser updates them in place); start an empty average unless resumed.

        Args:
            trainer: The trainer.
            pl_module: The MetaUAS module.
        """
        del trainer
        tracked = self._tracked(pl_module)
        self._names, self._tensors = list(tracked), [value.detach() for value in tracked.values()]
        if not self.average:
            self.average = {name: torch.zeros_like(value) for name, value in tracked.items()}
            self.steps = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """Move the average towards the weights after this step.

        Args:
            trainer: The trainer.
            pl_module: The MetaUAS module.
            *args: Unused.
            **kwargs: Unused.
        """
        del trainer, pl_module, args, kwargs
        averages = [self.average[name] for name in self._names]
        with torch.no_grad():
            torch._foreach_lerp_(averages, self._tensors, 1.0 - self.decay)
        self.steps += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Load the average into the network (before :class:`MetaUASCheckpoint` writes it at the end of fitting).

        Args:
            trainer: The trainer.
            pl_module: The MetaUAS module.
        """
        del trainer, pl_module
        if not self.steps:
            return
        correction = 1.0 - self.decay**self.steps
        with torch.no_grad():
            for name, value in zip(self._names, self._tensors, strict=True):
                value.copy_(self.average[name] / correction)

    def state_dict(self) -> dict[str, Any]:
        """The average and its step count, saved in Lightning checkpoints.

        Returns:
            The callback state.
        """
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the average from a Lightning checkpoint.

        Args:
            state_dict: The callback state.
        """
        self.average, self.steps = state_dict["average"], state_dict["steps"]


def training_threads() -> int:
    """The torch threads training takes by default: the idle cores, at most ``torch.get_num_threads()``.

    Returns:
        The thread count.
    """
    return min(idle_cores(), torch.get_num_threads())


def train_metauas(
    output_dir: str | Path,
    backbone: str = "efficientnet_lite0",
    fusion: str = "cat",
    decoder_channels: Sequence[int] = OFFICIAL_DECODER_CHANNELS,
    image_size: int = 256,
    max_steps: int = 600,
    batch_size: int = 8,
    num_pairs: int = 4096,
    learning_rate: float = 1e-3,
    weight_decay: float = 5e-4,
    ema_decay: float | None = None,
    sources: Sequence[str | Path] | None = None,
    synthesis: dict[str, Any] | None = None,
    seed: int = 0,
    resume: bool = False,
    num_workers: int = 0,
    threads: int | None = None,
    devices: int = 1,
    strategy: str = "auto",
    callbacks: Sequence[Callback] = (),
    logger: Logger | bool = False,
    **engine_kwargs: Any,
) -> Path:
    """Meta-train MetaUAS on synthetic change pairs.

    Args:
        output_dir: Folder for the Lightning checkpoints and the official-format checkpoint.
        backbone: Encoder (ImageNet weights are loaded; EfficientNet-Lite ones work offline).
        fusion: How aligned prompt features join the query's: ``cat`` (the official layout), ``add`` or
            ``absdiff``; load the checkpoint with the same value.
        decoder_channels: Output channels of the five decoder blocks; load the checkpoint with the same value.
        image_size: Pair size.
        max_steps: Optimisation steps.
        batch_size: Pairs per step (per process).
        num_pairs: Pairs per epoch.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        ema_decay: Decay of the moving average of the weights that becomes the trained network
            (:class:`WeightEMA`); ``None`` keeps the last step's weights.
        sources: Image folders; ``None`` uses the images that ship with installed packages.
        synthesis: :class:`~anomalib_uas.synthesis.PairSynthesisConfig` settings (``image_size`` is set here).
        seed: Seed of the pairs, their order and the initialisation.
        resume: Continue from ``last.ckpt`` in ``output_dir`` when it exists.
        num_workers: Data-loading workers.
        threads: Torch threads while fitting; ``None`` takes :func:`training_threads`. Restored afterwards.
        devices: CPU processes (``strategy="ddp"`` for more than one). Parameters stay identical across the
            processes; the decoder's batch-norm statistics are those of rank 0 (DDP broadcasts them every step), which
            writes the checkpoints.
        strategy: Lightning strategy.
        callbacks: Further Lightning callbacks.
        logger: Lightning logger of the losses (e.g. anomalib's MLflow logger); none by default.
        **engine_kwargs: Further Trainer arguments.

    Returns:
        Path of ``metauas.pth``, loadable with :meth:`MetaUAS.from_checkpoint`.
    """
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    model = MetaUAS(
        backbone=backbone,
        fusion=fusion,
        decoder_channels=decoder_channels,
        image_size=image_size,
        meta_train=True,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        seed=seed,
        visualizer=False,
        evaluator=False,
    )
    datamodule = ChangePairDataModule(
        sources=sources,
        image_size=image_size,
        num_pairs=num_pairs,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        config=PairSynthesisConfig(**{**(synthesis or {}), "image_size": image_size}),
    )
    checkpoint = output_dir / CHECKPOINT_FILENAME
    checkpoints = [
        ModelCheckpoint(dirpath=output_dir, filename="metauas-{step}", save_last=True, every_n_train_steps=100),
        MetaUASCheckpoint(checkpoint),
    ]
    averaging = [WeightEMA(ema_decay)] if ema_decay is not None else []
    engine = Engine(
        default_root_dir=output_dir / "engine",
        max_steps=max_steps,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=logger,
        callbacks=[*averaging, *checkpoints, *callbacks],
        **engine_kwargs,
    )
    last = output_dir / "last.ckpt"
    opencv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(threads or training_threads())
    try:
        engine.fit(model, datamodule=datamodule, ckpt_path=last if resume and last.is_file() else None)
    finally:
        cv2.setNumThreads(opencv_threads)
        torch.set_num_threads(torch_threads)
    return checkpoint
