"""mm_llama: any-to-text models from modality encoders, learned projectors and a Llama-family LLM."""

from mm_llama.config import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, ProjectorConfig
from mm_llama.encoders.base import ENCODERS, ModalityEncoder
from mm_llama.modality import register_modality
from mm_llama.model import MultimodalLM
from mm_llama.processor import MultimodalProcessor
from mm_llama.projectors.base import PROJECTORS, Projector

__version__ = "0.1.0"


def register_encoder(name: str, cls: type[ModalityEncoder]) -> type[ModalityEncoder]:
    """Make an encoder class usable in configs as ``encoder.type: <name>``."""
    return ENCODERS.register(name, cls)


def register_projector(name: str, cls: type[Projector]) -> type[Projector]:
    """Make a projector class usable in configs as ``projector.type: <name>``."""
    return PROJECTORS.register(name, cls)


__all__ = [
    "EncoderConfig",
    "LLMConfig",
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
