"""Fixtures for the training tests: a tiny colour world on disk and tiny two-stage configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama.config import EncoderConfig, ModalityConfig, ModelConfig, ProjectorConfig
from mm_llama.train.config import LoraSettings, StageConfig, TrainConfig
from tests.conftest import TINY_CLIP, tiny_llm_config

IMAGE_SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
}
NUM_RECORDS = 8
PIXEL_NOISE = 20


def write_colour_world(root: Path, n: int = NUM_RECORDS) -> dict[str, Path]:
    """``n`` noisy single-colour images with a caption file (stage 1) and a question file (stage 2)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    align, instruct = [], []
    names = list(COLORS)
    for i in range(n):
        colour = names[i % len(names)]
        pixels = np.clip(
            np.array(COLORS[colour]) + rng.integers(-PIXEL_NOISE, PIXEL_NOISE, (IMAGE_SIZE, IMAGE_SIZE, 3)),
            0,
            255,
        )
        Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"{i}.png")
        image = f"images/{i}.png"
        align.append(
            {
                "id": f"a{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"a {colour} picture"},
                ],
            }
        )
        instruct.append(
            {
                "id": f"q{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    paths = {"align": root / "align.json", "instruct": root / "instruct.json"}
    paths["align"].write_text(json.dumps(align))
    paths["instruct"].write_text(json.dumps(instruct))
    return paths


@pytest.fixture
def colour_world(tmp_path: Path) -> dict[str, Path]:
    return write_colour_world(tmp_path / "world")


def tiny_model_config(freeze_encoder: bool | None = None) -> ModelConfig:
    """The tiny random LLM and CLIP tower from tests/conftest.py; the encoder trains unless frozen."""
    encoder = EncoderConfig(type="hf_vision", options={"config": dict(TINY_CLIP)}, freeze=freeze_encoder)
    return ModelConfig(
        llm=tiny_llm_config(),
        modalities={"image": ModalityConfig(encoder=encoder, projector=ProjectorConfig(type="mlp2x_gelu"))},
        system_prompt="Be brief.",
    )


def align_stage(data: dict[str, Path], **overrides: Any) -> StageConfig:
    """Stage 1 on the colour world: plain template, frozen LLM, a few quick steps."""
    settings: dict[str, Any] = {
        "data": [str(data["align"])],
        "template": "plain",
        "llm": "frozen",
        "lr": 1e-2,
        "batch_size": 4,
        "micro_batch_size": 2,
        "max_steps": 6,
        "warmup_ratio": 0.0,
        "log_every": 1,
        **overrides,
    }
    return StageConfig(**settings)


def instruct_stage(data: dict[str, Path], **overrides: Any) -> StageConfig:
    """Stage 2 on the colour world: chat template, QLoRA, projector at its own learning rate."""
    settings: dict[str, Any] = {
        "data": [str(data["instruct"])],
        "template": "chat",
        "llm": "qlora",
        "lora": LoraSettings(r=4, alpha=8, dropout=0.0),
        "train_encoders": "none",
        "lr": 1e-2,
        "projector_lr": 5e-3,
        "batch_size": 4,
        "micro_batch_size": 2,
        "max_steps": 6,
        "warmup_ratio": 0.0,
        "log_every": 1,
        **overrides,
    }
    return StageConfig(**settings)


def tiny_train_config(output_dir: Path, stages: dict[str, StageConfig], **model_kwargs: Any) -> TrainConfig:
    return TrainConfig(
        model=tiny_model_config(**model_kwargs), stages=stages, output_dir=str(output_dir), seed=0
    )


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models run several times faster on one thread than on two busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
