"""Modality encoders and their registry: one line per built-in encoder."""

from mm_llama.encoders.audio import AudioTransformerEncoder, ClapAudioEncoder, WhisperAudioEncoder, load_audio
from mm_llama.encoders.base import ENCODERS, ModalityEncoder, build_encoder
from mm_llama.encoders.efficientnet_lite import EfficientNetLiteEncoder
from mm_llama.encoders.image import (
    ConvImageEncoder,
    HFVisionEncoder,
    OpenCLIPEncoder,
    TimmEncoder,
    load_image,
)
from mm_llama.encoders.imu import IMUConvEncoder, IMUTransformerEncoder, load_imu
from mm_llama.encoders.patches import PatchEncoder
from mm_llama.encoders.speaker import SpeakerEncoder
from mm_llama.encoders.video import VideoEncoder

ENCODERS.register("hf_vision", HFVisionEncoder)
ENCODERS.register("open_clip", OpenCLIPEncoder)
ENCODERS.register("timm", TimmEncoder)
ENCODERS.register("image_cnn", ConvImageEncoder)
ENCODERS.register("efficientnet_lite0", EfficientNetLiteEncoder)
ENCODERS.register("patches", PatchEncoder)
ENCODERS.register("video", VideoEncoder)
ENCODERS.register("whisper", WhisperAudioEncoder)
ENCODERS.register("clap", ClapAudioEncoder)
ENCODERS.register("audio_transformer", AudioTransformerEncoder)
ENCODERS.register("resemblyzer", SpeakerEncoder)
ENCODERS.register("imu_transformer", IMUTransformerEncoder)
ENCODERS.register("imu_cnn", IMUConvEncoder)

__all__ = ["ENCODERS", "ModalityEncoder", "build_encoder", "load_audio", "load_image", "load_imu"]
