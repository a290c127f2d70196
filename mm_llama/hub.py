"""Where pretrained parts load from: local folders, the Hugging Face cache, and the hub only when asked.

Nothing is downloaded unless the user opts in with ``MM_LLAMA_ALLOW_HUB=1``: every ``from_pretrained``
of an LLM, tokenizer or encoder goes through :func:`pretrained_source`, so a name that is neither a
local folder nor already in the Hugging Face cache fails at once, with the name, instead of retrying
the network for a minute.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mm_llama.errors import MMInputError

HUB_ENV = "MM_LLAMA_ALLOW_HUB"
T = TypeVar("T")


def hub_allowed() -> bool:
    """Whether the user opted into hub downloads (``MM_LLAMA_ALLOW_HUB=1``)."""
    return os.environ.get(HUB_ENV, "") == "1"


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator, or starting like a path, is a path
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_pretrained(name_or_path: str, what: str, load: Callable[..., T], **kwargs: object) -> T:
    """``load(name_or_path, local_files_only=..., **kwargs)`` (a ``from_pretrained``), offline unless
    the hub is allowed; a missing folder or an id absent from the cache raises ``MMInputError`` naming
    ``what`` and the name."""
    if Path(name_or_path).expanduser().exists():
        return load(str(Path(name_or_path).expanduser()), **kwargs)
    if _looks_like_path(name_or_path):
        raise MMInputError(f"{what}: folder not found: {name_or_path}")
    allowed = hub_allowed()
    try:
        return load(name_or_path, local_files_only=not allowed, **kwargs)
    except OSError as e:
        if allowed:
            raise MMInputError(f"{what}: {name_or_path!r} could not be loaded from the hub: {e}") from e
        raise MMInputError(
            f"{what}: {name_or_path!r} is not a local folder nor in the Hugging Face cache, and hub "
            f"downloads are off (set {HUB_ENV}=1 to allow them)"
        ) from e
