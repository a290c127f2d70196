"""Modalities and their marker tokens.

A modality is a name (``image``, ``audio``, ``video``, ``imu`` ship built in; plugins add more with
:func:`register_modality`). Its marker in prompt text is ``<name>``; the processor expands each marker into
as many placeholder tokens as the projector emits for that item, and the model writes the projector
outputs into those slots. The marker string doubles as the added placeholder token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

BUILTIN_MODALITIES: tuple[str, ...] = ("image", "audio", "video", "imu")
_MODALITIES: list[str] = list(BUILTIN_MODALITIES)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register_modality(name: str) -> str:
    """Declare a new modality (e.g. ``"depth"``); returns its marker (``"<depth>"``). Idempotent."""
    if not _NAME_RE.match(name):
        raise ValueError(f"modality name {name!r} must match {_NAME_RE.pattern} (lowercase, e.g. 'depth')")
    if name not in _MODALITIES:
        _MODALITIES.append(name)
    return marker(name)


def modalities() -> list[str]:
    """All known modality names, built-ins first."""
    return list(_MODALITIES)


def marker(name: str) -> str:
    """The marker token of a modality: ``image`` -> ``<image>``."""
    check_modality(name)
    return f"<{name}>"


def check_modality(name: str) -> None:
    if name not in _MODALITIES:
        raise ValueError(
            f"unknown modality {name!r}; known: {', '.join(_MODALITIES)} "
            "(add one with mm_llama.register_modality)"
        )


def media_kwarg(name: str) -> str:
    """The keyword argument that carries this modality's inputs: ``image`` -> ``images``."""
    return f"{name}s"


def media_kwargs() -> dict[str, str]:
    """Every known modality's keyword argument -> its name: ``{"images": "image", ...}``."""
    return {media_kwarg(name): name for name in _MODALITIES}


def with_markers(question: str, media: Mapping[str, Sequence[object]]) -> str:
    """Prefix one marker per media item (``<image> <image>\\n...``) for each modality whose marker the
    question does not already place; ``media`` maps a modality name to its items."""
    prefix = []
    for name, items in media.items():
        if items and f"<{name}>" not in question:
            prefix += [f"<{name}>"] * len(items)
    return (" ".join(prefix) + "\n" + question) if prefix else question
