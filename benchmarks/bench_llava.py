"""Speed and memory of mm_llama's ``MultimodalLM`` side by side with transformers' Llava.

Both implementations run the same weights: a CLIP vision tower built from a config (random weights,
14 px patches, LLaVA's penultimate-layer patch features), an ``mlp2x_gelu`` projector and the LLM.
``LlavaForConditionalGeneration`` is built on the meta device and then given *the very modules* of the
``MultimodalLM`` (its CLIP tower, Llama decoder and LM head, which are the classes Llava would build
itself); its projector is transformers' own ``LlavaMultiModalProjector`` loaded with the mm_llama
projector's weights. The LLM's vocabulary grows by one row for the ``<image>`` placeholder, which HF
Llava embeds (mm_llama never does); both models see that same vocabulary.

Measured, for each implementation, interleaved in one process (the order alternates every repeat):

1. a training step (forward + backward) on a LLaVA-style batch: one image and a short question per
   sample, labels only on the short answer. mm_llama runs the LM head on labelled positions only; HF
   Llava computes logits at every position, then the loss;
2. the peak memory of that step above what was allocated before it (CUDA: ``max_memory_allocated``;
   CPU: the PyTorch CPU allocator's running total as recorded by ``torch.profiler``);
3. greedy generation throughput: exactly ``--new-tokens`` new tokens per prompt, from raw images and
   prompts (the same preprocessing for both), at each ``--gen-batch`` size.

Every function is warmed up once untimed (for the training step, that call is the memory measurement).
A parity check (loss and logits of one sample) and the generated texts of both are kept in the JSON,
with the machine's description. See ``benchmarks/README.md`` for results and how to read them.

    python benchmarks/bench_llava.py --device cuda --dtype bfloat16 --out results.json
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mm_llama import EncoderConfig, LLMConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig

LLMChoice = Literal["smollm2-135m", "tiny"]
VisionChoice = Literal["vit-l", "vit-b", "tiny"]
TrainChoice = Literal["full", "projector"]
DtypeChoice = Literal["float32", "bfloat16"]

PATCH_SIZE = 14
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
"""A 2-layer, hidden-32 Llama with random weights (SmolLM2's tokenizer) for smoke runs."""
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
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
}
"""CLIP vision towers (always 14 px patches): ``vit-l`` is CLIP ViT-L/14, LLaVA-1.5's tower; ``vit-b``
has ViT-B's width and depth; ``tiny`` is for smoke runs."""
SYSTEM_PROMPT = "Be brief."
QUESTION = "<image>\nWhat is shown in this picture?"
ANSWER = "A red ball on a wooden table."
"""The LLaVA situation: hundreds of image tokens, a short question, labels on a short answer only."""
MM_LLAMA = "mm_llama"
HF_LLAVA = "hf_llava"


@dataclass
class BenchSettings:
    """What to benchmark and how; the CLI flags map one to one onto these fields."""

    llm: LLMChoice = "smollm2-135m"
    """``smollm2-135m``: the real SmolLM2-135M-Instruct; ``tiny``: a 2-layer random Llama."""
    vision: VisionChoice = "vit-l"
    """CLIP tower size (random weights, built from a config)."""
    image_size: int = 336
    """Input side in pixels, a multiple of 14 (LLaVA-1.5: 336, i.e. 576 image tokens; 224: 256)."""
    batch: int = 8
    """Training batch size."""
    repeats: int = 5
    """Timed repeats per implementation (after one warm-up run each)."""
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: DtypeChoice = "float32"
    """Dtype of every weight (vision tower, projector, LLM)."""
    train: TrainChoice = "full"
    """``full``: projector + LLM train (LLaVA stage 2); ``projector``: projector only (stage 1). The
    vision tower is frozen in both."""
    gen_batches: tuple[int, ...] = (1, 8)
    """Batch sizes of the generation benchmark."""
    new_tokens: int = 32
    """Tokens generated per prompt (EOS is suppressed until then, so every run makes exactly this many)."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for PyTorch (``torch.set_num_threads``); ``None`` keeps PyTorch's default. On a CPU
    shared with other processes, fewer threads than cores avoids OpenMP oversubscription stalls."""


@dataclass
class Pair:
    """The two implementations over shared weights, and the device they run on."""

    ours: MultimodalLM
    hf: LlavaForConditionalGeneration
    device: torch.device


# ---- building ------------------------------------------------------------------------------------------
def model_config(settings: BenchSettings) -> ModelConfig:
    """The ``MultimodalLM`` config: a frozen random CLIP tower, ``mlp2x_gelu``, the chosen LLM."""
    if settings.image_size % PATCH_SIZE:
        raise ValueError(f"--image-size must be a multiple of {PATCH_SIZE}, got {settings.image_size}")
    if settings.llm == "tiny":
        llm = LLMConfig(from_config=copy.deepcopy(TINY_LLAMA), dtype=settings.dtype)
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
    return ModelConfig(llm=llm, modalities={"image": image}, system_prompt=SYSTEM_PROMPT)


def build_pair(settings: BenchSettings) -> Pair:
    """A ``MultimodalLM`` and an HF Llava over the same weights, on ``settings.device``."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch.cuda.is_available() is False")
    dtype = getattr(torch, settings.dtype)
    torch.manual_seed(settings.seed)
    ours = MultimodalLM(model_config(settings))
    # HF Llava looks the <image> id up in the embedding table: give the LLM a row for it.
    ours.llm.resize_token_embeddings(len(ours.tokenizer), mean_resizing=False)
    ours.to(device=device, dtype=dtype)
    encoder, projector = ours.encoders["image"], ours.projectors["image"]

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
    hf.model.multi_modal_projector = hf_projector.to(device=device, dtype=dtype)
    on_meta = [name for name, p in hf.named_parameters() if p.is_meta]
    if on_meta:
        raise RuntimeError(f"HF Llava parameters left on the meta device: {on_meta[:5]}")

    trains_llm = settings.train == "full"
    for model in (ours, hf):
        model.requires_grad_(False)
    for module in (projector, hf_projector):
        module.requires_grad_(True)
    ours.llm.requires_grad_(trains_llm)  # shared with hf: its decoder and LM head follow
    return Pair(ours=ours, hf=hf, device=device)


# ---- inputs --------------------------------------------------------------------------------------------
def random_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` random (size, size, 3) uint8 images."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def training_batch(pair: Pair, batch: int, image_size: int, seed: int) -> dict[str, Any]:
    """A collated LLaVA-style batch: ``input_ids``/``attention_mask``/``labels`` (B, T), ``media``."""
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    processor = pair.ours.processor
    examples = [processor(conversation, {"image": [img]}) for img in random_images(batch, image_size, seed)]
    collated = processor.collate(examples)
    collated["media"] = {"image": [x.to(pair.device) for x in collated["media"]["image"]]}
    for key in ("input_ids", "attention_mask", "labels"):
        collated[key] = collated[key].to(pair.device)
    return collated


def take(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated batch."""
    out = {key: batch[key][:n] for key in ("input_ids", "attention_mask", "labels")}
    out["media"] = {"image": batch["media"]["image"][:n]}
    return out


def hf_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A collated batch as HF Llava's keyword arguments (images stacked into ``pixel_values``)."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": torch.stack(batch["media"]["image"]),  # (B, 3, H, W)
    }


# ---- the measured operations ---------------------------------------------------------------------------
def train_steps(pair: Pair, batch: dict[str, Any]) -> dict[str, Callable[[], float]]:
    """One forward + backward per implementation; each returns its loss."""

    def ours() -> float:
        pair.ours.zero_grad(set_to_none=True)
        out = pair.ours(batch["input_ids"], batch["attention_mask"], batch["labels"], media=batch["media"])
        out.loss.backward()
        return out.loss.item()

    def hf() -> float:
        pair.hf.zero_grad(set_to_none=True)
        out = pair.hf(**hf_inputs(batch), labels=batch["labels"])
        out.loss.backward()
        return out.loss.item()

    return {MM_LLAMA: ours, HF_LLAVA: hf}


def generators(pair: Pair, batch: int, settings: BenchSettings) -> dict[str, Callable[[], list[str]]]:
    """Greedy generation of exactly ``settings.new_tokens`` tokens for ``batch`` prompts, from raw images."""
    images = random_images(batch, settings.image_size, settings.seed + 1)
    prompts = [QUESTION] * batch
    per_prompt = [[img] for img in images]
    n = settings.new_tokens
    tokenizer = pair.ours.tokenizer

    def ours() -> list[str]:
        return pair.ours.generate(prompts, images=per_prompt, max_new_tokens=n, min_new_tokens=n)

    def hf() -> list[str]:
        inputs = pair.ours.prepare(prompts, {"image": per_prompt})
        kwargs = {k: v.to(pair.device) for k, v in hf_inputs(inputs).items()}
        out = pair.hf.generate(
            **kwargs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = out[:, kwargs["input_ids"].shape[1] :]  # (B, n)
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    return {MM_LLAMA: ours, HF_LLAVA: hf}


# ---- measuring -----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(pair: Pair) -> None:
    pair.ours.zero_grad(set_to_none=True)
    pair.hf.zero_grad(set_to_none=True)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warm_up: bool = True
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Optionally one warm-up call each, then ``repeats`` timed calls each, alternating which goes first.

    Returns the seconds of every timed call and each function's last return value."""
    names = list(fns)
    last: dict[str, Any] = {name: fns[name]() for name in names} if warm_up else {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            last[name] = fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, last


def warm_up_with_memory(
    fns: dict[str, Callable[[], Any]], device: torch.device, reset: Callable[[], None]
) -> dict[str, float]:
    """Warm each function up with an untimed call whose peak memory (MiB) is returned; ``reset`` runs
    before each measured call. On CUDA a plain call goes first, so that one-time allocations (cuBLAS
    workspaces, ...) are not charged to whichever implementation happens to run first; the CPU
    measurement counts only the allocations made while it runs, so it needs none."""
    if device.type == "cuda":
        for fn in fns.values():
            fn()
    peaks = {}
    for name, fn in fns.items():
        reset()
        peaks[name] = peak_memory_mib(fn, device)
    return peaks


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


def summary(times: Sequence[float]) -> dict[str, Any]:
    return {"times_s": [round(t, 4) for t in times], "median_s": statistics.median(times)}


def parity(pair: Pair, batch: dict[str, Any]) -> dict[str, float]:
    """Loss and logits of both implementations on the first sample of ``batch`` (eval mode, no grad)."""
    one = take(batch, 1)
    pair.ours.eval()
    with torch.no_grad():
        ours = pair.ours(
            one["input_ids"], one["attention_mask"], one["labels"], one["media"], return_logits=True
        )
        hf = pair.hf(**hf_inputs(one), labels=one["labels"])
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
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Everything the CLI measures, as a JSON-ready dict (see the module docstring)."""
    if settings.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {settings.repeats}")
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    pair = build_pair(settings)
    batch = training_batch(pair, settings.batch, settings.image_size, settings.seed)
    placeholder = pair.ours.processor.placeholder_ids["image"]
    shape = {
        "seq_len": int(batch["input_ids"].shape[1]),
        "image_tokens": int((batch["input_ids"][0] == placeholder).sum()),
        "label_tokens_per_sample": int((batch["labels"][0] != -100).sum()),
        "vocab_size": int(pair.ours.llm.config.vocab_size),
    }
    results: dict[str, Any] = {
        "machine": machine_info(pair.device),
        "settings": {**asdict(settings), **shape},
        "parity": parity(pair, batch),
    }

    pair.ours.train()
    pair.ours.encoders.eval()  # the frozen tower (shared with HF Llava) runs as in inference
    steps = train_steps(pair, batch)
    results["train_peak_memory_mib"] = warm_up_with_memory(steps, pair.device, lambda: clear_grads(pair))
    times, losses = time_interleaved(steps, settings.repeats, pair.device, warm_up=False)
    results["train_step"] = {name: {**summary(times[name]), "loss": losses[name]} for name in steps}
    clear_grads(pair)

    pair.ours.eval()
    results["generate"] = {}
    for gen_batch in settings.gen_batches:
        fns = generators(pair, gen_batch, settings)
        times, texts = time_interleaved(fns, settings.repeats, pair.device)
        entry: dict[str, Any] = {}
        for name in fns:
            entry[name] = {
                **summary(times[name]),
                "tokens_per_s": gen_batch * settings.new_tokens / statistics.median(times[name]),
                "texts": texts[name],
            }
        entry["same_texts"] = texts[MM_LLAMA] == texts[HF_LLAVA]
        results["generate"][f"batch_{gen_batch}"] = entry
    return results


# ---- reporting -----------------------------------------------------------------------------------------
def markdown_table(results: dict[str, Any]) -> str:
    """The headline numbers; "mm_llama gain" > 1 means mm_llama is faster / leaner."""
    s = results["settings"]
    rows = ["| measure | mm_llama | HF Llava | mm_llama gain |", "|---|---:|---:|---:|"]
    train = results["train_step"]
    ours_t, hf_t = train[MM_LLAMA]["median_s"], train[HF_LLAVA]["median_s"]
    rows.append(
        f"| training step, batch {s['batch']} (s, median of {s['repeats']}) | {ours_t:.3f} | {hf_t:.3f} "
        f"| {hf_t / ours_t:.2f}x |"
    )
    mem = results["train_peak_memory_mib"]
    ours_m, hf_m = mem[MM_LLAMA], mem[HF_LLAVA]
    rows.append(
        f"| training step peak memory above weights (MiB) | {ours_m:,.0f} | {hf_m:,.0f} | {hf_m / ours_m:.2f}x |"
    )
    for key, entry in results["generate"].items():
        ours_g, hf_g = entry[MM_LLAMA]["tokens_per_s"], entry[HF_LLAVA]["tokens_per_s"]
        rows.append(
            f"| greedy generation, {key.replace('_', ' ')}, {s['new_tokens']} new tokens (tokens/s) "
            f"| {ours_g:.1f} | {hf_g:.1f} | {ours_g / hf_g:.2f}x |"
        )
    return "\n".join(rows)


def describe(results: dict[str, Any]) -> str:
    """One paragraph of context printed above the table."""
    s, m, p = results["settings"], results["machine"], results["parity"]
    same = all(entry["same_texts"] for entry in results["generate"].values())
    return (
        f"{s['llm']} + CLIP {s['vision']} at {s['image_size']} px ({s['image_tokens']} image tokens), "
        f"mlp2x_gelu, train={s['train']}, {s['dtype']} on {m['device']} ({m['gpu'] if 'gpu' in m else m['cpu']}, "
        f"torch threads: {m['torch_threads']}); sequence {s['seq_len']} tokens, {s['label_tokens_per_sample']} "
        f"labelled per sample. Parity: loss {p['loss_mm_llama']:.5f} vs {p['loss_hf_llava']:.5f}, "
        f"max |logit diff| {p['max_abs_logit_diff']:.2e}; generated texts identical: {same}."
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchSettings, Path | None]:
    d = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--llm", choices=["smollm2-135m", "tiny"], default=d.llm)
    parser.add_argument("--vision", choices=list(VISION_PRESETS), default=d.vision)
    parser.add_argument("--image-size", type=int, default=d.image_size, help="pixels, a multiple of 14")
    parser.add_argument("--batch", type=int, default=d.batch, help="training batch size")
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    parser.add_argument("--train", choices=["full", "projector"], default=d.train)
    parser.add_argument("--gen-batch", type=int, nargs="+", default=list(d.gen_batches))
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    settings = BenchSettings(
        llm=args.llm,
        vision=args.vision,
        image_size=args.image_size,
        batch=args.batch,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        train=args.train,
        gen_batches=tuple(args.gen_batch),
        new_tokens=args.new_tokens,
        seed=args.seed,
        threads=args.threads,
    )
    return settings, args.out


def main(argv: Sequence[str] | None = None) -> None:
    settings, out = parse_args(argv)
    results = run_benchmark(settings)
    results["command"] = " ".join(["python", "benchmarks/bench_llava.py", *(argv or sys.argv[1:])])
    print(describe(results))
    print()
    print(markdown_table(results))
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
