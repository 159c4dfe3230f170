# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""MetaUAS meta-training on synthetic change pairs: loss, checkpoints in both formats, resumption, DDP on gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_uas.models import MetaUAS
from anomalib_uas.models.metauas import training
from anomalib_uas.models.metauas.training import train_metauas
from anomalib_uas.synthesis import ChangePairDataModule

pytestmark = pytest.mark.slow

SIZE = 64
RECIPE: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "image_size": SIZE,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "seed": 0,
    "enable_progress_bar": False,
}


class LossRecorder(Callback):
    """Keep the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.threads: set[int] = set()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        """Record the step's loss.

        Args:
            trainer: Unused.
            pl_module: Unused.
            outputs: The step output.
            *args: Unused.
        """
        del trainer, pl_module, args
        self.losses.append(float(outputs["loss"]))
        self.threads.add(torch.get_num_threads())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LossRecorder]:
    output = tmp_path_factory.mktemp("training")
    recorder = LossRecorder()
    threads = torch.get_num_threads()
    train_metauas(output, max_steps=40, num_pairs=8, callbacks=[recorder], threads=1, **RECIPE)
    assert torch.get_num_threads() == threads
    return output, recorder


def test_training_uses_the_threads_asked_for(trained: tuple[Path, LossRecorder]) -> None:
    assert trained[1].threads == {1}


def test_idle_cores_counts_the_cores_other_processes_leave_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    stat = tmp_path / "stat"

    def write(busy: int, idle: int) -> None:
        # the first core is busy for `busy` jiffies, every other core idle for `idle`, both over the same time
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [
            f"cpu{core} {busy if i == 0 else 0} 0 0 {0 if i == 0 else idle} 0 0 0 0 0 0" for i, core in enumerate(cores)
        ]
        lines.append("cpu999 5000 0 0 0 0 0 0 0 0 0")  # outside the affinity: ignored
        stat.write_text("\n".join(lines) + "\n")

    write(0, 0)
    monkeypatch.setattr(training, "CPU_STAT", stat)
    monkeypatch.setattr(training.time, "sleep", lambda seconds: write(100, 100))
    assert training.idle_cores() == max(1, len(cores) - 1)
    monkeypatch.setattr(training, "CPU_STAT", tmp_path / "missing")
    assert training.idle_cores() == len(cores)


def test_loss_falls(trained: tuple[Path, LossRecorder]) -> None:
    _, recorder = trained
    losses = recorder.losses
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss did not fall: first steps {first:.3f}, last steps {last:.3f}"


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    datamodule = ChangePairDataModule(image_size=SIZE, num_pairs=4, batch_size=4, seed=7)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    return batch.image, batch.prompt


def test_both_checkpoint_formats_reload_and_predict_the_same(trained: tuple[Path, LossRecorder]) -> None:
    output, _ = trained
    assert (output / "last.ckpt").is_file()
    official = MetaUAS.from_checkpoint(output / "metauas.pth")
    lightning = MetaUAS.load_from_checkpoint(output / "last.ckpt", weights_only=False)
    untrained = MetaUAS(backbone="efficientnet_lite0", image_size=SIZE)
    images, prompts = _pairs()
    transform = official.pre_processor.transform
    images, prompts = transform(images), transform(prompts)
    with torch.no_grad():
        expected = lightning.model.eval()(images, prompts).anomaly_map
        reloaded = official.model.eval()(images, prompts).anomaly_map
        initial = untrained.model.eval()(images, prompts).anomaly_map
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    assert (reloaded - initial).abs().max() > 1e-2


def test_trained_checkpoint_runs_engine_test(
    trained: tuple[Path, LossRecorder], demo_root: Path, tmp_path: Path
) -> None:
    from anomalib.data import MVTecAD

    output, _ = trained
    model = MetaUAS.from_checkpoint(output / "metauas.pth")
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=4, eval_batch_size=4)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    results = engine.test(model, datamodule=datamodule, verbose=False)[0]
    assert 0.0 <= results["pixel_AUROC"] <= 1.0


def test_resume_continues_from_last_checkpoint(tmp_path: Path) -> None:
    train_metauas(tmp_path, max_steps=2, num_pairs=8, **RECIPE)
    first = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    train_metauas(tmp_path, max_steps=4, num_pairs=8, resume=True, **RECIPE)
    resumed = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 4
    assert resumed["optimizer_states"][0]["state"]


class WeightRecorder(Callback):
    """Keep the trained parameters at the start and after every step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def _record(self, pl_module: LightningModule) -> None:
        trained = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.steps.append(trained)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the initial weights.

        Args:
            trainer: Unused.
            pl_module: The MetaUAS module.
        """
        del trainer
        self._record(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Record the weights after the step.

        Args:
            trainer: Unused.
            pl_module: The MetaUAS module.
            *args: Unused.
        """
        del trainer, args
        self._record(pl_module)


def test_the_weight_average_becomes_the_trained_network(tmp_path: Path) -> None:
    recorder = WeightRecorder()
    decay = 0.6
    train_metauas(tmp_path, max_steps=5, num_pairs=20, ema_decay=decay, callbacks=[recorder], threads=1, **RECIPE)
    assert len(recorder.steps) == 6
    trained = recorder.steps[1:]
    weights = [(1 - decay) * decay ** (len(trained) - 1 - t) / (1 - decay ** len(trained)) for t in range(len(trained))]
    expected = {name: sum(w * step[name] for w, step in zip(weights, trained, strict=True)) for name in trained[0]}
    model = MetaUAS.from_checkpoint(tmp_path / "metauas.pth")
    saved = dict(model.model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6)
    assert any((saved[name] - last).abs().max() > 1e-4 for name, last in recorder.steps[-1].items())
    pretrained = MetaUAS(backbone="efficientnet_lite0", image_size=SIZE, meta_train=True).model.state_dict()
    for name, value in model.model.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(value, pretrained[name]), f"frozen {name} changed"
    resumable = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert [state["steps"] for key, state in resumable["callbacks"].items() if "WeightEMA" in key] == [5]
    train_metauas(tmp_path, max_steps=10, num_pairs=20, ema_decay=decay, resume=True, threads=1, **RECIPE)
    resumed = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert [state["steps"] for key, state in resumed["callbacks"].items() if "WeightEMA" in key] == [10]
    with pytest.raises(ValueError, match="ema_decay must be in"):
        training.WeightEMA(1.0)


def test_meta_training_needs_change_pairs(demo_root: Path, tmp_path: Path) -> None:
    from anomalib.data import MVTecAD

    model = MetaUAS(backbone="efficientnet_lite0", image_size=SIZE, meta_train=True)
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=4)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False)
    with pytest.raises(TypeError, match="ChangePairDataModule"):
        engine.fit(model, datamodule=datamodule)


DDP_SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

from anomalib_uas.models.metauas.training import train_metauas


class Replica(Callback):
    def on_fit_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for parameter in pl_module.model.parameters():
            digest.update(parameter.detach().contiguous().numpy().tobytes())
        record = {{"world_size": trainer.world_size, "backend": torch.distributed.get_backend(),
                   "step": trainer.global_step, "sha": digest.hexdigest()}}
        Path(sys.argv[1], f"rank{{trainer.global_rank}}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    train_metauas(sys.argv[1], max_steps=3, num_pairs=16, devices=2, strategy="ddp", callbacks=[Replica()],
                  **{recipe!r})
"""


def test_ddp_on_two_cpu_processes_keeps_parameters_identical(tmp_path: Path) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(recipe=RECIPE)))
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(output)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world_size"] == 2 and rank["backend"] == "gloo" and rank["step"] == 3 for rank in ranks)
    assert ranks[0]["sha"] == ranks[1]["sha"]
    reloaded = MetaUAS.from_checkpoint(output / "metauas.pth")
    assert not reloaded.model.has_prompts
