"""mm_llama: any-to-text models from modality encoders, learned projectors and a Llama-family LLM.

``import mm_llama`` is light (no torch): the public names below are imported from their modules on first
use (PEP 562), so that ``mm-llama --help`` and plugin registrations stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mm_llama.modality import register_modality

if TYPE_CHECKING:
    from mm_llama.config import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, ProjectorConfig
    from mm_llama.encoders.base import MediaPreprocessor, ModalityEncoder
    from mm_llama.errors import MMInputError
    from mm_llama.model import MultimodalLM
    from mm_llama.processor import MultimodalProcessor
    from mm_llama.projectors.base import Projector

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "EncoderConfig": "mm_llama.config",
    "LLMConfig": "mm_llama.config",
    "ModalityConfig": "mm_llama.config",
    "ModelConfig": "mm_llama.config",
    "ProjectorConfig": "mm_llama.config",
    "MediaPreprocessor": "mm_llama.encoders.base",
    "MMInputError": "mm_llama.errors",
    "ModalityEncoder": "mm_llama.encoders.base",
    "MultimodalLM": "mm_llama.model",
    "MultimodalProcessor": "mm_llama.processor",
    "Projector": "mm_llama.projectors.base",
}
"""Public name -> the module that defines it, imported on first access."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mm_llama' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def register_encoder(name: str, cls: type[ModalityEncoder]) -> type[ModalityEncoder]:
    """Make an encoder class usable in configs as ``encoder.type: <name>``."""
    from mm_llama.encoders.base import ENCODERS

    return ENCODERS.register(name, cls)


def register_projector(name: str, cls: type[Projector]) -> type[Projector]:
    """Make a projector class usable in configs as ``projector.type: <name>``."""
    from mm_llama.projectors.base import PROJECTORS

    return PROJECTORS.register(name, cls)


__all__ = [
    "EncoderConfig",
    "LLMConfig",
    "MMInputError",
    "MediaPreprocessor",
    "ModalityConfig",
    "ModalityEncoder",
    "ModelConfig",
    "MultimodalLM",
    "MultimodalProcessor",
    "Projector",
    "ProjectorConfig",
    "register_encoder",
    "register_modality",
    "register_projector",
]
