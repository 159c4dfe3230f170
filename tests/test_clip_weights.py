# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""CLIP weight files never run code: state_dicts load, TorchScript archives only when they are OpenAI releases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_uas.models.components import clip
from anomalib_uas.models.components.clip import load_clip, openai_release_hashes
from anomalib_uas.weights import WeightsError, sha256sum

TINY = "uas-tiny-ViT-B-16-plus-240"
MARKER = "TORCHSCRIPT PAYLOAD RAN"


class Payload(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` runs when the archive is loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("TORCHSCRIPT PAYLOAD RAN")
        self.weight = state[0]
        self.training = state[1]


@pytest.fixture
def payload(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(Payload()).save(str(path))
    torch.jit.load(str(path))
    assert MARKER in capfd.readouterr().out  # loading this archive does run its code
    return path


def test_torchscript_weights_are_refused_without_running_them(payload: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(WeightsError, match="not loaded: TorchScript archives run code on load"):
        load_clip(TINY, weights=payload)
    assert MARKER not in capfd.readouterr().out


def test_only_an_openai_release_hash_lets_torchscript_load(
    payload: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes = openai_release_hashes()
    assert len(hashes) >= 5
    assert all(len(digest) == 64 for digest in hashes)
    assert sha256sum(payload) not in hashes
    monkeypatch.setattr(clip, "openai_release_hashes", lambda: frozenset({sha256sum(payload)}))
    with pytest.raises(WeightsError, match="does not hold the weights"):  # loaded, but it is not a CLIP
        load_clip(TINY, weights=payload)
    assert MARKER in capfd.readouterr().out


def test_state_dict_weights_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_clip(TINY)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    loaded = load_clip(TINY, weights=tmp_path / "clip.pt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
