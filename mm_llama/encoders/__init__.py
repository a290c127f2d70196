"""Modality encoders and their registry: one line per built-in encoder."""

from mm_llama.encoders.base import ENCODERS, ModalityEncoder, build_encoder
from mm_llama.encoders.image import HFVisionEncoder, load_image

ENCODERS.register("hf_vision", HFVisionEncoder)

__all__ = ["ENCODERS", "ModalityEncoder", "build_encoder", "load_image"]
