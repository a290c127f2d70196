"""Audio: decoding files the tests write (WAV, OGG, MP3, AAC via PyAV), mono/resampling, features, the
Whisper / CLAP / built-in encoders (random configs, saved and loaded back by path), long-audio policy,
bad files, and tiny MultimodalLMs with audio + IMU (plus the real SmolLM2)."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from mm_llama import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig
from mm_llama.encoders import build_encoder
from mm_llama.encoders.audio import (
    AUDIOSET_FBANK_MEAN,
    AUDIOSET_FBANK_STD,
    N_FBANK_BINS,
    SAMPLE_RATE,
    AudioTransformerEncoder,
    AudioTransformerOptions,
    ClapAudioEncoder,
    ClapOptions,
    WhisperAudioEncoder,
    WhisperOptions,
    kaldi_fbank,
    load_audio,
)
from tests.conftest import tiny_llm_config

FILE_RATE = 44100
TONE_HZ = 440.0
SECONDS = 1.0
TINY_WHISPER: dict[str, Any] = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 16,
    "max_source_positions": 50,  # a 1 s window: 100 mel frames -> 50 tokens
    "max_target_positions": 16,
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}
TINY_CLAP_AUDIO: dict[str, Any] = {
    "spec_size": 64,
    "num_mel_bins": 16,
    "depths": [1, 1],
    "num_attention_heads": [2, 2],
    "patch_embeds_hidden_size": 16,
    "hidden_size": 32,
    "window_size": 4,
}
TINY_CLAP_TOKENS = 64  # spec 64 / patch stride 4 / one merge = 8 x 8
TINY_AUDIO_TRANSFORMER: dict[str, Any] = {
    "max_seconds": 1.0,
    "width": 32,
    "depth": 1,
    "heads": 2,
    "stem_channels": 4,
}
TINY_IMU: dict[str, Any] = {
    "window": 64,
    "patch_size": 8,
    "width": 32,
    "depth": 1,
    "heads": 2,
    "min_samples": 8,
}


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """(T, C) float32: a 440 Hz sine, channel c at amplitude 0.5 / (c + 1)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * TONE_HZ * t)
    return np.stack([wave * 0.5 / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def write_audio(path: Path, fmt: str, subtype: str, channels: int = 2, rate: int = FILE_RATE) -> Path:
    sf.write(path, tone(SECONDS, rate, channels), rate, format=fmt, subtype=subtype)
    return path


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.argmax(spectrum)) * rate / len(wave)


@pytest.fixture
def wav_file(tmp_path: Path) -> Path:
    """A 1 s stereo 44.1 kHz 16-bit WAV: 440 Hz at amplitude 0.5 (left) and 0.25 (right)."""
    return write_audio(tmp_path / "tone.wav", "WAV", "PCM_16")


# ---- decoding ------------------------------------------------------------------------------------------
def test_stereo_44k_wav_becomes_mono_16k(wav_file: Path) -> None:
    wave = load_audio(wav_file, SAMPLE_RATE)
    assert wave.shape == (SAMPLE_RATE,) and wave.dtype == torch.float32
    expected = 0.375 * np.sin(
        2 * np.pi * TONE_HZ * np.arange(SAMPLE_RATE) / SAMPLE_RATE
    )  # mean of 0.5 and 0.25
    inner = slice(100, -100)  # away from the resampler's edges
    assert np.abs(wave.numpy()[inner] - expected[inner]).max() < 5e-3
    assert torch.equal(load_audio(wav_file.read_bytes(), SAMPLE_RATE), wave)
    with wav_file.open("rb") as f:
        assert torch.equal(load_audio(f, SAMPLE_RATE), wave)


@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype"), [("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")]
)
def test_compressed_files_decode(tmp_path: Path, suffix: str, fmt: str, subtype: str) -> None:
    path = write_audio(tmp_path / f"tone.{suffix}", fmt, subtype)
    wave = load_audio(path, SAMPLE_RATE)
    assert abs(wave.shape[0] - SAMPLE_RATE) < 0.02 * SAMPLE_RATE
    assert abs(peak_hz(wave, SAMPLE_RATE) - TONE_HZ) < 2.0
    assert 0.3 < wave.abs().max() < 0.45  # mono mix of 0.5 and 0.25


def test_formats_libsndfile_cannot_open_go_through_pyav(tmp_path: Path) -> None:
    samples = tone(SECONDS, FILE_RATE)[:, 0]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=FILE_RATE)
        stream.layout = "mono"
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(
                samples[None, start : start + 1024].copy(), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = FILE_RATE, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    path = tmp_path / "tone.aac"
    path.write_bytes(buffer.getvalue())
    wave = load_audio(path, SAMPLE_RATE)
    assert abs(wave.shape[0] - SAMPLE_RATE) < 0.1 * SAMPLE_RATE  # AAC adds priming samples
    assert abs(peak_hz(wave, SAMPLE_RATE) - TONE_HZ) < 2.0


def test_arrays_tensors_and_tuples() -> None:
    stereo = tone(SECONDS, SAMPLE_RATE, channels=2)  # (T, 2)
    mono = stereo.mean(axis=1)
    for item in (stereo, stereo.T, torch.from_numpy(stereo.T.copy())):
        assert torch.allclose(load_audio(item, SAMPLE_RATE), torch.from_numpy(mono), atol=1e-6)
    as_int16 = (mono * 32767).astype(np.int16)
    assert torch.allclose(load_audio(as_int16, SAMPLE_RATE), torch.from_numpy(mono), atol=1e-4)
    resampled = load_audio((tone(SECONDS, 8000)[:, 0], 8000), SAMPLE_RATE)
    assert resampled.shape == (SAMPLE_RATE,)
    assert abs(peak_hz(resampled, SAMPLE_RATE) - TONE_HZ) < 2.0


def test_kaldi_fbank_shape_and_zero_padding() -> None:
    wave = torch.from_numpy(tone(0.5, SAMPLE_RATE)[:, 0])
    fbank = kaldi_fbank(wave, SAMPLE_RATE, num_frames=100)  # 0.5 s gives 48 frames, padded to 100
    assert fbank.shape == (N_FBANK_BINS, 100)
    padded = torch.full((N_FBANK_BINS, 52), -AUDIOSET_FBANK_MEAN / (2 * AUDIOSET_FBANK_STD))
    assert torch.allclose(fbank[:, 48:], padded)
    assert not torch.allclose(fbank[:, :48], padded[:, :48])


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype", "problem"),
    [
        ("wav", "WAV", "PCM_16", "truncated"),
        ("mp3", "MP3", "MPEG_LAYER_III", "truncated"),
        ("flac", "FLAC", "PCM_16", ""),
    ],
)
def test_truncated_files_raise(tmp_path: Path, suffix: str, fmt: str, subtype: str, problem: str) -> None:
    whole = write_audio(tmp_path / f"whole.{suffix}", fmt, subtype).read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{cut}.*{problem}"):
        load_audio(cut, SAMPLE_RATE)


def test_corrupt_and_empty_inputs_raise(tmp_path: Path) -> None:
    garbage = tmp_path / "noise.wav"
    garbage.write_bytes(b"RIFF\x00\x10\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"cannot decode audio {garbage}.*soundfile.*PyAV"):
        load_audio(garbage, SAMPLE_RATE)
    with pytest.raises(ValueError, match="no samples"):
        load_audio(np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="NaN"):
        load_audio(np.array([0.0, np.nan, 0.1], dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample rate"):
        load_audio((np.zeros(10, dtype=np.float32), 0), SAMPLE_RATE)


# ---- Whisper -------------------------------------------------------------------------------------------
def tiny_whisper(**options: Any) -> WhisperAudioEncoder:
    return WhisperAudioEncoder(WhisperOptions(config=copy.deepcopy(TINY_WHISPER), **options))


def test_whisper_window_clip_and_chunks(wav_file: Path) -> None:
    torch.manual_seed(0)
    encoder = tiny_whisper().eval()
    x = encoder.preprocess(wav_file)
    assert x.shape == (16, 100)  # n_mels x (2 x max_source_positions)
    assert encoder(x[None]).shape == (1, 50, 32) and encoder.num_tokens(x) == 50

    clipped = tiny_whisper(max_seconds=0.4).eval()
    x = clipped.preprocess(wav_file)
    assert x.shape == (16, 100)  # still padded to the window the model requires
    assert torch.all(x[:, 45:] == x[0, -1])  # silence after 0.4 s (one log-mel floor value)
    assert clipped(x[None]).shape == (1, 20, 32) and clipped.num_tokens(x) == 20  # 50 tokens/s

    chunked = tiny_whisper(max_seconds=0.4, chunk=True, max_chunks=2).eval()
    x = chunked.preprocess(wav_file)  # 1 s -> 3 windows of 0.4 s, capped at 2
    assert x.shape == (2, 16, 100)
    out = chunked(torch.stack([x, x]))
    assert out.shape == (2, 40, 32) and chunked.num_tokens(x) == 40
    with pytest.raises(ValueError, match=r"max_seconds must be in \(0, 1\] s"):
        tiny_whisper(max_seconds=2.0)


def test_whisper_saved_folder_loads_by_path(tmp_path: Path, wav_file: Path) -> None:
    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(**TINY_WHISPER)).eval()
    model.save_pretrained(tmp_path / "whisper")
    encoder = build_encoder(
        "audio", EncoderConfig(type="whisper", options={"name_or_path": str(tmp_path / "whisper")})
    )
    assert encoder.is_pretrained and not any(p.requires_grad for p in encoder.parameters())
    x = encoder.preprocess(wav_file)
    reference = WhisperFeatureExtractor(feature_size=16)(
        load_audio(wav_file, SAMPLE_RATE).numpy(),
        sampling_rate=SAMPLE_RATE,
        max_length=SAMPLE_RATE,
        return_tensors="pt",
    )["input_features"]
    assert torch.allclose(x, reference[0])
    with torch.no_grad():
        expected = model.encoder(input_features=reference).last_hidden_state
        assert torch.allclose(encoder.eval()(x[None]), expected, atol=1e-5)


# ---- CLAP ----------------------------------------------------------------------------------------------
def test_clap_random_tower_shapes(wav_file: Path) -> None:
    torch.manual_seed(0)
    encoder = ClapAudioEncoder(ClapOptions(config=copy.deepcopy(TINY_CLAP_AUDIO))).eval()
    assert encoder.preprocessor.sample_rate == 48000 and not encoder.is_pretrained
    x = encoder.preprocess(wav_file)
    assert x.shape == (1, 256, 16)  # (channels, frames, mel bins): the window fills the 64 x 4 Swin input
    assert encoder(x[None]).shape == (1, TINY_CLAP_TOKENS, 32) and encoder.num_tokens(x) == TINY_CLAP_TOKENS

    fused = ClapAudioEncoder(
        ClapOptions(config={**TINY_CLAP_AUDIO, "enable_fusion": True}, max_seconds=0.5)
    ).eval()
    x = fused.preprocess(wav_file)
    assert x.shape == (4, 256, 16)  # fusion models take 4 copies
    assert fused(x[None]).shape == (1, TINY_CLAP_TOKENS, 32)
    with pytest.raises(ValueError, match="max_seconds"):
        ClapAudioEncoder(ClapOptions(config=copy.deepcopy(TINY_CLAP_AUDIO), max_seconds=10.0))


def test_clap_saved_folder_loads_by_path(tmp_path: Path, wav_file: Path) -> None:
    torch.manual_seed(0)
    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    config = ClapConfig(text_config=text, audio_config=TINY_CLAP_AUDIO, projection_dim=16)
    model = ClapModel(config).eval()
    model.save_pretrained(tmp_path / "clap")
    ClapFeatureExtractor(feature_size=16, max_length_s=2).save_pretrained(
        tmp_path / "clap"
    )  # fits spec_size 64
    encoder = ClapAudioEncoder(ClapOptions(name_or_path=str(tmp_path / "clap"))).eval()
    assert encoder.is_pretrained
    x = encoder.preprocess((tone(SECONDS, 48000)[:, 0], 48000))
    assert x.shape == (1, 201, 16)  # 2 s at 48 kHz, hop 480
    with torch.no_grad():
        expected = model.audio_model(input_features=x[None]).last_hidden_state.flatten(2).transpose(1, 2)
        assert torch.allclose(encoder(x[None]), expected, atol=1e-5)


# ---- built-in fbank transformer ------------------------------------------------------------------------
def test_audio_transformer_shapes_chunks_and_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    three_seconds = (tone(3.0, SAMPLE_RATE)[:, 0], SAMPLE_RATE)
    encoder = AudioTransformerEncoder(AudioTransformerOptions(**TINY_AUDIO_TRANSFORMER)).eval()
    x = encoder.preprocess(three_seconds)
    assert x.shape == (N_FBANK_BINS, 100)  # clipped to the first second
    assert encoder(x[None]).shape == (1, 25, 32) and encoder.num_tokens(x) == 25

    chunked = AudioTransformerEncoder(AudioTransformerOptions(**TINY_AUDIO_TRANSFORMER, chunk=True)).eval()
    chunked.load_state_dict(encoder.state_dict())
    xs = chunked.preprocess(three_seconds)
    assert xs.shape == (3, N_FBANK_BINS, 100)
    with torch.no_grad():
        tokens = chunked(xs[None])
        assert tokens.shape == (1, 75, 32) and chunked.num_tokens(xs) == 75
        assert torch.allclose(tokens[:, :25], encoder(x[None]), atol=1e-5)  # window 1 alone = the clipped run

    weights = tmp_path / "audio.safetensors"
    save_file(encoder.state_dict(), weights)
    loaded = AudioTransformerEncoder(
        AudioTransformerOptions(**TINY_AUDIO_TRANSFORMER, weights=str(weights))
    ).eval()
    assert loaded.is_pretrained
    with torch.no_grad():
        assert torch.equal(loaded(x[None]), encoder(x[None]))
    with pytest.raises(ValueError, match=rf"{weights} does not match.*proj.weight"):
        AudioTransformerEncoder(
            AudioTransformerOptions(**{**TINY_AUDIO_TRANSFORMER, "width": 16}, weights=str(weights))
        )


# ---- end to end ----------------------------------------------------------------------------------------
def audio_imu_config(llm: LLMConfig) -> ModelConfig:
    return ModelConfig(
        llm=llm,
        modalities={
            "audio": ModalityConfig(
                encoder=EncoderConfig(
                    type="audio_transformer", options=copy.deepcopy(TINY_AUDIO_TRANSFORMER)
                ),
                projector=ProjectorConfig(type="mlp2x_gelu"),
            ),
            "imu": ModalityConfig(
                encoder=EncoderConfig(type="imu_transformer", options=copy.deepcopy(TINY_IMU)),
                projector=ProjectorConfig(type="linear"),
            ),
        },
        system_prompt="Be brief.",
    )


def test_tiny_model_with_audio_and_imu(wav_file: Path) -> None:
    torch.manual_seed(0)
    model = MultimodalLM(audio_imu_config(tiny_llm_config()))
    imu = np.random.default_rng(0).normal(size=(100, 6))  # at the encoder's 200 Hz
    conversation = [
        {"role": "user", "content": "<audio> <imu>\nWhat is happening?"},
        {"role": "assistant", "content": "Someone walks past a humming fridge."},
    ]
    example = model.processor(conversation, {"audio": [wav_file], "imu": [imu]})
    batch = model.processor.collate([example])
    ids = batch["input_ids"][0]
    assert int((ids == model.processor.placeholder_ids["audio"]).sum()) == 25
    assert int((ids == model.processor.placeholder_ids["imu"]).sum()) == 9  # CLS + 64 / 8 patches
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
    assert torch.isfinite(out.loss) and out.num_label_tokens > 0
    out.loss.backward()
    assert model.encoders["audio"].proj.weight.grad is not None  # from-scratch encoders train
    assert model.projectors["imu"].proj.weight.grad is not None

    model.eval()
    answer = model.generate("<audio> <imu>\nWhat?", audios=[wav_file], imus=[imu], max_new_tokens=4)
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="1 <audio> marker"):
        model.generate("<audio> <imu>\nWhat?", audios=[wav_file, wav_file], imus=[imu], max_new_tokens=1)


@pytest.mark.slow
def test_real_smollm2_answers_about_audio(wav_file: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        llm=LLMConfig(name_or_path="smollm2-135m"),
        modalities={
            "audio": ModalityConfig(encoder=EncoderConfig(type="whisper", options={"config": TINY_WHISPER}))
        },
        system_prompt="Be brief.",
    )
    model = MultimodalLM(config).eval()
    answer = model.generate("<audio>\nWhat do you hear?", audios=[wav_file], max_new_tokens=6)
    assert isinstance(answer, str) and answer
    pieces = list(
        model.generate("<audio>\nWhat do you hear?", audios=[wav_file], max_new_tokens=6, stream=True)
    )
    assert "".join(pieces).strip() == answer
