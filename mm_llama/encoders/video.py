"""Video encoder: frames decoded with PyAV, sampled, and each encoded by a registered image encoder.

Inputs: a path or bytes of any container/codec FFmpeg (bundled with PyAV) reads (mp4, webm, avi,
mkv, ...), or decoded frames as an array/tensor (F, H, W, C) with C in {1, 3, 4}, uint8 or floats
in [0, 1].

Frame sampling (the preprocessor, pure):
- ``uniform``: exactly ``num_frames`` frames, the centres of ``num_frames`` equal segments. A clip
  with fewer frames repeats frames (each segment takes its nearest frame), so every clip yields
  ``num_frames`` frames and clips batch together.
- ``fps``: one frame every 1/``fps`` seconds from the start, at most ``num_frames`` (a longer clip
  takes ``num_frames`` of those, uniformly spread) and never more than the native rate; the frame
  count varies with duration. Times come from the stream's average frame rate (a variable-rate
  stream is treated as constant-rate); frame arrays need ``array_fps``.
Each frame goes through the frame encoder's own preprocessor, so preprocessing returns (F, C, H, W)
in the frame backbone's resolution and normalization.

Temporal aggregation (``forward``) of the frame features (B, F, N, D):
- ``keep``: all F*N tokens, frame-major, each frame's tokens plus a learned temporal embedding.
- ``mean``: the mean over frames, N tokens.
- ``pool``: the ``keep`` tokens average-pooled (adaptive, 1-D, in frame-major order) to
  ``pooled_tokens``.

Bad inputs raise ``ValueError`` naming the file: unreadable or corrupt data, no video stream, no
decodable frames, or clearly fewer frames than the header declares (a truncated file).

The temporal embedding is new, random and learned: freezing the encoder (``encoder.freeze``, which
defaults to frozen for a pretrained frame backbone) freezes the frame backbone only.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.config import EncoderConfig
from mm_llama.encoders.base import (
    MediaPreprocessor,
    ModalityEncoder,
    build_encoder,
    build_preprocessor,
    read_bytes,
)
from mm_llama.errors import MissingInputError

Sampling = Literal["uniform", "fps"]
Aggregation = Literal["keep", "mean", "pool"]

DEFAULT_NUM_FRAMES = 8
"""Video-LLaVA's and many video LLMs' frame count."""
DEFAULT_FPS = 1.0
DEFAULT_POOLED_TOKENS = 64
TEMPORAL_INIT_STD = 0.02
FRAME_CHANNELS = (1, 3, 4)
TRUNCATION_SLACK = 0.05
"""A file may hold this fraction of frames fewer than its header declares before it counts as truncated."""

FrameChooser = Callable[[int, float | None, str], list[int]]
"""(frame count, native frame rate or None, name for errors) -> the frame indices to keep."""


@dataclass
class VideoOptions:
    """Options of the ``video`` encoder."""

    frame_encoder: EncoderConfig
    """The image encoder every frame goes through, e.g. ``{type: hf_vision, options: {...}}``. Leave its
    ``freeze`` unset: this encoder's own ``freeze`` decides."""
    sampling: Sampling = "uniform"
    """``uniform``: exactly ``num_frames`` frames; ``fps``: ``fps`` frames a second, at most ``num_frames``."""
    num_frames: int = DEFAULT_NUM_FRAMES
    """Frames per clip (``uniform``) or the most frames per clip (``fps``); also the temporal embedding size."""
    fps: float = DEFAULT_FPS
    """Frames sampled per second of video with ``sampling: fps``."""
    array_fps: float | None = None
    """Frame rate of frame-array inputs, which carry none; needed only for ``sampling: fps``."""
    aggregation: Aggregation = "keep"
    """``keep``: every frame's tokens + temporal embedding; ``mean``: average over frames; ``pool``:
    ``keep`` pooled to ``pooled_tokens``."""
    pooled_tokens: int = DEFAULT_POOLED_TOKENS
    """Output token count with ``aggregation: pool``."""


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices in [0, total): the centres of ``count`` equal segments (repeats when
    total < count)."""
    return [int((i + 0.5) * total / count) for i in range(count)]


def fps_indices(total: int, native_fps: float, fps: float, max_count: int) -> list[int]:
    """Indices of frames ``1 / fps`` seconds apart from the first (at most one per native frame); when
    more than ``max_count``, ``max_count`` of them spread uniformly."""
    step = native_fps / fps
    indices = sorted({int(k * step) for k in range(int(np.ceil(total / step)))})
    if len(indices) > max_count:
        indices = [indices[i] for i in uniform_indices(len(indices), max_count)]
    return indices


def _frame_array(item: np.ndarray | torch.Tensor) -> np.ndarray:
    frames = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] not in FRAME_CHANNELS:
        raise ValueError(
            f"video frame array must be (F, H, W, C) with F >= 1 and C in {FRAME_CHANNELS}, "
            f"got shape {tuple(frames.shape)}"
        )
    return frames


def _source(item: Any) -> tuple[str | bytes, str]:
    """A path (opened by FFmpeg itself) or the bytes of a bytes / file-object input, and a name for errors."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise MissingInputError(f"video file not found: {path}")
        return str(path), str(path)
    return read_bytes(item, "video")


def _open(source: str | bytes, name: str) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"cannot open video {name}: not a readable video file ({e})") from e


def _declared_frames(container: av.container.InputContainer, rate: float | None) -> int | None:
    """The frame count the file's header declares (or its duration implies), when it says."""
    stream = container.streams.video[0]
    if stream.frames:
        return int(stream.frames)
    if rate is None:
        return None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        seconds = container.duration / av.time_base
    else:
        return None
    return round(seconds * rate)


def _probe(source: str | bytes, name: str) -> tuple[int, float | None]:
    """(frames the file holds, by demuxing; the stream's average frame rate or None).

    Raises ``ValueError`` for a file without a video stream or frames, or one that holds clearly fewer
    frames than its header declares (a truncated file)."""
    container = _open(source, name)
    try:
        if not container.streams.video:
            raise ValueError(f"video {name} has no video stream (streams: {list(container.streams)})")
        stream = container.streams.video[0]
        total = sum(1 for packet in container.demux(stream) if packet.size)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        declared = _declared_frames(container, rate)
    except av.FFmpegError as e:
        raise ValueError(f"cannot read video {name}: corrupt or truncated ({e})") from e
    finally:
        container.close()
    if total == 0:
        raise ValueError(f"video {name} has no decodable frames (its video stream is empty)")
    if declared and total < declared - max(1.0, TRUNCATION_SLACK * declared):
        raise ValueError(
            f"video {name} is truncated or damaged: its header declares {declared} frames but only "
            f"{total} are present"
        )
    return total, rate


def _decode(item: Any, choose: FrameChooser) -> np.ndarray:
    """Decode the frames that ``choose(total, native_fps, name) -> indices`` picks: (F, H, W, 3) uint8.

    The frame count comes from demuxing (what the file holds, not what its header claims); when the
    decoder yields fewer frames than there are packets, the missing ones repeat the last decoded frame."""
    source, name = _source(item)
    total, rate = _probe(source, name)
    indices = choose(total, rate, name)
    wanted, stop = set(indices), max(indices)
    kept: dict[int, np.ndarray] = {}
    last: av.VideoFrame | None = None
    decoded = 0
    container = _open(source, name)
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            last, decoded = frame, i + 1
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            if i >= stop:
                break
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video {name}: corrupt or truncated ({e})") from e
    finally:
        container.close()
    if last is None:
        raise ValueError(f"video {name} has no decodable frames ({total} packets, none decoded)")
    tail = last.to_ndarray(format="rgb24") if decoded <= stop else None
    return np.stack([kept[i] if i < decoded else tail for i in indices])


class VideoPreprocessor(MediaPreprocessor):
    """Decode, sample (see the module docstring) and preprocess each frame with the frame encoder's own
    preprocessor: (F, C, H, W). Tokens: the frame encoder's per frame, aggregated."""

    def __init__(self, options: VideoOptions) -> None:
        super().__init__(options)
        o = options
        if o.frame_encoder.freeze is not None:
            raise ValueError(
                "video encoder: leave options.frame_encoder.freeze unset; set the video encoder's own "
                f"freeze instead (got frame_encoder.freeze={o.frame_encoder.freeze})"
            )
        for field, value in (("num_frames", o.num_frames), ("pooled_tokens", o.pooled_tokens)):
            if value < 1:
                raise ValueError(f"video encoder: options.{field} must be >= 1, got {value}")
        for field, value in (("fps", o.fps), ("array_fps", o.array_fps)):
            if value is not None and value <= 0:
                raise ValueError(f"video encoder: options.{field} must be > 0, got {value}")
        self.frame_preprocessor = build_preprocessor("video.frame_encoder", o.frame_encoder)

    def choose(self, total: int, native_fps: float | None, name: str) -> list[int]:
        """The indices of the frames to keep (a :data:`FrameChooser`)."""
        o = self.options
        if o.sampling == "uniform":
            return uniform_indices(total, o.num_frames)
        if native_fps is None:
            raise ValueError(
                f"video {name}: its frame rate is unknown, so fps sampling cannot place frames "
                "(set array_fps for frame arrays, or use sampling: uniform)"
            )
        return fps_indices(total, native_fps, o.fps, o.num_frames)

    def load_frames(self, item: Any) -> np.ndarray:
        """The sampled frames of one video, (F, H, W, C), before the frame encoder's preprocessing."""
        if isinstance(item, (np.ndarray, torch.Tensor)):
            frames = _frame_array(item)
            return frames[self.choose(len(frames), self.options.array_fps, "<frame array>")]
        return _decode(item, self.choose)

    def __call__(self, item: Any) -> torch.Tensor:
        frames = self.load_frames(item)
        return torch.stack([self.frame_preprocessor(frame) for frame in frames])  # (F, C, H, W)

    def num_tokens(self, x: torch.Tensor) -> int:
        per_frame = self.frame_preprocessor.num_tokens(x[0])
        return {
            "keep": x.shape[0] * per_frame,
            "mean": per_frame,
            "pool": self.options.pooled_tokens,
        }[self.options.aggregation]


class VideoEncoder(ModalityEncoder):
    """Frames through an image encoder: (B, F, C, H, W) -> (B, M, D) with M set by the aggregation."""

    modality = "video"
    Options = VideoOptions
    Preprocessor = VideoPreprocessor

    def __init__(self, options: VideoOptions) -> None:
        super().__init__(options)
        o = options
        self.frame_encoder = build_encoder("video.frame_encoder", o.frame_encoder)
        self.temporal_embedding = (
            nn.Parameter(torch.randn(o.num_frames, self.frame_encoder.output_dim) * TEMPORAL_INIT_STD)
            if o.aggregation != "mean"
            else None
        )

    @property
    def output_dim(self) -> int:
        return self.frame_encoder.output_dim

    @property
    def is_pretrained(self) -> bool:
        return self.frame_encoder.is_pretrained

    def set_frozen(self, frozen: bool) -> None:
        """Freeze the frame backbone only; the temporal embedding always trains."""
        self.frame_encoder.set_frozen(frozen)
        if self.temporal_embedding is not None:
            self.temporal_embedding.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[:2]
        if f > self.options.num_frames:
            raise ValueError(
                f"video encoder: got {f} frames per clip but options.num_frames={self.options.num_frames}"
            )
        feats = self.frame_encoder(x.flatten(0, 1)).unflatten(0, (b, f))  # (B, F, N, D)
        if self.temporal_embedding is None:
            return feats.mean(dim=1)  # (B, N, D)
        feats = feats + self.temporal_embedding[:f, None, :].to(feats.dtype)
        tokens = feats.flatten(1, 2)  # (B, F*N, D)
        if self.options.aggregation == "pool":
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.options.pooled_tokens).transpose(1, 2)
        return tokens
