"""Generation for :class:`~mm_llama.model.MultimodalLM`: prompts (strings or conversations) with media
-> answers, batched with left padding, greedy or sampled, or streamed piece by piece.

The processor renders and tokenizes each prompt with a generation prompt; the model's ``embed`` scatters
the projected media into the placeholder slots; transformers' ``generate`` decodes from those input
embeddings with a KV cache: a growing one by default, or with ``compile=True`` a static one and a
``torch.compile``d decoding step (see ``MultimodalLM.generate``).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CompileConfig, GenerationConfig, TextIteratorStreamer
from transformers import GenerationMixin as HFGenerationMixin
from transformers.utils import TransformersKwargs

from mm_llama.errors import MMInputError
from mm_llama.modality import media_kwarg, media_kwargs

logger = logging.getLogger(__name__)

STATIC_CACHE_BLOCK = 256
"""``compile=True`` sizes its static KV cache up to a multiple of this many positions: transformers keeps the
largest size seen and a new size recompiles the decoding step, so growing chat prompts recompile once per
block, not once per turn."""

Prompt = str | Sequence[dict[str, str]]
"""A user message, or a conversation (role/content turns, the last one the user's) to continue."""


ITEM_TYPES = (str, bytes, bytearray, os.PathLike, np.ndarray, torch.Tensor, Image.Image)
"""Media inputs that are one item (a path, encoded bytes, an array or tensor, a PIL image), never a list of
items: iterating one would give characters, bytes or rows."""


def _is_item(value: Any) -> bool:
    return isinstance(value, ITEM_TYPES) or not isinstance(value, Sequence)


def one_prompt_media(name: str, value: Any) -> list[Any]:
    """One prompt's items for modality ``name``: a list (or tuple) of items as given; a bare item (a path
    string, ``Path``, bytes, an array or tensor, a PIL image) is that one item."""
    if isinstance(value, ITEM_TYPES):
        return [value]
    if not isinstance(value, Sequence):
        raise MMInputError(
            f"{media_kwarg(name)}= must be a list of {name} items (or one item), got {type(value).__name__}"
        )
    return list(value)


def check_batch_media(name: str, value: Any, prompts: int) -> None:
    """Several prompts: ``value`` must hold one list of items per prompt (``[[a], [b, c], []]``)."""
    example = "e.g. [[a], [b]]" if prompts == 2 else "e.g. [[a], [b], ...]"
    head = f"{media_kwarg(name)}= for {prompts} prompts must hold one list per prompt, {example}"
    if _is_item(value):
        raise MMInputError(f"{head}; got a single {type(value).__name__}")
    if any(_is_item(entry) for entry in value):
        raise MMInputError(f"{head}; got a flat list of items")
    if len(value) != prompts:
        raise MMInputError(f"{head}; got {len(value)} lists")


class GenerationMixin:
    """``generate`` and its helpers; mixed into ``MultimodalLM`` (uses its ``processor``, ``llm``,
    ``tokenizer``, ``embed`` and ``device``)."""

    def _split_kwargs(
        self, media: Mapping[str, Sequence[Any]] | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Sequence[Any]], dict[str, Any]]:
        """Split ``generate``'s extra keywords into media (``media=`` merged with each registered modality's
        ``<name>s=``) and the keywords for transformers' ``generate``."""
        merged = dict(media or {})
        if not kwargs:
            return merged, {}
        by_kwarg = media_kwargs()
        generation, model_inputs = self._transformers_keywords()
        rest: dict[str, Any] = {}
        for key, value in kwargs.items():
            name = by_kwarg.get(key)
            if name is None:
                if key.endswith("s") and key not in generation | model_inputs:
                    raise TypeError(
                        f"generate() got an unexpected keyword argument {key!r}: neither the media keyword "
                        f"of a registered modality ({', '.join(f'{k}=' for k in by_kwarg)}; a plugin's "
                        "modality, e.g. depths=, once its plugin is imported or register_modality called) "
                        "nor an option of transformers' generate"
                    )
                rest[key] = value
            elif key in generation:
                raise ValueError(
                    f"generate(): {key}= is both the media keyword of modality {name!r} and an option of "
                    f"transformers' generate; pass the {name} inputs as media={{{name!r}: [...]}}"
                )
            elif value is not None:
                if name in merged:
                    raise ValueError(f"{name} inputs given twice: as {key}= and in media=")
                merged[name] = value
        return merged, rest

    def _transformers_keywords(self) -> tuple[set[str], set[str]]:
        """What transformers' ``generate`` takes for this LLM: its generation options (``generate``'s
        parameters and the generation config's fields), and the model inputs it passes on (the LLM's
        ``forward`` parameters and the generic ones). A modality's keyword may shadow the latter (this model
        makes the LLM's inputs itself), not the former."""
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm  # under LoRA
        generation = {*vars(GenerationConfig()), *vars(base.generation_config)}
        for function in (HFGenerationMixin.generate, base.generate):
            generation.update(inspect.signature(function).parameters)
        model_inputs = set(getattr(TransformersKwargs, "__optional_keys__", ()))
        for function in (base.forward, base.prepare_inputs_for_generation):
            model_inputs.update(inspect.signature(function).parameters)
        return generation, model_inputs

    def prepare(self, prompts: Sequence[Prompt], media: dict[str, Sequence[Sequence[Any]]]) -> dict[str, Any]:
        """Tokenize prompts (strings or conversations) for generation, left-padded; ``media[m][i]`` holds
        prompt i's items."""
        examples = []
        for name, per_batch in media.items():
            check_batch_media(name, per_batch, len(prompts))
        for i, prompt in enumerate(prompts):
            per_prompt = {}
            for name, per_batch in media.items():
                per_prompt[name] = per_batch[i]
            example = self.processor(prompt, per_prompt, add_generation_prompt=True, where=f"prompt {i}")
            if example.dropped_turns:
                logger.warning(
                    "prompt %d: its %d oldest turn(s) were left out to fit max_length=%d",
                    i, example.dropped_turns, self.processor.max_length,
                    extra={"dropped_turns": example.dropped_turns},  # for callers that say it their way
                )  # fmt: skip
            examples.append(example)
        return self.processor.collate(examples, padding_side="left")

    @torch.no_grad()
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        media: Mapping[str, Sequence[Any]] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: bool = False,
        compile: bool = False,
        **kwargs: Any,
    ) -> str | list[str] | Iterator[str]:
        """Answer prompts that contain media markers.

        A prompt is a user message (a string) or a whole conversation so far: a list of ``{"role",
        "content"}`` (or LLaVA ``{"from", "value"}``) turns ending with the user's, so a follow-up question
        sees the earlier turns and their media.

        Media go in ``media={"image": [...], "depth": [...]}`` keyed by modality name, or as the keyword
        ``<name>s=`` of any registered modality: ``images=``, ``audios=``, ``videos=``, ``imus=``, and a
        plugin's, e.g. ``depths=`` once ``depth`` is registered (``mm_llama.modality.media_kwarg``). One
        prompt: each modality's value is the flat list of items for its markers, in order of appearance (a
        bare item, e.g. ``images="a.png"`` or one array, is taken as that one item); returns a string, or
        with ``stream=True`` an iterator of text pieces. Several prompts (a list of them): each modality's
        value holds one list per prompt (``images=[[a], [b, c], []]``; a flat list of items raises
        ``MMInputError``); returns a list of strings (batched, left-padded). Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_p``.

        ``compile=True`` decodes with a static KV cache and a ``torch.compile``d decoding step (transformers'
        own static-cache path; on CUDA its default mode also captures CUDA graphs), for the same greedy text.
        The first call compiles (about 40 s for SmolLM2-135M on one CPU core), and so does a new batch size or
        a longer cache (sized in blocks of ``STATIC_CACHE_BLOCK``). On a CPU, at batch 1, each decoding step
        is then about 1.2x faster, so it pays off over thousands of generated tokens (an eval run, a
        benchmark), not for one chat reply; at batch 8 it was slower (``docs/decoding.md``). Models
        transformers cannot compile (4-bit) run with the static cache, uncompiled.

        Other keyword arguments go to transformers' ``generate`` (``num_beams=``, ``repetition_penalty=``,
        ...). A keyword ending in ``s`` that is neither a registered modality's nor one transformers knows
        raises ``TypeError`` (e.g. ``depths=`` before the depth plugin is imported), and a modality whose
        keyword is also a transformers option must go through ``media=``.
        """
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))
        merged, generate_kwargs = self._split_kwargs(media, kwargs)
        if single:
            prompt_list = [prompts]
            merged = {name: [one_prompt_media(name, items)] for name, items in merged.items()}
        else:
            prompt_list = list(prompts)
            if stream:
                raise ValueError("stream=True works with a single prompt; pass a string")
        batch = self.prepare(prompt_list, merged)
        embeds = self.embed(batch["input_ids"].to(self.device), batch["media"])
        eos = self._eos_ids()
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": batch["attention_mask"].to(self.device),
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": eos,
        }
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if compile:
            kwargs.update(self._compiled_decoding(embeds.shape[1] + max_new_tokens))
        kwargs.update(generate_kwargs)
        if stream:
            return self._stream(kwargs)
        out = self.llm.generate(**kwargs)  # (B, new tokens): inputs_embeds-only calls return new tokens
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return texts[0] if single else texts

    def _stream(self, kwargs: dict[str, Any]) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.llm.generate(**kwargs, streamer=streamer)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise errors[0]

    def _compiled_decoding(self, length: int) -> dict[str, Any]:
        """transformers' ``generate`` options for a static cache of at least ``length`` positions and a
        compiled decoding step."""
        config = CompileConfig()  # transformers' defaults: inductor, "reduce-overhead" (CUDA graphs on a GPU)
        # transformers compiles by itself only on accelerators; this flag of its config asks for any device
        config._compile_all_devices = True
        blocks = -(-length // STATIC_CACHE_BLOCK)
        return {
            "cache_implementation": "static",
            "max_cache_len": blocks * STATIC_CACHE_BLOCK,
            "compile_config": config,
        }

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, *self.processor.end_of_turn_ids()}
        configured = getattr(self.llm.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        return sorted(i for i in ids if i is not None)
