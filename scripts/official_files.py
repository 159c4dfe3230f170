# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Write full-size official-format weight files from the shared parity specs, for whole-pipeline runs offline.

The parity folder's ``weights.py`` turns each method's spec into the exact state_dict the official module was
loaded with (synthetic values, real shapes). This script saves those state_dicts in the files and layout the
pipeline reads from ``weights/``:

* ``metauas/metauas-parity.ckpt``: the official MetaUAS state_dict (set ``weights.metauas`` to this path; the
  official names ``metauas-256`` / ``metauas-512`` carry the real files' sha256 and would refuse it);
* ``inctrl/2/checkpoint.pyth``: InCTRL's whole module, CLIP tower included (``weights.inctrl: official``);
* ``faprompt/epoch_15.pth`` (``{"prompt_learner": ...}``) and ``faprompt/ViT-L-14-336px.pt``, the CLIP weights as
  a plain state_dict in OpenAI key names (``weights.faprompt: official``, ``models_config.faprompt.clip_weights:
  null``).

Example:
    $ python scripts/official_files.py --parity ../shared/parity --weights weights
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARITY = Path(os.environ.get("UAS_PARITY_DIR", REPO.parent / "shared" / "parity"))
MODELS = ("metauas", "inctrl", "faprompt")
FILES = {
    "metauas": ("metauas/metauas-parity.ckpt",),
    "inctrl": ("inctrl/2/checkpoint.pyth",),
    "faprompt": ("faprompt/epoch_15.pth", "faprompt/ViT-L-14-336px.pt"),
}


def parity_module(parity_dir: Path) -> ModuleType:
    """Import the parity folder's ``weights.py``.

    Args:
        parity_dir: The shared parity folder.

    Returns:
        The module (``load_spec``, ``make_state_dict``).

    Raises:
        FileNotFoundError: The folder has no ``weights.py``.
    """
    path = parity_dir / "weights.py"
    if not path.is_file():
        msg = f"No parity generator at {path}: pass --parity or set UAS_PARITY_DIR to the shared/parity folder"
        raise FileNotFoundError(msg)
    spec = importlib.util.spec_from_file_location("parity_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_official_files(parity_dir: Path, weights: Path, models: tuple[str, ...] = MODELS) -> dict[str, Path]:
    """Save each model's parity state_dict (seed 0) as its official file(s) under ``weights``.

    Args:
        parity_dir: The shared parity folder.
        weights: The pipeline's weights folder (files go to ``<model>/...`` inside it).
        models: Which models.

    Returns:
        The written files by their path relative to ``weights``.
    """
    generator = parity_module(parity_dir)
    written = {}
    for model in models:
        state = generator.make_state_dict(generator.load_spec(parity_dir / model / "spec.json"), seed=0)
        if model == "faprompt":
            learner = {
                k.removeprefix("prompt_learner."): v for k, v in state.items() if k.startswith("prompt_learner.")
            }
            clip = {k.removeprefix("clip."): v for k, v in state.items() if k.startswith("clip.")}
            contents = [{"prompt_learner": learner}, clip]
        else:
            contents = [state]
        for relative, content in zip(FILES[model], contents, strict=True):
            path = weights / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(content, path)
            written[relative] = path
        del state, contents
    return written


def main(argv: list[str] | None = None) -> int:
    """Write the files named on the command line.

    Args:
        argv: Arguments.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parity", type=Path, default=DEFAULT_PARITY, help="shared/parity folder (%(default)s)")
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="weights folder (%(default)s)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args(argv)
    try:
        written = write_official_files(args.parity, args.weights, tuple(args.models))
    except FileNotFoundError as exc:
        print(f"official_files: error: {exc}", file=sys.stderr)
        return 2
    for path in written.values():
        print(f"{path} ({path.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
