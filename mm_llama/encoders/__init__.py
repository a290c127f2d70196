"""Modality encoders and their registry: one line per built-in encoder."""

from mm_llama.encoders.base import ENCODERS, ModalityEncoder, build_encoder
from mm_llama.encoders.image import HFVisionEncoder, load_image
from mm_llama.encoders.patches import PatchEncoder
from mm_llama.encoders.video import VideoEncoder

ENCODERS.register("hf_vision", HFVisionEncoder)
ENCODERS.register("patches", PatchEncoder)
ENCODERS.register("video", VideoEncoder)

__all__ = ["ENCODERS", "ModalityEncoder", "build_encoder", "load_image"]
