"""Inputs longer than the encoder reads are said, not cut silently: a warning names the file, its length
and what is kept, once per file per process; the tensors are the same as before (only a notice)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from mm_llama import EncoderConfig, ModalityConfig, MultimodalLM, ProjectorConfig
from mm_llama.cli import main
from mm_llama.encoders.audio import split_windows
from mm_llama.encoders.base import build_preprocessor
from tests.conftest import tiny_config

TINY_AUDIO: dict[str, Any] = {"max_seconds": 1.0, "width": 32, "depth": 1, "heads": 2, "stem_channels": 4}
RATE = 16000


def long_wav(path: Path, seconds: float) -> tuple[Path, np.ndarray]:
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, int(seconds * RATE)).astype(np.float32)
    sf.write(path, wave, RATE, subtype="FLOAT")
    return path, wave


def test_long_audio_is_clipped_with_a_notice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    preprocess = build_preprocessor(
        "audio", EncoderConfig(type="audio_transformer", options=dict(TINY_AUDIO))
    )
    path, wave = long_wav(tmp_path / "lecture.wav", 3.0)
    with caplog.at_level(logging.WARNING, logger="mm_llama"):
        features = preprocess(str(path))
        again = preprocess(str(path))
    notices = [r.getMessage() for r in caplog.records]
    assert notices == [
        f"audio {path}: 3.0 s, the encoder reads the first 1.0 s (set chunk: true / max_seconds to read more)"
    ]  # once per file
    assert torch.equal(features, again)
    assert torch.equal(features, preprocess(wave[:RATE]))  # the same tensor as the first second alone

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm_llama"):
        preprocess(wave[: RATE // 2])  # shorter than the window: nothing to say
    assert caplog.records == []


def test_chunked_audio_past_max_chunks_and_imu_windows_are_noticed(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.zeros(6, 1000)
    with caplog.at_level(logging.WARNING, logger="mm_llama"):
        assert len(split_windows(x, 200, chunk=True, max_chunks=2)) == 2
        assert len(split_windows(x, 200, chunk=True, max_chunks=5)) == 5  # all read: no notice
        split_windows(torch.zeros(6, 1001), 200, chunk=False, max_chunks=4, name="imu walk.csv", rate=100)
    assert [r.getMessage() for r in caplog.records] == [
        "windowed input (e.g. IMU): 1000 samples, the encoder reads the first 400 (raise max_chunks to read more)",
        "imu walk.csv: 10.0 s, the encoder reads the first 2.0 s (set chunk: true / max_seconds to read more)",
    ]


def test_chat_prints_the_clipping_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    audio = ModalityConfig(
        encoder=EncoderConfig(type="audio_transformer", options=dict(TINY_AUDIO)),
        projector=ProjectorConfig(type="mlp2x_gelu"),
    )
    config = tiny_config()
    config.modalities["audio"] = audio
    checkpoint = MultimodalLM(config).save_pretrained(tmp_path / "ckpt", copy_llm=True)
    path, _ = long_wav(tmp_path / "talk.wav", 2.5)
    main(["chat", "--checkpoint", str(checkpoint), "--audio", str(path), "--max-new-tokens", "2", "What?"])
    err = capsys.readouterr().err
    assert f"mm-llama: note: audio {path}: 2.5 s, the encoder reads the first 1.0 s" in err
