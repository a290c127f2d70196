"""Audio encoders: Whisper's encoder and CLAP's audio tower (transformers), and a small built-in
fbank transformer.

Decoding: wav / flac / ogg / mp3 with soundfile (libsndfile carries its own codecs, mp3 since 1.1);
anything libsndfile cannot open (m4a, opus in webm, ...) goes through PyAV. Every input is downmixed
to mono and resampled with ``torchaudio.functional.resample`` to the encoder's rate. Numpy arrays and
tensors are taken to be at the encoder's rate already; pass ``(waveform, rate)`` to say otherwise.

Long audio policy (options ``max_seconds``, ``chunk``, ``max_chunks`` of every audio encoder): by
default only the first ``max_seconds`` are kept (clipping). With ``chunk: true`` the audio is cut into
consecutive ``max_seconds`` windows, at most ``max_chunks`` (anything after them is dropped), each window
is encoded on its own and their tokens are concatenated in time order; preprocessing then returns a
``(K, ...)`` stack of K windows instead of one window's features. A short window is padded the way the
backbone was trained: Whisper pads the waveform with silence to its full 30 s input, CLAP repeats the
clip and pads (``repeatpad``), the fbank encoder pads the fbank with zeros before normalizing (AST /
ImageBind).

Features: Whisper log-mel through transformers' ``WhisperFeatureExtractor``; CLAP log-mel through
``ClapFeatureExtractor``; Kaldi fbank (128 bins, 25 ms windows every 10 ms, normalized with the AudioSet
mean and std as AST and ImageBind do) for the built-in encoder.
"""

from __future__ import annotations

import io
import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import nn
from transformers import (
    AutoConfig,
    ClapAudioConfig,
    ClapAudioModel,
    ClapAudioModelWithProjection,
    ClapFeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mm_llama.encoders.base import (
    MediaPreprocessor,
    ModalityEncoder,
    load_weights,
    pre_norm_transformer,
    read_bytes,
)
from mm_llama.hub import load_pretrained

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""Whisper's and the fbank encoder's sample rate (Hz)."""
N_FBANK_BINS = 128
FBANK_FRAME_LENGTH_MS = 25.0
FBANK_FRAME_SHIFT_MS = 10.0
FBANK_FRAMES_PER_SECOND = 100
AUDIOSET_FBANK_MEAN = -4.2677393
"""Mean and std of AudioSet fbanks, the normalization constants of AST and ImageBind."""
AUDIOSET_FBANK_STD = 4.5689974
DEFAULT_MAX_CHUNKS = 4
FRAME_COUNT_TOLERANCE = 0.01
"""A compressed file may decode up to 1% fewer samples than its header estimates before it counts as truncated."""
PREPROCESSOR_FILE = "preprocessor_config.json"
WHISPER_STRIDE = 2
"""Mel frames per Whisper encoder token: its conv1 has stride 1, its conv2 stride 2 (fixed in the model)."""


# ---- decoding ------------------------------------------------------------------------------------------
def load_audio(item: Any, sample_rate: int) -> torch.Tensor:
    """Any supported audio input -> a mono float32 waveform (T,) at ``sample_rate``.

    Accepts a path, bytes or file object (wav / flac / ogg / mp3, or anything PyAV decodes), a numpy
    array or tensor (T,), (C, T) or (T, C) (the shorter axis is taken as channels; integer samples are
    scaled to [-1, 1]) at ``sample_rate`` already, or a ``(waveform, rate)`` tuple at any rate.
    Raises ``ValueError`` naming the input for undecodable, truncated, empty or non-finite audio.
    """
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"an audio tuple must be (waveform, sample_rate), got {len(item)} items")
        name = "<audio array>"
        wave, rate = _channels_first(item[0], name), _check_rate(item[1], name)
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        name = "<audio array>"
        wave, rate = _channels_first(item, name), sample_rate
    else:
        data, name = read_bytes(item, "audio")
        wave, rate = decode_audio(data, name)
    if wave.shape[1] == 0:
        raise ValueError(f"audio {name} holds no samples")
    if not torch.isfinite(wave).all():
        raise ValueError(f"audio {name} contains NaN or infinite samples")
    mono = wave.mean(dim=0)  # (C, T) -> (T,)
    if rate != sample_rate:
        mono = torchaudio.functional.resample(mono, orig_freq=rate, new_freq=sample_rate)
    return mono.contiguous()


def decode_audio(data: bytes, name: str) -> tuple[torch.Tensor, int]:
    """Encoded audio bytes -> ((C, T) float32 samples in [-1, 1], sample rate), via soundfile or PyAV."""
    try:
        sound = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as sf_error:
        return _decode_with_av(data, name, sf_error)
    with sound:
        declared = sound.frames
        try:
            samples = sound.read(dtype="float32", always_2d=True)  # (T, C)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(f"cannot decode audio {name} ({sound.format}): {e}") from e
        rate = int(sound.samplerate)
    if len(samples) < declared * (1 - FRAME_COUNT_TOLERANCE):
        raise ValueError(
            f"audio {name} is truncated: its header announces {declared} samples, only {len(samples)} decode"
        )
    _check_riff_size(data, name)
    return torch.from_numpy(samples.T.copy()), rate


def _decode_with_av(data: bytes, name: str, sf_error: Exception) -> tuple[torch.Tensor, int]:
    """PyAV (FFmpeg) decoding for formats libsndfile does not open."""
    planes: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # float planar, same layout and rate
            for frame in container.decode(stream):
                planes += [out.to_ndarray() for out in resampler.resample(frame)]  # (C, n) each
            planes += [out.to_ndarray() for out in resampler.resample(None)]
            rate = int(stream.rate)
    except (av.FFmpegError, ValueError) as e:
        raise ValueError(f"cannot decode audio {name}: soundfile: {sf_error}; PyAV: {e}") from e
    if not planes:
        raise ValueError(f"cannot decode audio {name}: no audio frames decoded")
    return torch.from_numpy(np.concatenate(planes, axis=1).astype(np.float32)), rate


def _check_riff_size(data: bytes, name: str) -> None:
    """A WAV file whose ``data`` chunk is shorter than its header says was cut off (libsndfile reads the rest)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"data":
            available = len(data) - pos - 8
            streamed = size in (0, 0xFFFFFFFF)  # written by a streaming encoder that never patched the size
            if not streamed and available < size:
                raise ValueError(
                    f"audio {name} is truncated: its WAV header announces {size} bytes of samples, "
                    f"the file holds {available}"
                )
            return
        pos += 8 + size + (size & 1)


def _channels_first(samples: Any, name: str) -> torch.Tensor:
    """An array or tensor (T,), (C, T) or (T, C) -> (C, T) float32; integer samples scaled to [-1, 1]."""
    if isinstance(samples, np.ndarray):
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
        samples = torch.from_numpy(np.ascontiguousarray(samples))
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"audio {name}: expected a numpy array or tensor, got {type(samples).__name__}")
    if not samples.is_floating_point():
        samples = samples.float() / float(torch.iinfo(samples.dtype).max)
    wave = samples.detach().cpu().float()
    if wave.ndim == 1:
        return wave.unsqueeze(0)  # (1, T)
    if wave.ndim == 2:
        return wave if wave.shape[0] <= wave.shape[1] else wave.T  # (C, T)
    raise ValueError(f"audio {name}: expected shape (T,), (C, T) or (T, C), got {tuple(wave.shape)}")


def _check_rate(rate: Any, name: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0 or rate != int(rate):
        raise ValueError(f"audio {name}: the sample rate must be a positive whole number of Hz, got {rate!r}")
    return int(rate)


# ---- shared helpers (the IMU encoders use them too) -----------------------------------------------------
_NOTICED: set[tuple[str, int, int]] = set()
"""(input name, its length, the length kept) already said: one notice per input per process."""


def clip_notice(name: str, total: int, kept: int, chunk: bool, rate: float | None = None) -> None:
    """Log (once per input and length per process) that the encoder reads only ``kept`` of ``total``
    samples of ``name``; in seconds when the ``rate`` is known. Only a notice: the tensors are unchanged."""
    key = (name, total, kept)
    if key in _NOTICED:
        return
    _NOTICED.add(key)
    hint = "raise max_chunks to read more" if chunk else "set chunk: true / max_seconds to read more"
    if rate:
        logger.warning(
            "%s: %.1f s, the encoder reads the first %.1f s (%s)", name, total / rate, kept / rate, hint
        )
    else:
        logger.warning("%s: %d samples, the encoder reads the first %d (%s)", name, total, kept, hint)


def split_windows(
    x: torch.Tensor,
    window: int,
    chunk: bool,
    max_chunks: int,
    name: str = "windowed input (e.g. IMU)",
    rate: float | None = None,
) -> list[torch.Tensor]:
    """The long-input policy along the last axis: without ``chunk``, the first ``window`` samples; with
    it, consecutive windows (the last may be shorter), at most ``max_chunks``; later samples are dropped,
    and a warning says so (:func:`clip_notice`, naming ``name``; seconds given the ``rate``)."""
    kept = window if not chunk else window * max_chunks
    if x.shape[-1] > kept:
        clip_notice(name, x.shape[-1], kept, chunk, rate)
    if not chunk:
        return [x[..., :window]]
    count = min(max_chunks, math.ceil(x.shape[-1] / window))
    return [x[..., i * window : (i + 1) * window] for i in range(count)]


def audio_name(item: Any) -> str:
    """How a notice names an audio input: its path, else its kind."""
    if isinstance(item, (str, Path)):
        return f"audio {item}"
    return "audio <bytes>" if isinstance(item, (bytes, bytearray)) else "audio <array>"


@dataclass
class ClipOptions:
    """The long audio policy shared by every audio encoder (see the module docstring)."""

    max_seconds: float | None = None
    """Seconds of audio per window; longer audio is clipped (or chunked). ``None``: the backbone's window."""
    chunk: bool = False
    """Cut long audio into consecutive windows and concatenate their tokens instead of clipping it."""
    max_chunks: int = DEFAULT_MAX_CHUNKS
    """With ``chunk``: the most windows per input; audio after them is dropped."""


class WindowedAudioPreprocessor(MediaPreprocessor):
    """Shared audio preprocessing: decode to mono at ``sample_rate``, clip or chunk (the long audio policy),
    and one window's features each: ``feature_shape`` (e.g. (80, 3000) log-mel), or (K, *feature_shape)
    with ``chunk``. Subclasses set the rate, the window and ``tokens_per_window`` and give the features."""

    feature_ndim: ClassVar[int]
    """Dimensions of one window's features, without the chunk axis."""
    sample_rate: int
    clip_samples: int
    """Samples of audio kept per window (``max_seconds`` at ``sample_rate``)."""
    tokens_per_window: int
    """Output tokens of one window."""

    def _set_clip(self, window_samples: int, backbone: str) -> None:
        """Check ``max_seconds`` against the backbone's window (``window_samples``) and set ``clip_samples``."""
        seconds = self.options.max_seconds
        clip = window_samples if seconds is None else round(seconds * self.sample_rate)
        if clip <= 0 or clip > window_samples:
            raise ValueError(
                f"{backbone} encoder: options.max_seconds must be in (0, {window_samples / self.sample_rate:g}] "
                f"s, the window this model takes, got {seconds}; set chunk: true to cover longer audio"
            )
        if self.options.max_chunks < 1:
            raise ValueError(
                f"{backbone} encoder: options.max_chunks must be >= 1, got {self.options.max_chunks}"
            )
        self.clip_samples = clip

    @abstractmethod
    def window_features(self, wave: torch.Tensor) -> torch.Tensor:
        """(t,) waveform, t <= clip_samples -> the backbone's input features for one window."""

    def __call__(self, item: Any) -> torch.Tensor:
        wave = load_audio(item, self.sample_rate)  # (T,)
        o = self.options
        windows = split_windows(
            wave, self.clip_samples, o.chunk, o.max_chunks, audio_name(item), self.sample_rate
        )
        features = [self.window_features(w) for w in windows]
        return torch.stack(features) if self.options.chunk else features[0]  # (K, ...) or (...)

    def num_tokens(self, x: torch.Tensor) -> int:
        windows = x.shape[0] if x.ndim == self.feature_ndim + 1 else 1
        return windows * self.tokens_per_window


class WindowedAudioEncoder(ModalityEncoder):
    """Shared chunk handling: subclasses encode windows. ``forward`` takes the preprocessor's output,
    batched: (B, *feature_shape) or (B, K, *feature_shape) -> (B, K * tokens_per_window, D_enc)."""

    modality = "audio"
    Preprocessor: ClassVar[type[WindowedAudioPreprocessor]]

    @abstractmethod
    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        """(W, *feature_shape) windows -> (W, tokens_per_window, D_enc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        chunked = x.ndim == self.preprocessor.feature_ndim + 2
        windows = x.flatten(0, 1) if chunked else x  # (B * K, ...)
        tokens = self.encode_windows(windows.to(self.dtype))  # (B * K, n, D)
        return tokens.reshape(batch, -1, tokens.shape[-1])  # (B, K * n, D)


def _checked_pair(options: Any, backbone: str) -> None:
    if (options.name_or_path is None) == (options.config is None):
        raise ValueError(f"{backbone} encoder: set exactly one of options.name_or_path or options.config")


# ---- Whisper -------------------------------------------------------------------------------------------
@dataclass
class WhisperOptions(ClipOptions):
    """Options of the ``whisper`` encoder. ``max_seconds`` (default: the model's window, 30 s for OpenAI's
    checkpoints = 2 x max_source_positions mel frames) may be smaller: the clip is padded with silence to
    the full window, as Whisper requires, and only the output tokens covering the clip are kept."""

    name_or_path: str | None = None
    """Hub id or local folder of a Whisper checkpoint (its encoder is used)."""
    config: dict[str, Any] | None = None
    """Build a random encoder from this ``WhisperConfig`` dict instead (``max_source_positions`` sets the
    window: 2 x it mel frames of 10 ms)."""


def whisper_config(options: WhisperOptions) -> WhisperConfig:
    """The model's ``WhisperConfig``: from ``options.config``, or the checkpoint's ``config.json``."""
    _checked_pair(options, "whisper")
    if options.config is not None:
        return WhisperConfig(**{k: v for k, v in options.config.items() if k != "model_type"})
    config = load_pretrained(options.name_or_path, "whisper encoder", AutoConfig.from_pretrained)
    if config.model_type != "whisper":
        raise ValueError(
            f"whisper encoder: {options.name_or_path} holds a {config.model_type!r} model, not whisper"
        )
    return config


class WhisperPreprocessor(WindowedAudioPreprocessor):
    """The checkpoint's ``WhisperFeatureExtractor`` (the default one for a random config or a folder without
    one), each window padded with silence to the model's full input: (n_mels, 2 * max_source_positions).
    Tokens: those covering the clip, 50 a second (10 ms mel frames, the encoder's stride 2)."""

    feature_ndim = 2

    def __init__(self, options: WhisperOptions) -> None:
        super().__init__(options)
        config = whisper_config(options)
        if options.config is not None:
            self.extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        else:
            self.extractor = _load_extractor(
                options.name_or_path, WhisperFeatureExtractor, config.num_mel_bins
            )
        if self.extractor.feature_size != config.num_mel_bins:
            raise ValueError(
                f"whisper encoder: the feature extractor makes {self.extractor.feature_size} mel bins, "
                f"the model expects num_mel_bins={config.num_mel_bins}"
            )
        self.sample_rate = int(self.extractor.sampling_rate)
        self.window_frames = int(config.max_source_positions) * WHISPER_STRIDE
        self._set_clip(self.window_frames * self.extractor.hop_length, "whisper")
        clip_frames = math.ceil(self.clip_samples / self.extractor.hop_length)
        self.tokens_per_window = math.ceil(clip_frames / WHISPER_STRIDE)

    def window_features(self, wave: torch.Tensor) -> torch.Tensor:
        features = self.extractor(
            wave.numpy(),
            sampling_rate=self.sample_rate,
            padding="max_length",
            max_length=self.window_frames * self.extractor.hop_length,
            truncation=True,
            return_tensors="pt",
        )["input_features"]
        return features[0]  # (n_mels, window_frames)


class WhisperAudioEncoder(WindowedAudioEncoder):
    """Whisper's encoder over its log-mel features: (B, n_mels, 2 * max_source_positions) -> 50 tokens/s."""

    Options = WhisperOptions
    Preprocessor = WhisperPreprocessor

    def __init__(self, options: WhisperOptions) -> None:
        super().__init__(options)
        if options.config is not None:
            self.tower = WhisperEncoder(whisper_config(options))
        else:
            self.tower = load_pretrained(
                options.name_or_path, "whisper encoder", WhisperModel.from_pretrained, dtype=torch.float32
            ).get_encoder()

    @property
    def output_dim(self) -> int:
        return int(self.tower.config.d_model)

    @property
    def is_pretrained(self) -> bool:
        return self.options.name_or_path is not None

    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(input_features=x).last_hidden_state  # (W, max_source_positions, D)
        return hidden[:, : self.preprocessor.tokens_per_window]


# ---- CLAP ----------------------------------------------------------------------------------------------
@dataclass
class ClapOptions(ClipOptions):
    """Options of the ``clap`` encoder. The window is the feature extractor's ``max_length_s`` (10 s for
    LAION's checkpoints) or, for a random config, the longest the Swin input (``spec_size``) holds;
    ``max_seconds`` may clip shorter, and the clip is then repeat-padded to the window as CLAP was trained."""

    name_or_path: str | None = None
    """Hub id or local folder of a CLAP checkpoint (its audio tower is used)."""
    config: dict[str, Any] | None = None
    """Build a random audio tower from this ``ClapAudioConfig`` dict instead."""


def clap_config(options: ClapOptions) -> ClapAudioConfig:
    """The audio tower's ``ClapAudioConfig``: from ``options.config``, or the checkpoint's ``config.json``
    (its ``audio_config`` for a full CLAP checkpoint)."""
    _checked_pair(options, "clap")
    if options.config is not None:
        return ClapAudioConfig(**{k: v for k, v in options.config.items() if k != "model_type"})
    return load_pretrained(options.name_or_path, "clap encoder", ClapAudioConfig.from_pretrained)


class ClapPreprocessor(WindowedAudioPreprocessor):
    """The checkpoint's ``ClapFeatureExtractor`` (the default one for a random config or a folder without
    one), each window repeat-padded to the window: (1 | 4 with fusion, frames, n_mels). Tokens: the Swin
    tower's last feature grid, (spec_size / patch_stride / 2 per merge) squared, from the config."""

    feature_ndim = 3

    def __init__(self, options: ClapOptions) -> None:
        super().__init__(options)
        config = clap_config(options)
        if options.config is not None:
            self.extractor = ClapFeatureExtractor(feature_size=config.num_mel_bins)
        else:
            self.extractor = _load_extractor(options.name_or_path, ClapFeatureExtractor, config.num_mel_bins)
        hop = self.extractor.hop_length
        # The most time frames the Swin input holds (HTS-AT folds them into spec_size // n_mels rows).
        spec_frames = int(config.spec_size * (config.spec_size // config.num_mel_bins))
        window = (
            self.extractor.nb_max_samples if options.name_or_path is not None else (spec_frames - 1) * hop
        )
        if window // hop + 1 > spec_frames or self.extractor.feature_size != config.num_mel_bins:
            raise ValueError(
                f"clap encoder: the feature extractor makes {window // hop + 1} frames x "
                f"{self.extractor.feature_size} mel bins, the model takes at most {spec_frames} frames x "
                f"num_mel_bins={config.num_mel_bins}; give the checkpoint a preprocessor_config.json whose "
                "ClapFeatureExtractor matches"
            )
        self.sample_rate = int(self.extractor.sampling_rate)
        self.window_samples = int(window)
        self._set_clip(self.window_samples, "clap")
        self._truncation = "fusion" if config.enable_fusion else "rand_trunc"
        stride = config.patch_stride
        stride = stride if isinstance(stride, int) else stride[0]
        side = config.spec_size // 2 ** (len(config.depths) - 1) // stride  # one patch merge per later stage
        self.tokens_per_window = int(side * side)

    def window_features(self, wave: torch.Tensor) -> torch.Tensor:
        # The clip never exceeds the window, so neither truncation mode crops at random.
        features = self.extractor(
            wave.numpy(),
            sampling_rate=self.sample_rate,
            max_length=self.window_samples,
            truncation=self._truncation,
            return_tensors="pt",
        )["input_features"]
        return features[0].float()  # (1 | 4 with fusion, frames, n_mels)


class ClapAudioEncoder(WindowedAudioEncoder):
    """CLAP's HTS-AT audio tower: (B, 1|4, frames, n_mels) log-mel -> its last (freq x time) feature grid."""

    Options = ClapOptions
    Preprocessor = ClapPreprocessor

    def __init__(self, options: ClapOptions) -> None:
        super().__init__(options)
        if options.config is not None:
            self.tower = ClapAudioModel(clap_config(options))
        else:
            source = options.name_or_path
            self.tower = load_pretrained(
                source, "clap encoder", ClapAudioModelWithProjection.from_pretrained, dtype=torch.float32
            ).audio_model

    @property
    def output_dim(self) -> int:
        return int(self.tower.audio_encoder.num_features)

    @property
    def is_pretrained(self) -> bool:
        return self.options.name_or_path is not None

    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        is_longer = None
        if self.tower.config.enable_fusion:
            is_longer = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)  # clips fit the window
        grid = self.tower(input_features=x, is_longer=is_longer).last_hidden_state  # (W, D, F', T')
        return grid.flatten(2).transpose(1, 2)  # (W, F' * T', D)


def _load_extractor(source: str, cls: type, n_mels: int) -> Any:
    """The checkpoint's own feature extractor, or the family default when a local folder has none."""
    if Path(source).is_dir() and not (Path(source) / PREPROCESSOR_FILE).is_file():
        return cls(feature_size=n_mels)
    return load_pretrained(source, "audio feature extractor", cls.from_pretrained)


# ---- the built-in fbank transformer ---------------------------------------------------------------------
def kaldi_fbank(wave: torch.Tensor, sample_rate: int, num_frames: int) -> torch.Tensor:
    """(t,) waveform -> (N_FBANK_BINS, num_frames) normalized log-mel fbank, as ImageBind and AST compute it:
    Kaldi fbank (Hanning window, no dither), zero-padded or cropped to ``num_frames``, then
    ``(x - mean) / (2 * std)`` with the AudioSet constants."""
    frame = int(sample_rate * FBANK_FRAME_LENGTH_MS / 1000)
    wave = wave - wave.mean()
    if wave.shape[0] < frame:
        wave = nn.functional.pad(wave, (0, frame - wave.shape[0]))
    fbank = torchaudio.compliance.kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=N_FBANK_BINS,
        dither=0.0,
        frame_length=FBANK_FRAME_LENGTH_MS,
        frame_shift=FBANK_FRAME_SHIFT_MS,
    )  # (frames, bins)
    fbank = nn.functional.pad(fbank, (0, 0, 0, max(0, num_frames - fbank.shape[0])))[:num_frames]
    return ((fbank - AUDIOSET_FBANK_MEAN) / (2 * AUDIOSET_FBANK_STD)).T.contiguous()  # (bins, num_frames)


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """(length, dim) fixed sine/cosine position embeddings (Vaswani et al.)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    freqs = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs[: dim // 2])
    return table


@dataclass
class AudioTransformerOptions:
    """Options of the ``audio_transformer`` encoder (built-in, trains from scratch)."""

    max_seconds: float = 10.0
    """Seconds per window (AST: ~10 s; ImageBind: 2 s clips)."""
    chunk: bool = False
    """Cut long audio into consecutive windows and concatenate their tokens instead of clipping it."""
    max_chunks: int = DEFAULT_MAX_CHUNKS
    """With ``chunk``: the most windows per input."""
    width: int = 256
    """Transformer width (D_enc)."""
    depth: int = 4
    """Transformer layers."""
    heads: int = 4
    """Attention heads; must divide ``width``."""
    stem_channels: int = 32
    """Channels of the two stride-2 convolutions over the fbank."""
    weights: str | None = None
    """A safetensors file of this encoder's ``state_dict`` (e.g. ``encoders/audio.safetensors`` of a saved
    model); the encoder then counts as pretrained (frozen by default)."""


class AudioTransformerPreprocessor(WindowedAudioPreprocessor):
    """Kaldi fbank at 16 kHz, zero-padded to the window: (128, 100 * max_seconds). Tokens: the stem's two
    stride-2 convolutions over the frames, 25 a second."""

    feature_ndim = 2

    def __init__(self, options: AudioTransformerOptions) -> None:
        super().__init__(options)
        self.sample_rate = SAMPLE_RATE
        if options.max_seconds <= 0:
            raise ValueError(
                f"audio_transformer encoder: options.max_seconds must be > 0, got {options.max_seconds}"
            )
        self._set_clip(round(options.max_seconds * SAMPLE_RATE), "audio_transformer")
        self.num_frames = round(options.max_seconds * FBANK_FRAMES_PER_SECOND)
        self.tokens_per_window = math.ceil(math.ceil(self.num_frames / 2) / 2)

    def window_features(self, wave: torch.Tensor) -> torch.Tensor:
        return kaldi_fbank(wave, self.sample_rate, self.num_frames)  # (128, num_frames)


class AudioTransformerEncoder(WindowedAudioEncoder):
    """Kaldi fbank (128 x 100 frames/s) -> two stride-2 3x3 convolutions -> a pre-norm transformer with
    sine positions: 25 tokens per second of audio."""

    Options = AudioTransformerOptions
    Preprocessor = AudioTransformerPreprocessor
    STEM_STRIDE = 4

    def __init__(self, options: AudioTransformerOptions) -> None:
        super().__init__(options)
        if options.width % options.heads or options.width % 2:
            raise ValueError(
                f"audio_transformer encoder: options.width ({options.width}) must be even and divisible by "
                f"options.heads ({options.heads})"
            )
        c = options.stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(1, c, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        stem_bins = math.ceil(N_FBANK_BINS / self.STEM_STRIDE)
        self.proj = nn.Linear(c * stem_bins, options.width)
        self.blocks = pre_norm_transformer(options.width, options.heads, options.depth)
        self.norm = nn.LayerNorm(options.width)
        if options.weights is not None:
            load_weights(self, options.weights, "audio_transformer encoder (options.weights)")

    @property
    def output_dim(self) -> int:
        return self.options.width

    @property
    def is_pretrained(self) -> bool:
        return self.options.weights is not None

    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.stem(x.unsqueeze(1))  # (W, C, 128 / 4, frames / 4)
        tokens = self.proj(maps.permute(0, 3, 1, 2).flatten(2))  # (W, n, D)
        tokens = tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2], tokens.device).to(
            tokens.dtype
        )
        return self.norm(self.blocks(tokens))  # (W, n, D)
