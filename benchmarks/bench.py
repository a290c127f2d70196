"""mm_llama's ``MultimodalLM`` against transformers' Llava at every stage, in one run, on the same weights.

The one benchmark entry point. Both implementations run the same modules: a CLIP vision tower built from
a config (random weights, 14 px patches, LLaVA's penultimate-layer patch features), an ``mlp2x_gelu``
projector and the LLM. ``LlavaForConditionalGeneration`` is built on the meta device and then given *the
very modules* of the ``MultimodalLM`` (its CLIP tower, Llama decoder and LM head, the classes Llava would
build itself); its projector is transformers' own ``LlavaMultiModalProjector`` loaded with the mm_llama
projector's weights. The LLM's vocabulary grows to hold the ``<image>`` placeholder id, which HF Llava
looks up in the embedding table (mm_llama never does); both see that vocabulary. LoRA is applied once,
by mm_llama's own ``add_lora`` (PEFT), to the shared LLM, so both train the very same adapters; for QLoRA
the LLM is quantized once to 4-bit NF4 (bitsandbytes, mm_llama's ``quantization_config``) and shared too.

Measured, interleaved in one process (the order alternates every repeat; every function is warmed up
once untimed, and the table shows medians):

- ``stage1_step``: forward + backward of a stage-1 step (projector trains; tower and LLM frozen) from
  preprocessed images, on a LLaVA-style batch: one image and a short question per sample, labels on a
  short answer only;
- ``stage1_cached_step``: the same step where mm_llama reads the tower's features from its feature cache
  (``mm_llama.data.feature_cache``: the batch is made by the cached processor, the step runs the forward's
  ``features=``) while HF Llava runs its tower, since it has no such cache: the comparison a user sees;
- ``stage2_lora_step``: LoRA adapters (r, alpha, every linear layer of the LLM) + projector train;
- ``stage2_qlora_step``: the same with the LLM in 4-bit NF4 (``prepare_model_for_kbit_training``);
- ``prefill`` / ``decode_b1`` / ``decode_b8``: one greedy generation per repeat at batch 1 and 8, through
  each implementation's public ``generate`` from raw images and prompts, exactly ``--new-tokens`` tokens
  per prompt (EOS suppressed). A logits processor that only reads the clock splits it: prefill is the
  time from the call to the first logits at batch 1 (preprocessing, tower, projector and the prompt's
  forward); decode tokens/s is ``batch x (new_tokens - 1)`` over the time from the first logits to the
  last;
- ``memory_stage1`` / ``memory_stage2``: peak memory of the stage-1 step and of the stage-2 (QLoRA)
  step above what was allocated before it (CUDA: ``max_memory_allocated``; CPU: the PyTorch CPU
  allocator's running total as recorded by ``torch.profiler``); the LoRA and cached steps' peaks are in
  the JSON too. The warm-up call of each step is its memory measurement.

Parity is checked and kept in the JSON: loss and logits of one sample, the loss of every step on both
sides, the cached batch's ids against the raw one's, and identical greedy texts. ``ratios`` holds, for
each of the nine measures, how many times better mm_llama is (>1: faster or leaner). See
``benchmarks/README.md`` for how to read them.

    python benchmarks/bench.py --quick --threads 1 --json results.json
    python benchmarks/bench.py --device cuda --dtype bfloat16 --llm llama3-8b --json results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import bitsandbytes
import matplotlib
import numpy as np
import peft
import torch
import transformers
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mm_llama import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig
from mm_llama.data.feature_cache import cache_features, cached_processor
from mm_llama.errors import MMInputError
from mm_llama.llm import load_llm, load_tokenizer, quantization_config
from mm_llama.train.config import LoraSettings, StageConfig
from mm_llama.train.lora import add_lora

matplotlib.use("Agg")  # a PNG file, no display
from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)

LLMChoice = Literal["smollm2-135m", "tiny", "llama3-8b"]
VisionChoice = Literal["vit-l", "vit-b", "vit-s", "tiny"]
DtypeChoice = Literal["float32", "bfloat16"]

PATCH_SIZE = 14
LLM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
"""Random-weight Llamas (SmolLM2's tokenizer): ``tiny`` (2 layers, hidden 32) for smoke runs, and Llama 3
8B's shape (its 128k vocabulary, untied head) for GPU runs: 16 GB in bf16, built directly on the device."""
VISION_PRESETS: dict[str, dict[str, int]] = {
    "vit-l": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    "vit-b": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "vit-s": {
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
    },
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
}
"""CLIP vision towers (14 px patches, random weights): ``vit-l`` is CLIP ViT-L/14, LLaVA-1.5's tower;
``vit-b`` and ``vit-s`` have ViT-B's and ViT-S's width and depth; ``tiny`` is for smoke runs."""
SYSTEM_PROMPT = "Be brief."
QUESTION = "<image>\nWhat is shown in this picture?"
ANSWER = "A red ball on a wooden table."
"""The LLaVA situation: hundreds of image tokens, a short question, labels on a short answer only."""
DECODE_BATCHES = (1, 8)
"""Batch sizes of ``decode_b1`` and ``decode_b8``."""
MM_LLAMA = "mm_llama"
HF_LLAVA = "hf_llava"
RATIO_KEYS = (
    "stage1_step",
    "stage1_cached_step",
    "stage2_lora_step",
    "stage2_qlora_step",
    "prefill",
    "decode_b1",
    "decode_b8",
    "memory_stage1",
    "memory_stage2",
)
"""The nine measures of ``ratios``, each "how many times better mm_llama is"."""
LABELS = {
    "stage1_step": "stage-1 step, projector only (s)",
    "stage1_cached_step": "stage-1 step, mm_llama from its feature cache (s)",
    "stage2_lora_step": "stage-2 LoRA step (s)",
    "stage2_qlora_step": "stage-2 QLoRA step, NF4 (s)",
    "prefill": "prefill, batch 1, call to first logits (s)",
    "decode_b1": "greedy decode, batch 1 (tokens/s)",
    "decode_b8": "greedy decode, batch 8 (tokens/s)",
    "memory_stage1": "stage-1 step peak memory above weights (MiB)",
    "memory_stage2": "stage-2 QLoRA step peak memory above weights (MiB)",
}


@dataclass
class BenchSettings:
    """What to benchmark and how; the CLI flags map one to one onto these fields."""

    llm: LLMChoice = "smollm2-135m"
    """``smollm2-135m``: the real SmolLM2-135M-Instruct; ``tiny`` or ``llama3-8b``: random weights."""
    vision: VisionChoice = "vit-l"
    """CLIP tower size (random weights, built from a config)."""
    image_size: int = 336
    """Input side in pixels, a multiple of 14 (LLaVA-1.5: 336, i.e. 576 image tokens; 224: 256)."""
    batch: int = 8
    """Training batch size."""
    repeats: int = 5
    """Timed repeats per implementation and measure (after one warm-up run each)."""
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: DtypeChoice = "float32"
    """Dtype of every weight (vision tower, projector, LLM; the NF4 LLM's compute dtype)."""
    lora_r: int = 128
    lora_alpha: int = 256
    """LoRA rank and scaling numerator (LLaVA-1.5's 128 / 256), on every linear layer of the LLM."""
    new_tokens: int = 32
    """Tokens generated per prompt by the decode measures (EOS is suppressed until then)."""
    seq_len: int | None = None
    """Tokens of every training sample: the answer is repeated and cut there (labels on all of it), e.g.
    2048 for QLoRA memory at LLaVA's longest conversations; ``None``: the short answer alone."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for PyTorch (``torch.set_num_threads``); ``None`` keeps PyTorch's default. On a CPU
    shared with other processes, fewer threads than cores avoids OpenMP oversubscription stalls."""


QUICK: dict[str, Any] = {"vision": "vit-s", "image_size": 224, "batch": 2, "repeats": 1}
"""``--quick``'s defaults (explicit flags still win): a ViT-S-shaped tower at 224 px (256 image tokens),
batch 2, one timed repeat; still the real SmolLM2-135M and 32 new tokens."""


@dataclass
class Pair:
    """The two implementations over shared weights, and the device they run on."""

    ours: MultimodalLM
    hf: LlavaForConditionalGeneration
    device: torch.device
    answer: str = ANSWER
    """The training samples' answer (see :func:`answer`)."""


# ---- building ------------------------------------------------------------------------------------------
def check_settings(settings: BenchSettings) -> None:
    """Reject settings that cannot run, naming the flag."""
    if settings.image_size % PATCH_SIZE:
        raise MMInputError(f"--image-size: expected a multiple of {PATCH_SIZE}, got {settings.image_size}")
    for flag, value, least in (("--repeats", settings.repeats, 1), ("--batch", settings.batch, 1)):
        if value < least:
            raise MMInputError(f"{flag}: expected at least {least}, got {value}")
    if settings.new_tokens < 2:
        raise MMInputError(
            f"--new-tokens: expected at least 2 (decode is timed past the first), got {settings.new_tokens}"
        )
    if settings.seq_len is not None and settings.seq_len < 2 * image_tokens(settings):
        raise MMInputError(
            f"--seq-len: expected at least twice the {image_tokens(settings)} image tokens (room for the "
            f"answer), got {settings.seq_len}"
        )
    if settings.llm == "llama3-8b" and settings.device != "cuda":
        raise MMInputError("--llm llama3-8b: expected --device cuda (its 8B random weights are for GPU runs)")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise MMInputError("--device cuda: torch.cuda.is_available() is False on this machine")


def model_config(settings: BenchSettings) -> ModelConfig:
    """The ``MultimodalLM`` config: a frozen random CLIP tower, ``mlp2x_gelu``, the chosen LLM."""
    if settings.llm in LLM_PRESETS:
        llm = LLMConfig(from_config=copy.deepcopy(LLM_PRESETS[settings.llm]), dtype=settings.dtype)
    else:
        llm = LLMConfig(name_or_path=settings.llm, dtype=settings.dtype)
    clip = {
        "model_type": "clip_vision_model",
        **VISION_PRESETS[settings.vision],
        "image_size": settings.image_size,
        "patch_size": PATCH_SIZE,
    }
    image = ModalityConfig(
        encoder=EncoderConfig(type="hf_vision", options={"config": clip}, freeze=True),
        projector=ProjectorConfig(type="mlp2x_gelu"),
    )
    config = ModelConfig(llm=llm, modalities={"image": image}, system_prompt=SYSTEM_PROMPT)
    return config if settings.seq_len is None else replace(config, max_length=settings.seq_len)


def image_tokens(settings: BenchSettings) -> int:
    """Image tokens per sample: one per 14 px patch."""
    return (settings.image_size // PATCH_SIZE) ** 2


def answer(settings: BenchSettings) -> str:
    """The training answer: :data:`ANSWER`, repeated past ``seq_len`` when set (the processor cuts a
    training reply at ``max_length``, so every sample is exactly ``seq_len`` tokens)."""
    if settings.seq_len is None:
        return ANSWER
    return " ".join([ANSWER] * (settings.seq_len // 4))  # > seq_len tokens: every word is >= 1 token


def build_model(settings: BenchSettings) -> MultimodalLM:
    """The ``MultimodalLM`` on ``settings.device``, everything frozen; a random LLM is built on the device
    (an 8B one never exists on the CPU)."""
    device, dtype = torch.device(settings.device), getattr(torch, settings.dtype)
    config = model_config(settings)
    tokenizer = load_tokenizer(config.llm)
    torch.manual_seed(settings.seed)
    if config.llm.from_config is not None:
        with device:
            llm = load_llm(config.llm, vocab_size=len(tokenizer))
    else:
        llm = load_llm(config.llm)
    ours = MultimodalLM(config, llm=llm, tokenizer=tokenizer)
    if len(ours.tokenizer) > ours.llm.config.vocab_size:  # rows for the placeholder ids HF Llava looks up
        ours.llm.resize_token_embeddings(len(ours.tokenizer), mean_resizing=False)
    ours.to(device=device, dtype=dtype)
    return ours.requires_grad_(False)


def quantized_llm(ours: MultimodalLM, settings: BenchSettings) -> PreTrainedModel:
    """The LLM's current weights in 4-bit NF4 with double quantization (mm_llama's QLoRA settings),
    quantized in memory from its state dict."""
    llm = ours.llm
    device = torch.device(settings.device)
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    return type(llm).from_pretrained(
        None,
        config=llm.config,
        state_dict=llm.state_dict(),
        quantization_config=quantization_config(replace(ours.config.llm, quantization="nf4")),
        dtype=getattr(torch, settings.dtype),
        **placement,
    )


def hf_llava(ours: MultimodalLM) -> LlavaForConditionalGeneration:
    """transformers' Llava made of ``ours``'s tower, decoder and LM head, with its own projector class
    holding ``ours``'s projector weights."""
    encoder, projector = ours.encoders["image"], ours.projectors["image"]
    weight = next(projector.parameters())
    llava_config = LlavaConfig(
        vision_config=encoder.tower.config,
        text_config=ours.llm.config,
        image_token_id=ours.processor.placeholder_ids["image"],
        projector_hidden_act="gelu",
        vision_feature_layer=encoder.options.select_layer,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(llava_config)
    hf.model.vision_tower = encoder.tower
    hf.model.language_model = ours.llm.get_decoder()
    hf.lm_head = ours.llm.get_output_embeddings()
    hf_projector = LlavaMultiModalProjector(llava_config)
    hf_projector.load_state_dict(projector.state_dict())
    hf.model.multi_modal_projector = hf_projector.to(device=weight.device, dtype=weight.dtype)
    on_meta = [name for name, p in hf.named_parameters() if p.is_meta]
    if on_meta:
        raise RuntimeError(f"HF Llava parameters left on the meta device: {on_meta[:5]}")
    return hf.requires_grad_(False)


def pair_for(ours: MultimodalLM, reply: str = ANSWER) -> Pair:
    """``ours`` and an HF Llava over its modules, projectors trainable on both sides; ``reply`` is the
    training samples' answer."""
    hf = hf_llava(ours)
    ours.projectors.requires_grad_(True)
    hf.model.multi_modal_projector.requires_grad_(True)
    return Pair(ours=ours, hf=hf, device=ours.device, answer=reply)


def add_adapters(pair: Pair, settings: BenchSettings, qlora: bool) -> None:
    """LoRA on every linear layer of the shared LLM through mm_llama's ``add_lora`` (QLoRA: after
    ``prepare_model_for_kbit_training``); HF Llava's decoder is that LLM's, so it trains the same adapters.
    No dropout, so both sides compute the same loss."""
    lora = LoraSettings(
        r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0, target_modules="all-linear"
    )
    add_lora(pair.ours, StageConfig(data=[], llm="qlora" if qlora else "lora", lora=lora))
    if pair.hf.model.language_model is not pair.ours.llm.get_decoder():
        raise RuntimeError("HF Llava's decoder is no longer the adapted LLM's: LoRA was not shared")


# ---- inputs --------------------------------------------------------------------------------------------
def random_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` random (size, size, 3) uint8 images."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def conversation(reply: str = ANSWER) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply}]


def training_batch(pair: Pair, images: Sequence[Any], processor: Any = None) -> dict[str, Any]:
    """A collated LLaVA-style batch on the pair's device: ``input_ids``/``attention_mask``/``labels``
    (B, T) and ``media`` (preprocessed images, or with a cached processor the tower's features)."""
    processor = processor if processor is not None else pair.ours.processor
    collated = processor.collate([processor(conversation(pair.answer), {"image": [img]}) for img in images])
    for key in ("input_ids", "attention_mask", "labels"):
        collated[key] = collated[key].to(pair.device)
    return collated


def cached_batch(pair: Pair, images: Sequence[np.ndarray], folder: Path) -> dict[str, Any]:
    """The same batch as from ``images`` as mm_llama trains on it from the feature cache: the images
    written as PNG (lossless) beside a LLaVA-format file, cached by ``cache_features``, then read back by
    the cached processor: ``media`` holds (N, D_enc) features."""
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    records = [
        {
            "id": str(i),
            "image": p.name,
            "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": pair.answer}],
        }
        for i, p in enumerate(paths)
    ]
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    cache = cache_features(pair.ours, data, folder / "features", modalities=["image"])
    return training_batch(pair, [str(p) for p in paths], cached_processor(pair.ours, cache, ["image"]))


def hf_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch as HF Llava's keyword arguments (images stacked into ``pixel_values``)."""
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "pixel_values": torch.stack(batch["media"]["image"]).to(device),  # (B, 3, H, W)
    }


# ---- the measured operations ---------------------------------------------------------------------------
def step_fns(
    pair: Pair, batch: dict[str, Any], cached: dict[str, Any] | None = None
) -> dict[str, Callable[[], float]]:
    """One forward + backward per implementation on ``batch``; each returns its loss. With ``cached`` (the
    same batch from the feature cache), mm_llama's step reads features from it instead of running the tower."""
    source = cached if cached is not None else batch
    features = source["media"] if cached is not None else None
    media = None if cached is not None else batch["media"]
    hf_kwargs = hf_inputs(batch, pair.device)

    def ours() -> float:
        pair.ours.zero_grad(set_to_none=True)
        out = pair.ours(
            source["input_ids"], source["attention_mask"], source["labels"], media=media, features=features
        )
        out.loss.backward()
        return out.loss.item()

    def hf() -> float:
        pair.hf.zero_grad(set_to_none=True)
        out = pair.hf(**hf_kwargs, labels=batch["labels"])
        out.loss.backward()
        return out.loss.item()

    return {MM_LLAMA: ours, HF_LLAVA: hf}


class StepClock(LogitsProcessor):
    """A logits processor that only records when each generation step's logits are ready: the first
    stamp follows the prefill, each later one one more decode forward. It splits one generation into its
    prefill and decode times, so neither is a difference of two noisy runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class Generation:
    """One timed greedy generation: its texts, its prefill time (from the call to the first logits, so
    preprocessing, the tower and the projector included) and the time of its ``n - 1`` decode steps."""

    texts: list[str]
    prefill_s: float
    decode_s: float


def generate_fns(
    pair: Pair, images: Sequence[np.ndarray], new_tokens: int
) -> dict[str, Callable[[], Generation]]:
    """Greedy generation of exactly ``new_tokens`` tokens for one prompt per image, from raw images, each
    implementation through its public ``generate`` with the same :class:`StepClock`."""
    prompts = [QUESTION] * len(images)
    per_prompt = [[img] for img in images]
    tokenizer = pair.ours.tokenizer

    def ours(clock: StepClock) -> list[str]:
        return pair.ours.generate(
            prompts,
            images=per_prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([clock]),
        )

    def hf(clock: StepClock) -> list[str]:
        kwargs = hf_inputs(pair.ours.prepare(prompts, {"image": per_prompt}), pair.device)
        out = pair.hf.generate(
            **kwargs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([clock]),
        )
        new = out[:, kwargs["input_ids"].shape[1] :]  # (B, new_tokens)
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    def timed(name: str, run: Callable[[StepClock], list[str]]) -> Callable[[], Generation]:
        def call() -> Generation:
            clock = StepClock(pair.device)
            synchronize(pair.device)
            start = time.perf_counter()
            texts = run(clock)
            if len(clock.stamps) != new_tokens:
                raise RuntimeError(
                    f"{name}: its generate ran the logits processors {len(clock.stamps)} times for "
                    f"{new_tokens} new tokens; the prefill / decode clock needs one call per token"
                )
            return Generation(texts, clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0])

        return call

    return {MM_LLAMA: timed(MM_LLAMA, ours), HF_LLAVA: timed(HF_LLAVA, hf)}


# ---- measuring -----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warm_up: bool = True
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Optionally one warm-up call each, then ``repeats`` timed calls each, alternating which goes first.

    Returns the seconds and the return value of every timed call."""
    names = list(fns)
    if warm_up:
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            outputs[name].append(fns[name]())
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, outputs


def warm_up_with_memory(fns: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, float]:
    """Warm each function up with an untimed call whose peak memory (MiB) is returned. On CUDA a plain
    call goes first, so that one-time allocations (cuBLAS workspaces, ...) are not charged to whichever
    implementation happens to run first; the CPU measurement counts only the allocations made while it
    runs, so it needs none. Each step sets its gradients to ``None`` first, so none are held over."""
    if device.type == "cuda":
        for fn in fns.values():
            fn()
    return {name: peak_memory_mib(fn, device) for name, fn in fns.items()}


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory allocated by ``fn`` above what was allocated before it, in MiB."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace_file = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_file))
        events = json.loads(trace_file.read_text())["traceEvents"]
    totals = [  # (time, running total of the CPU allocator, bytes of this event)
        (e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    if not totals:
        return 0.0
    totals.sort()
    baseline = totals[0][1] - totals[0][2]
    return (max(total for _, total, _ in totals) - baseline) / 2**20


def weights_mib(pair: Pair) -> float:
    """Memory of every parameter and buffer the two implementations hold (shared ones counted once)."""
    seen: dict[int, int] = {}
    for model in (pair.ours, pair.hf):
        for t in [*model.parameters(), *model.buffers()]:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


def measure_step(pair: Pair, fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, Any]:
    """Peak memory (warm-up), then interleaved timed repeats of a training step; losses kept."""
    pair.ours.train()
    pair.ours.encoders.eval()  # the frozen tower (shared with HF Llava) runs as in inference
    peaks = warm_up_with_memory(fns, pair.device)
    times, outputs = time_interleaved(fns, repeats, pair.device, warm_up=False)
    losses = {name: runs[-1] for name, runs in outputs.items()}
    pair.ours.zero_grad(set_to_none=True)
    pair.hf.zero_grad(set_to_none=True)
    pair.ours.eval()
    entry: dict[str, Any] = {
        name: {**summary(times[name]), "loss": losses[name], "peak_memory_mib": peaks[name]} for name in fns
    }
    entry["loss_rel_diff"] = relative_diff(losses[MM_LLAMA], losses[HF_LLAVA])
    entry["weights_mib"] = weights_mib(pair)
    return entry


def measure_generation(pair: Pair, settings: BenchSettings) -> dict[str, Any]:
    """Greedy generations at each decode batch, interleaved: medians of their prefill and decode times."""
    results: dict[str, Any] = {}
    for batch in DECODE_BATCHES:
        images = random_images(batch, settings.image_size, settings.seed + 1)
        times, outputs = time_interleaved(
            generate_fns(pair, images, settings.new_tokens), settings.repeats, pair.device
        )
        entry: dict[str, Any] = {}
        for name, runs in outputs.items():
            decode_s = statistics.median(g.decode_s for g in runs)
            entry[name] = {
                **summary(times[name]),
                "prefill_s": [round(g.prefill_s, 4) for g in runs],
                "median_prefill_s": statistics.median(g.prefill_s for g in runs),
                "decode_s": [round(g.decode_s, 4) for g in runs],
                "tokens_per_s": batch * (settings.new_tokens - 1) / decode_s,
                "texts": runs[-1].texts,
            }
        entry["same_texts"] = all(
            ours.texts == hf.texts for ours, hf in zip(outputs[MM_LLAMA], outputs[HF_LLAVA])
        )
        results[f"batch_{batch}"] = entry
    return results


def summary(times: Sequence[float]) -> dict[str, Any]:
    return {"times_s": [round(t, 4) for t in times], "median_s": statistics.median(times)}


def relative_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def parity(pair: Pair, batch: dict[str, Any]) -> dict[str, float]:
    """Loss and logits of both implementations on the first sample of ``batch`` (eval mode, no grad)."""
    one = {key: batch[key][:1] for key in ("input_ids", "attention_mask", "labels")}
    one["media"] = {"image": batch["media"]["image"][:1]}
    pair.ours.eval()
    with torch.no_grad():
        ours = pair.ours(
            one["input_ids"], one["attention_mask"], one["labels"], one["media"], return_logits=True
        )
        hf = pair.hf(**hf_inputs(one, pair.device), labels=one["labels"])
    return {
        "loss_mm_llama": float(ours.loss),
        "loss_hf_llava": float(hf.loss),
        "max_abs_logit_diff": float((ours.logits - hf.logits.float()).abs().max()),
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core counts, library versions and, on CUDA, the GPU."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Everything the CLI measures, as a JSON-ready dict (see the module docstring)."""
    check_settings(settings)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    pair = pair_for(build_model(settings), answer(settings))
    images = random_images(settings.batch, settings.image_size, settings.seed)
    batch = training_batch(pair, images)
    placeholder = pair.ours.processor.placeholder_ids["image"]
    shape = {
        "seq_len": int(batch["input_ids"].shape[1]),
        "image_tokens": int((batch["input_ids"][0] == placeholder).sum()),
        "label_tokens_per_sample": int((batch["labels"][0] != -100).sum()),
        "vocab_size": int(pair.ours.llm.config.vocab_size),
    }
    results: dict[str, Any] = {
        "machine": machine_info(pair.device),
        "settings": {**asdict(settings), **shape, "decode_batches": list(DECODE_BATCHES)},
        "parity": parity(pair, batch),
    }
    steps: dict[str, Any] = {"stage1_step": measure_step(pair, step_fns(pair, batch), settings.repeats)}
    with tempfile.TemporaryDirectory(prefix="mm-llama-bench-") as tmp:
        cached = cached_batch(pair, images, Path(tmp))
        same_ids = torch.equal(cached["input_ids"], batch["input_ids"])
        results["parity"]["cached_batch_same_ids"] = same_ids
        if not same_ids:
            raise RuntimeError("the feature-cache batch's input ids differ from the raw-image batch's")
        steps["stage1_cached_step"] = measure_step(pair, step_fns(pair, batch, cached), settings.repeats)
    results["generation"] = measure_generation(pair, settings)

    four_bit = quantized_llm(pair.ours, settings)  # from the weights before any adapter
    add_adapters(pair, settings, qlora=False)
    steps["stage2_lora_step"] = measure_step(pair, step_fns(pair, batch), settings.repeats)

    ours = pair.ours
    ours.llm = four_bit  # the full-precision LLM and its adapters go
    ours.config = replace(ours.config, llm=replace(ours.config.llm, quantization="nf4"))
    pair = pair_for(ours, pair.answer)
    add_adapters(pair, settings, qlora=True)
    steps["stage2_qlora_step"] = measure_step(pair, step_fns(pair, batch), settings.repeats)
    results["steps"] = steps
    results["ratios"] = ratios(results)
    return results


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """How many times better mm_llama is on each measure: HF / mm_llama for times and memory, mm_llama /
    HF for tokens/s."""
    steps, generation = results["steps"], results["generation"]
    out = {key: steps[key][HF_LLAVA]["median_s"] / steps[key][MM_LLAMA]["median_s"] for key in steps}
    first = generation["batch_1"]
    out["prefill"] = first[HF_LLAVA]["median_prefill_s"] / first[MM_LLAMA]["median_prefill_s"]
    for batch in DECODE_BATCHES:
        entry = generation[f"batch_{batch}"]
        out[f"decode_b{batch}"] = entry[MM_LLAMA]["tokens_per_s"] / entry[HF_LLAVA]["tokens_per_s"]
    for key, step in (("memory_stage1", "stage1_step"), ("memory_stage2", "stage2_qlora_step")):
        out[key] = steps[step][HF_LLAVA]["peak_memory_mib"] / steps[step][MM_LLAMA]["peak_memory_mib"]
    return {key: out[key] for key in RATIO_KEYS}


# ---- reporting -----------------------------------------------------------------------------------------
def values(results: dict[str, Any], key: str) -> tuple[float, float]:
    """(mm_llama, HF Llava) of one measure, in the unit its label names."""
    steps, generation = results["steps"], results["generation"]
    if key in steps:
        return steps[key][MM_LLAMA]["median_s"], steps[key][HF_LLAVA]["median_s"]
    if key == "prefill":
        first = generation["batch_1"]
        return first[MM_LLAMA]["median_prefill_s"], first[HF_LLAVA]["median_prefill_s"]
    if key.startswith("decode_b"):
        entry = generation[f"batch_{key.removeprefix('decode_b')}"]
        return entry[MM_LLAMA]["tokens_per_s"], entry[HF_LLAVA]["tokens_per_s"]
    step = steps["stage1_step" if key == "memory_stage1" else "stage2_qlora_step"]
    return step[MM_LLAMA]["peak_memory_mib"], step[HF_LLAVA]["peak_memory_mib"]


def markdown_table(results: dict[str, Any]) -> str:
    """The nine measures; "mm_llama gain" > 1 means mm_llama is faster / leaner."""
    rows = ["| measure | mm_llama | HF Llava | mm_llama gain |", "|---|---:|---:|---:|"]
    for key in RATIO_KEYS:
        ours, hf = values(results, key)
        rows.append(f"| `{key}`: {LABELS[key]} | {ours:,.3f} | {hf:,.3f} | {results['ratios'][key]:.2f}x |")
    return "\n".join(rows)


def same_texts(results: dict[str, Any]) -> bool:
    """Whether every timed generation gave identical texts on both sides, at each batch."""
    return all(entry["same_texts"] for entry in results["generation"].values())


def describe(results: dict[str, Any]) -> str:
    """One paragraph of context printed above the table."""
    s, m, p = results["settings"], results["machine"], results["parity"]
    losses = ", ".join(f"{key} {step['loss_rel_diff']:.1e}" for key, step in results["steps"].items())
    return (
        f"{s['llm']} + CLIP {s['vision']} at {s['image_size']} px ({s['image_tokens']} image tokens), mlp2x_gelu, "
        f"{s['dtype']} on {m['device']} ({m.get('gpu', m['cpu'])}, torch threads: {m['torch_threads']}); "
        f"batch {s['batch']}, sequence {s['seq_len']} tokens, {s['label_tokens_per_sample']} labelled per "
        f"sample; LoRA r={s['lora_r']} alpha={s['lora_alpha']} on every linear layer; medians of "
        f"{s['repeats']} interleaved repeats after a warm-up; decode: {s['new_tokens']} new tokens. Parity: "
        f"loss {p['loss_mm_llama']:.5f} vs {p['loss_hf_llava']:.5f}, max |logit diff| "
        f"{p['max_abs_logit_diff']:.2e}; step loss relative differences: {losses}; greedy texts identical: "
        f"{same_texts(results)}."
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """A bar chart of the nine ratios, with the parity line at 1."""
    keys = list(RATIO_KEYS)
    gains = [results["ratios"][key] for key in keys]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.barh(keys[::-1], gains[::-1], color=["tab:green" if g >= 1 else "tab:red" for g in gains[::-1]])
    ax.bar_label(bars, labels=[f"{g:.2f}x" for g in gains[::-1]], padding=3)
    ax.axvline(1.0, color="black", linewidth=1)
    s, m = results["settings"], results["machine"]
    ax.set_xlabel("how many times better mm_llama is than HF Llava (>1: faster or leaner)")
    ax.set_title(
        f"{s['llm']} + CLIP {s['vision']} {s['image_size']} px, batch {s['batch']}, {s['dtype']}, {m['device']}"
    )
    ax.set_xlim(0, max(gains) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchSettings, Path | None, Path]:
    d = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller run: {QUICK} unless given explicitly")
    parser.add_argument("--llm", choices=["smollm2-135m", "tiny", "llama3-8b"], default=d.llm)
    parser.add_argument("--vision", choices=list(VISION_PRESETS), default=d.vision)
    parser.add_argument("--image-size", type=int, default=d.image_size, help="pixels, a multiple of 14")
    parser.add_argument("--batch", type=int, default=d.batch, help="training batch size")
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens)
    parser.add_argument(
        "--seq-len", type=int, default=d.seq_len, help="tokens per training sample (the answer made longer)"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--png", type=Path, default=Path("bench.png"), help="the chart of the ratios")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in fields(BenchSettings)})
    return settings, args.json, args.png


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print the context and the table, write the chart and (``--json``) the results."""
    settings, json_path, png_path = parse_args(argv)
    results = run_benchmark(settings)
    results["command"] = " ".join(
        ["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(describe(results))
    print()
    print(markdown_table(results))
    plot(results, png_path)
    print(f"\nwrote {png_path}")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        print(f"wrote {json_path}")
    return results


if __name__ == "__main__":
    try:
        main()
    except MMInputError as e:  # a bad flag: one line and exit code 2, as mm-llama's own CLI does
        print(f"bench.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
