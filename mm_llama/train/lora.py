"""LoRA and QLoRA adapters on the LLM, through PEFT.

QLoRA (Dettmers et al., 2023): the LLM is loaded in 4-bit NF4 with double quantization (see
``mm_llama.llm.quantization_config``), prepared with ``peft.prepare_model_for_kbit_training`` (norms and
other small parameters in fp32, optional gradient checkpointing), and LoRA adapters on every linear
layer train on top in full precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from mm_llama.model import MultimodalLM
from mm_llama.train.config import StageConfig

logger = logging.getLogger(__name__)

CHECKPOINTING_KWARGS = {"use_reentrant": False}
"""Non-reentrant checkpointing: correct with inputs_embeds that require grad and with frozen layers."""


def lora_config(stage: StageConfig) -> LoraConfig:
    """PEFT's ``LoraConfig`` for the stage's ``lora`` settings (causal LM, no bias training)."""
    return LoraConfig(
        r=stage.lora.r,
        lora_alpha=stage.lora.alpha,
        lora_dropout=stage.lora.dropout,
        target_modules=stage.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: MultimodalLM, stage: StageConfig, adapter: str | Path | None = None) -> None:
    """Wrap ``model.llm`` in a PEFT model with LoRA adapters: new ones from ``stage.lora``, or the saved
    ``adapter`` folder (to continue training it). For ``qlora`` the LLM must already be 4-bit."""
    if stage.llm not in ("lora", "qlora"):
        raise ValueError(f"add_lora: stage llm is {stage.llm!r}; adapters are for llm: lora or qlora")
    llm = model.llm
    quantized = bool(getattr(llm, "is_loaded_in_4bit", False) or getattr(llm, "is_loaded_in_8bit", False))
    if stage.llm == "qlora" and not quantized:
        raise ValueError("llm: qlora needs the LLM loaded in 4 bits (model.llm.quantization: nf4)")
    if quantized:
        llm = prepare_model_for_kbit_training(
            llm,
            use_gradient_checkpointing=stage.gradient_checkpointing,
            gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS,
        )
    if adapter is not None:
        model.llm = PeftModel.from_pretrained(llm, adapter, is_trainable=True)
        logger.info("continuing the LoRA adapter from %s", adapter)
    else:
        model.llm = get_peft_model(llm, lora_config(stage))


def enable_gradient_checkpointing(model: MultimodalLM) -> None:
    """Recompute the LLM's layer activations during the backward pass instead of storing them."""
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
