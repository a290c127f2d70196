"""Nothing trained is lost on save/load, a checkpoint never runs code, and missing parts are named."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mm_llama.llm
from mm_llama import MultimodalLM
from mm_llama.config import LLMConfig
from mm_llama.errors import MMInputError
from mm_llama.model_io import ADAPTER_DIR, CONFIG_FILE, ENCODERS_DIR, LLM_DIR
from tests.conftest import TINY_CLIP, TINY_LLAMA, tiny_config


def batch_of(model: MultimodalLM, image: np.ndarray) -> dict:
    return model.processor.collate([model.processor("<image> hi", {"image": [image]})])


def logits(model: MultimodalLM, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, return_logits=True).logits


def saved_llm(tmp_path: Path, hidden: int = 32) -> str:
    """A tiny random Llama saved as a folder, so checkpoints can reference it by path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    spec = {**TINY_LLAMA, "hidden_size": hidden, "intermediate_size": 2 * hidden, "vocab_size": 49152 + 8}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **spec)).save_pretrained(tmp_path / "base")
    mm_llama.llm.load_tokenizer(LLMConfig()).save_pretrained(tmp_path / "base")  # SmolLM2's
    return str(tmp_path / "base")


def with_lora(model: MultimodalLM) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)  # the same adapter whatever the base's precision
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # a non-zero update, so the adapter matters


def test_loaded_models_are_in_eval_mode(tiny_model: MultimodalLM, tmp_path: Path) -> None:
    tiny_model.train().save_pretrained(tmp_path / "ckpt", copy_llm=True)
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert not any(m.training for m in loaded.modules())


def test_missing_encoder_weights_refuse_to_load(tiny_model: MultimodalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    (tmp_path / "ckpt" / ENCODERS_DIR / "image.safetensors").unlink()
    with pytest.raises(MMInputError, match=r"image\.safetensors.*missing"):
        MultimodalLM.from_pretrained(tmp_path / "ckpt")


def test_truncated_weights_are_named(tiny_model: MultimodalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    file = tmp_path / "ckpt" / "projectors.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(MMInputError, match=r"projectors\.safetensors: not a readable safetensors"):
        MultimodalLM.from_pretrained(tmp_path / "ckpt")


def test_missing_adapter_refuses_to_load(tmp_path: Path, rgb_image: np.ndarray) -> None:
    config = tiny_config()
    config.llm = LLMConfig(name_or_path=saved_llm(tmp_path))
    model = MultimodalLM(config)
    with_lora(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert yaml.safe_load((tmp_path / "ckpt" / CONFIG_FILE).read_text())["llm"]["adapter"] == ADAPTER_DIR
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(
        logits(loaded, batch_of(model, rgb_image)), logits(model.eval(), batch_of(model, rgb_image))
    )
    for file in (tmp_path / "ckpt" / ADAPTER_DIR).iterdir():
        file.unlink()
    (tmp_path / "ckpt" / ADAPTER_DIR).rmdir()
    with pytest.raises(MMInputError, match=r"adapter/.*missing"):
        MultimodalLM.from_pretrained(tmp_path / "ckpt")


def test_a_fine_tuned_pretrained_encoder_stays_in_later_saves(tmp_path: Path, rgb_image: np.ndarray) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**spec)).save_pretrained(tmp_path / "clip")
    config = tiny_config()
    config.llm = LLMConfig(name_or_path=saved_llm(tmp_path))
    config.modalities["image"].encoder.options = {"name_or_path": str(tmp_path / "clip")}
    model = MultimodalLM(config)
    model.encoders["image"].requires_grad_(True)  # a stage fine-tunes the pretrained tower
    with torch.no_grad():
        for p in model.encoders["image"].parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "stage1")
    assert (tmp_path / "stage1" / ENCODERS_DIR / "image.safetensors").is_file()

    # the next stage (or chat, or export) rebuilds the model with the tower frozen again
    loaded = MultimodalLM.from_pretrained(tmp_path / "stage1")
    assert not any(p.requires_grad for p in loaded.encoders["image"].parameters())
    loaded.save_pretrained(tmp_path / "stage2")
    assert (tmp_path / "stage2" / ENCODERS_DIR / "image.safetensors").is_file()
    again = MultimodalLM.from_pretrained(tmp_path / "stage2")
    batch = batch_of(model, rgb_image)
    assert torch.equal(logits(again, batch), logits(model.eval(), batch))
    assert again.fingerprint() == loaded.fingerprint()

    # a model built from the config that loads the stage's weights (a stage's init_from) owns them too
    fresh = MultimodalLM(copy.deepcopy(config))
    fresh.load_trained_parts(tmp_path / "stage1")
    fresh.save_pretrained(tmp_path / "stage3")
    assert (tmp_path / "stage3" / ENCODERS_DIR / "image.safetensors").is_file()


def test_a_saved_config_cannot_turn_on_remote_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config()
    config.llm = LLMConfig(name_or_path=saved_llm(tmp_path))
    MultimodalLM(config).save_pretrained(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / CONFIG_FILE
    data = yaml.safe_load(file.read_text())
    data["llm"]["trust_remote_code"] = True  # what a hostile checkpoint would write
    file.write_text(yaml.safe_dump(data))
    seen = []
    real = mm_llama.llm.load_llm

    def spy(cfg: LLMConfig, **kwargs: object):
        seen.append(cfg.trust_remote_code)
        return real(cfg, **kwargs)

    monkeypatch.setattr("mm_llama.model.load_llm", spy)
    MultimodalLM.from_pretrained(tmp_path / "ckpt")
    assert seen == [False]
    assert "trust_remote_code; ignored" in caplog.text
    MultimodalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)  # the user's own call
    assert seen == [False, True]


def test_export_of_a_qlora_model_merges_into_full_precision(tmp_path: Path, rgb_image: np.ndarray) -> None:
    pytest.importorskip("bitsandbytes")
    # widths a multiple of bitsandbytes' 64-value block (its CPU kernel cannot handle a 32-wide layer)
    config = tiny_config()
    config.llm = LLMConfig(name_or_path=saved_llm(tmp_path, hidden=64))
    reference = MultimodalLM(copy.deepcopy(config))  # fp32 base + the adapter, unmerged
    quantized_config = copy.deepcopy(config)
    quantized_config.llm.quantization = "nf4"
    qlora = MultimodalLM(quantized_config)
    qlora.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("llm.")}, strict=False
    )
    with_lora(qlora)
    with_lora(reference)
    batch = batch_of(reference, rgb_image)
    qlora.save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(MMInputError, match="loaded from"):
        loaded.save_pretrained(tmp_path / "ckpt", copy_llm=True)  # export never writes into its source
    assert (tmp_path / "ckpt" / ADAPTER_DIR).is_dir()
    loaded.save_pretrained(tmp_path / "export", copy_llm=True)
    assert (tmp_path / "export" / LLM_DIR).is_dir() and not (tmp_path / "export" / ADAPTER_DIR).exists()
    exported = MultimodalLM.from_pretrained(tmp_path / "export")
    assert exported.config.llm.quantization == "none"
    assert torch.allclose(logits(exported, batch), logits(reference.eval(), batch), atol=1e-4)


def test_weights_of_another_shape_are_named(tiny_model: MultimodalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    file = tmp_path / "ckpt" / CONFIG_FILE
    data = yaml.safe_load(file.read_text())
    data["modalities"]["image"]["projector"]["type"] = "linear"  # the saved weights are an MLP's
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(
        MMInputError, match=r"projectors\.safetensors: its weights do not fit the image projector"
    ):
        MultimodalLM.from_pretrained(tmp_path / "ckpt")
