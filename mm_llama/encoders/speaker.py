"""A pretrained speaker encoder: resemblyzer's GE2E network, as a plain PyTorch module.

``resemblyzer`` ships the weights (``pretrained.pt``: a 3-layer LSTM over 40-band mel frames and a linear
layer to a 256-d embedding) but its package imports ``librosa`` and ``webrtcvad`` on import; neither is
needed here. The weights are read from the installed package's file (found without importing it) into the
same layers, and its preprocessing is rebuilt with torch:

- 16 kHz mono (the shared audio decoding), volume raised (never lowered) to -30 dBFS, as
  ``resemblyzer.preprocess_wav`` does; its voice-activity trimming of long silences (``webrtcvad``) is
  left out, so give it speech without long pauses;
- the mel power spectrogram of ``resemblyzer.audio.wav_to_mel_spectrogram`` (librosa's defaults: 25 ms
  Hann windows every 10 ms, centred with zero padding, 40 Slaney mel bands, power 2, no log);
- the first ``max_seconds`` (default 1.6 s = 160 frames, one of resemblyzer's "partial utterances"); a
  shorter clip is padded with silence, as resemblyzer pads its last partial.

Output: one token per clip, the L2-normalised embedding ``relu(linear(h_last))`` that resemblyzer computes
per partial utterance. It says who speaks (voice, sex, accent), not what is said.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torchaudio
from torch import nn

from mm_llama.encoders.audio import load_audio
from mm_llama.encoders.base import MediaPreprocessor, ModalityEncoder
from mm_llama.encoders.packaged import load_packaged_state, packaged_file

PACKAGE = "resemblyzer"
WEIGHTS = "pretrained.pt"
INSTALL = "pip install --no-deps resemblyzer (or: pip install 'mm-llama[pretrained]')"
"""``--no-deps``: only the weights file is read, so librosa and webrtcvad (a C build) are not needed."""
SAMPLE_RATE = 16000
N_FFT = 400
"""25 ms windows at 16 kHz."""
HOP = 160
"""10 ms steps: 100 frames a second."""
N_MELS = 40
HIDDEN = 256
LAYERS = 3
EMBEDDING = 256
TARGET_DBFS = -30.0
INT16_MAX = 2**15 - 1
PARTIAL_SECONDS = 1.6
"""resemblyzer's partial utterance: 160 frames."""
WHAT = "resemblyzer encoder"


@dataclass
class SpeakerOptions:
    """Options of the ``resemblyzer`` encoder."""

    max_seconds: float = PARTIAL_SECONDS
    """Seconds of audio read (the first ones); shorter clips are padded with silence."""
    pretrained: bool = True
    """Load the packaged GE2E weights (frozen by default); ``False``: random weights (a baseline)."""


class SpeakerPreprocessor(MediaPreprocessor):
    """Audio -> (frames, 40) mel power spectrogram of the first ``max_seconds``; one token."""

    def __init__(self, options: SpeakerOptions) -> None:
        super().__init__(options)
        if options.max_seconds <= 0:
            raise ValueError(f"{WHAT}: options.max_seconds must be > 0, got {options.max_seconds}")
        self.samples = round(options.max_seconds * SAMPLE_RATE)
        self.mel_bank = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
        )  # (201, 40), librosa.filters.mel's

    def __call__(self, item: Any) -> torch.Tensor:
        wave = load_audio(item, SAMPLE_RATE)[: self.samples]
        rms = wave.pow(2).mean().sqrt() * INT16_MAX
        if rms > 0:
            gain_db = TARGET_DBFS - 20 * torch.log10(rms / INT16_MAX)
            if gain_db > 0:  # increase only
                wave = wave * 10 ** (gain_db / 20)
        wave = nn.functional.pad(wave, (0, self.samples - wave.shape[0]))
        spec = torch.stft(
            wave,
            N_FFT,
            HOP,
            window=torch.hann_window(N_FFT),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # (201, frames)
        return (spec.abs().pow(2).T @ self.mel_bank).float()  # (frames, 40)

    def num_tokens(self, x: torch.Tensor) -> int:
        return 1


class SpeakerEncoder(ModalityEncoder):
    """resemblyzer's GE2E voice encoder: LSTM(40 -> 256, 3 layers) -> last hidden state -> linear -> ReLU
    -> L2 norm: one 256-d token per clip."""

    modality = "audio"
    Options = SpeakerOptions
    Preprocessor = SpeakerPreprocessor

    def __init__(self, options: SpeakerOptions) -> None:
        super().__init__(options)
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING)
        if options.pretrained:
            path = packaged_file(PACKAGE, WEIGHTS, WHAT, INSTALL)
            state = load_packaged_state(path, WHAT).get("model_state")
            if not isinstance(state, dict):
                raise ValueError(f"{WHAT}: {path} has no 'model_state' dict (another resemblyzer version?)")
            # the GE2E loss's similarity_weight / similarity_bias are training-only: not part of the encoder
            state = {k: v for k, v in state.items() if not k.startswith("similarity_")}
            try:
                self.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{WHAT}: {path} does not fit the GE2E encoder: {e}") from e

    @property
    def output_dim(self) -> int:
        return EMBEDDING

    @property
    def is_pretrained(self) -> bool:
        return self.options.pretrained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(x.to(self.dtype))  # x: (B, frames, 40); hidden: (layers, B, 256)
        embedding = torch.relu(self.linear(hidden[-1]))
        return nn.functional.normalize(embedding, dim=-1).unsqueeze(1)  # (B, 1, 256)
