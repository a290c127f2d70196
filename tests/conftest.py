"""Shared fixtures: tiny random models (2-layer Llama with hidden 32, an 8x8-patch CLIP tower on 32 px)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from mm_llama import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig

TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
TINY_CLIP: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_llm_config(**overrides: Any) -> LLMConfig:
    """A 2-layer, hidden-32 Llama with random weights and SmolLM2's tokenizer."""
    return LLMConfig(from_config=copy.deepcopy(TINY_LLAMA), **overrides)


def tiny_image_modality(projector: str = "mlp2x_gelu", **options: Any) -> ModalityConfig:
    """The tiny CLIP tower (random weights) behind the given projector."""
    return ModalityConfig(
        encoder=EncoderConfig(type="hf_vision", options={"config": copy.deepcopy(TINY_CLIP), **options}),
        projector=ProjectorConfig(type=projector),
    )


def tiny_config(**overrides: Any) -> ModelConfig:
    """An image-only tiny model config with a short system prompt."""
    fields: dict[str, Any] = {"system_prompt": "Be brief.", **overrides}
    return ModelConfig(llm=tiny_llm_config(), modalities={"image": tiny_image_modality()}, **fields)


@pytest.fixture
def tiny_model() -> MultimodalLM:
    """An image-only tiny model (seeded, so two calls build identical weights)."""
    torch.manual_seed(0)
    return MultimodalLM(tiny_config()).eval()


@pytest.fixture
def rgb_image() -> np.ndarray:
    """A 40x50 RGB uint8 image with fixed random content."""
    return np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
