"""``MultimodalLM``: modality encoders + projectors + a Hugging Face causal LM.

The processor has already expanded every marker into placeholder ids; the model encodes and projects
each media item, scatters the projected tokens into the placeholder slots of the token embeddings (a
count mismatch raises), and runs the LLM. The loss is computed on labelled positions only, and only
those positions go through the LM head, which saves most of the vocabulary projection in training.

Checkpoint folder (safetensors only)::

    mm_llama.yaml            the ModelConfig
    projectors.safetensors   every projector's weights, keyed "<modality>.<param>"
    encoders/<m>.safetensors encoder weights, for encoders that trained or were built from scratch
    tokenizer/               the tokenizer with the added marker tokens
    adapter/                 a PEFT (LoRA) adapter, when the LLM was fine-tuned with one
    llm/                     the LLM itself, only when saved with ``copy_llm=True``
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

import mm_llama.encoders  # noqa: F401  (registers the built-in encoders)
import mm_llama.projectors  # noqa: F401  (registers the built-in projectors)
from mm_llama.config import LLMConfig, ModelConfig, from_dict, load_config, save_config, to_dict
from mm_llama.encoders.base import ModalityEncoder, build_encoder
from mm_llama.llm import load_llm, load_tokenizer
from mm_llama.modality import check_modality, media_kwarg
from mm_llama.processor import IGNORE_INDEX, MultimodalProcessor
from mm_llama.projectors.base import Projector, build_projector
from mm_llama.projectors.words import WordMixProjector

logger = logging.getLogger(__name__)

CONFIG_FILE = "mm_llama.yaml"
PROJECTORS_FILE = "projectors.safetensors"
ENCODERS_DIR = "encoders"
TOKENIZER_DIR = "tokenizer"
ADAPTER_DIR = "adapter"
LLM_DIR = "llm"


Prompt = str | Sequence[dict[str, str]]
"""A user message, or a conversation (role/content turns, the last one the user's) to continue."""


@dataclass
class MultimodalOutput:
    """What ``forward`` returns: the mean token loss over labelled positions, and full logits if asked."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    """(B, T, V); only with ``return_logits=True``."""
    num_label_tokens: int


class MultimodalLM(nn.Module):
    """An any-to-text model: ``encoders[m]`` -> ``projectors[m]`` -> placeholder slots -> ``llm``."""

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        for name in config.modalities:
            check_modality(name)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.llm)
        self.llm = llm if llm is not None else load_llm(config.llm, vocab_size=len(self.tokenizer))
        hidden = int(self.llm.get_input_embeddings().embedding_dim)
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        for name, spec in config.modalities.items():
            encoder = build_encoder(name, spec.encoder)
            self.encoders[name] = encoder
            self.projectors[name] = build_projector(name, spec.projector, encoder.output_dim, hidden)
        self.processor = MultimodalProcessor(
            self.tokenizer,
            {name: self._media_handler(name) for name in config.modalities},
            template=config.template,
            system_prompt=config.system_prompt,
            max_length=config.max_length,
        )
        self._placeholder_ids = dict(self.processor.placeholder_ids)

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig | dict | str | Path) -> MultimodalLM:
        """Build from a ``ModelConfig``, a dict, or a YAML/JSON file (its ``model:`` section if present)."""
        if isinstance(config, (str, Path)):
            config = load_config(ModelConfig, config, section="model")
        elif isinstance(config, dict):
            config = from_dict(ModelConfig, config.get("model", config))
        return cls(config)

    def _media_handler(self, name: str):
        def handle(item: Any) -> tuple[torch.Tensor, int]:
            x = self.encoders[name].preprocess(item)
            return x, self.projectors[name].num_tokens(self.encoders[name].num_tokens(x))

        return handle

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ---- the forward pass ------------------------------------------------------------------------------
    def encode(
        self, modality: str, items: Sequence[torch.Tensor], encoded: bool = False
    ) -> list[torch.Tensor]:
        """Preprocessed items -> projected tokens, one (M_i, D_llm) tensor each, in input order.

        Items of the same shape run as one batch; variable-size inputs run in groups. With
        ``encoded=True`` the items are precomputed encoder outputs (N_i, D_enc) (a feature cache) and
        only the projector runs."""
        return [tokens for tokens, _ in self._encode(modality, items, encoded, word_probs=False)]

    def encode_words(
        self, modality: str, items: Sequence[torch.Tensor], encoded: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Like :meth:`encode` for a ``word_mix`` projector: (tokens (M_i, D_llm), their word
        distributions (M_i, V + 1)) per item."""
        if not isinstance(self.projectors[modality], WordMixProjector):
            raise TypeError(
                f"the {modality} projector is not a word_mix projector: it has no word distributions"
            )
        return self._encode(modality, items, encoded, word_probs=True)  # type: ignore[return-value]

    def _encode(
        self, modality: str, items: Sequence[torch.Tensor], encoded: bool, word_probs: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        encoder: ModalityEncoder = self.encoders[modality]
        projector: Projector = self.projectors[modality]
        out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(tuple(x.shape), []).append(i)
        for indices in groups.values():
            batch = torch.stack([items[i] for i in indices]).to(encoder.device)  # (B, ...)
            features = batch if encoded else encoder(batch)  # (B, N, D_enc)
            x = features.to(next(projector.parameters()).dtype)
            if word_probs:
                probs = projector.word_probs(x)  # type: ignore[union-attr]
                tokens, probs_of = projector.mix(probs), list(probs)  # type: ignore[union-attr]
            else:
                tokens, probs_of = projector(x), [None] * len(indices)  # (B, M, D_llm)
            for j, i in enumerate(indices):
                out[i] = (tokens[j], probs_of[j])
        return out  # type: ignore[return-value]

    def embed(
        self,
        input_ids: torch.Tensor,
        media: dict[str, Sequence[torch.Tensor]] | None = None,
        features: dict[str, Sequence[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """(B, T) ids with placeholders -> (B, T, D) input embeddings with the media tokens scattered in.

        ``features`` gives precomputed (N, D_enc) encoder outputs instead of ``media`` for a modality."""
        media = media or {}
        features = features or {}
        embedding = self.llm.get_input_embeddings()
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for pid in self._placeholder_ids.values():
            is_placeholder |= input_ids == pid
        embeds = embedding(input_ids.masked_fill(is_placeholder, 0))  # (B, T, D)
        for name, pid in self._placeholder_ids.items():
            slots = input_ids == pid  # (B, T)
            n_slots = int(slots.sum())
            if name in media and name in features:
                raise ValueError(f"{name} inputs given twice: as media and as precomputed features")
            items = features.get(name) or media.get(name, [])
            tokens = (
                torch.cat(self.encode(name, items, name in features))
                if items
                else embeds.new_zeros((0, embeds.shape[-1]))
            )
            if n_slots != tokens.shape[0]:
                raise ValueError(
                    f"{name} placeholder count mismatch: the input ids hold {n_slots} <{name}> placeholder "
                    f"tokens but the {len(items)} {name} input(s) produced {tokens.shape[0]} tokens"
                )
            if n_slots:
                embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), tokens.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        media: dict[str, Sequence[torch.Tensor]] | None = None,
        return_logits: bool = False,
        features: dict[str, Sequence[torch.Tensor]] | None = None,
    ) -> MultimodalOutput:
        """Run the model. ``labels`` (B, T) uses -100 for unsupervised positions; the loss is the mean
        next-token cross-entropy over supervised ones. ``features`` replaces ``media`` for modalities
        whose encoder outputs were precomputed (see ``mm_llama.data.feature_cache``)."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        embeds = self.embed(input_ids, media, features)
        decoder = self.llm.get_decoder()
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        head = self.llm.get_output_embeddings()
        loss, n_label = None, 0
        if labels is not None:
            targets = labels[:, 1:].to(self.device)  # (B, T-1)
            supervised = targets != IGNORE_INDEX
            n_label = int(supervised.sum())
            logits_sel = head(hidden[:, :-1][supervised])  # (K, V): only labelled positions
            loss = F.cross_entropy(logits_sel.float(), targets[supervised], reduction="sum") / max(n_label, 1)
        logits = head(hidden).float() if return_logits else None  # (B, T, V)
        return MultimodalOutput(loss=loss, logits=logits, num_label_tokens=n_label)

    # ---- generation ------------------------------------------------------------------------------------
    def _media_kwargs(self, images, audios, videos, imus, media) -> dict[str, Any]:
        merged = dict(media or {})
        for name, value in (("image", images), ("audio", audios), ("video", videos), ("imu", imus)):
            if value is None:
                continue
            if name in merged:
                raise ValueError(f"{name} inputs given twice: as {media_kwarg(name)}= and in media=")
            merged[name] = value
        return merged

    def prepare(self, prompts: Sequence[Prompt], media: dict[str, Sequence[Sequence[Any]]]) -> dict[str, Any]:
        """Tokenize prompts (strings or conversations) for generation, left-padded; ``media[m][i]`` holds
        prompt i's items."""
        examples = []
        for i, prompt in enumerate(prompts):
            per_prompt = {}
            for name, per_batch in media.items():
                if len(per_batch) != len(prompts):
                    raise ValueError(
                        f"{media_kwarg(name)}= must hold one list per prompt: {len(prompts)} prompts, "
                        f"{len(per_batch)} entries"
                    )
                per_prompt[name] = per_batch[i]
            examples.append(
                self.processor(prompt, per_prompt, add_generation_prompt=True, where=f"prompt {i}")
            )
        return self.processor.collate(examples, padding_side="left")

    @torch.no_grad()
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        images: Sequence[Any] | None = None,
        audios: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        imus: Sequence[Any] | None = None,
        media: dict[str, Sequence[Any]] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: bool = False,
        **generate_kwargs: Any,
    ) -> str | list[str] | Iterator[str]:
        """Answer prompts that contain media markers.

        A prompt is a user message (a string) or a whole conversation so far: a list of ``{"role",
        "content"}`` (or LLaVA ``{"from", "value"}``) turns ending with the user's, so a follow-up question
        sees the earlier turns and their media. One prompt: each media argument is the flat list of items
        for its markers, in order of appearance; returns a string, or with ``stream=True`` an iterator of
        text pieces. Several prompts (a list of them): each media argument holds one list per prompt;
        returns a list of strings (batched, left-padded).
        Plugin modalities go in ``media={"depth": [...]}``. Greedy by default; ``do_sample=True`` samples
        with ``temperature`` / ``top_p``. Other keyword arguments go to transformers' ``generate``.
        """
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))
        merged = self._media_kwargs(images, audios, videos, imus, media)
        if single:
            prompt_list = [prompts]
            merged = {name: [list(items)] for name, items in merged.items()}
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

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.llm.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        return sorted(i for i in ids if i is not None)

    # ---- save / load -----------------------------------------------------------------------------------
    def save_pretrained(
        self, path: str | Path, copy_llm: bool = False, state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the checkpoint folder (see the module docstring). The LLM and pretrained frozen encoders
        are referenced by id/path; ``copy_llm=True`` also writes the LLM to ``llm/``, with a LoRA adapter
        merged into it (this model's LLM is then the merged one, and no ``adapter/`` is written).
        ``state_dict`` (names as in :meth:`state_dict`) is written instead of the live tensors: what a
        sharded (FSDP) run gathers on its main process, where this model holds only shards."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config

        def part(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
            if state_dict is None:
                return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

        state = {
            f"{name}.{k}": v
            for name, p in self.projectors.items()
            for k, v in part(f"projectors.{name}.", p).items()
        }
        save_file(state, path / PROJECTORS_FILE)
        for name in self._own_encoders():
            (path / ENCODERS_DIR).mkdir(exist_ok=True)
            save_file(
                part(f"encoders.{name}.", self.encoders[name]), path / ENCODERS_DIR / f"{name}.safetensors"
            )
        self.tokenizer.save_pretrained(path / TOKENIZER_DIR)
        llm_state = None if state_dict is None else part("llm.", self.llm)
        if copy_llm:
            if hasattr(self.llm, "merge_and_unload"):  # the adapter goes into the copy, not beside it
                if state_dict is not None:
                    raise ValueError(
                        "save_pretrained: a LoRA adapter cannot be merged from a gathered state_dict"
                    )
                self.llm = self.llm.merge_and_unload()
                shutil.rmtree(path / ADAPTER_DIR, ignore_errors=True)
            self.llm.save_pretrained(path / LLM_DIR, safe_serialization=True, state_dict=llm_state)
            config = replace(config, llm=replace(config.llm, name_or_path=LLM_DIR, from_config=None))
        elif hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(path / ADAPTER_DIR, state_dict=llm_state)
        save_config(config, path / CONFIG_FILE)
        return path

    def _own_encoders(self) -> list[str]:
        """The encoders whose weights are this model's own (built from scratch, or training): a checkpoint
        stores them, where pretrained frozen ones are named by the config."""
        return [
            name
            for name, encoder in self.encoders.items()
            if not encoder.is_pretrained or any(p.requires_grad for p in encoder.parameters())
        ]

    def fingerprint(self) -> str:
        """A SHA-256 of what identifies this model's answers: its config, projectors, encoders built from
        scratch or trained, and any LoRA weights (the frozen LLM and pretrained encoders are named by the
        config). The eval runner keeps it in ``run.json`` so answers of a retrained model are never mixed
        with older ones."""
        digest = hashlib.sha256(yaml.safe_dump(to_dict(self.config), sort_keys=True).encode())
        tensors = {f"projectors.{k}": v for k, v in self.projectors.state_dict().items()}
        for name in self._own_encoders():
            tensors.update({f"encoders.{name}.{k}": v for k, v in self.encoders[name].state_dict().items()})
        tensors.update({k: v for k, v in self.llm.named_parameters() if "lora_" in k})
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def from_pretrained(cls, path: str | Path, llm: LLMConfig | None = None) -> MultimodalLM:
        """Load a checkpoint folder written by :meth:`save_pretrained`. ``llm`` overrides how the LLM
        loads (e.g. in 4 bits) while keeping the trained projectors."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an mm_llama checkpoint: {CONFIG_FILE} not found in it")
        config = load_config(ModelConfig, path / CONFIG_FILE)
        if llm is not None:
            config = replace(config, llm=llm)
        if config.llm.name_or_path == LLM_DIR and (path / LLM_DIR).is_dir():
            config = replace(config, llm=replace(config.llm, name_or_path=str(path / LLM_DIR)))
        tokenizer = (
            AutoTokenizer.from_pretrained(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
        )
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if config.llm.from_config is not None:
            # A randomly initialised LLM cannot be rebuilt from its config: its weights live in llm/.
            raise ValueError(
                f"{path / CONFIG_FILE}: llm.from_config is set, so the LLM weights are not referenced by any "
                "id or path; save such models with save_pretrained(..., copy_llm=True)"
            )
        model = cls(config, tokenizer=tokenizer)
        model._load_trained(path)
        return model

    def load_trained_parts(self, path: Path, missing_projectors_ok: bool = False) -> None:
        """Load the projector and encoder weights that :meth:`save_pretrained` wrote into ``path`` (not
        the adapter). With ``missing_projectors_ok``, a modality the saved model lacks keeps its fresh
        projector (a warning says so); otherwise strict loading raises."""
        state = load_file(path / PROJECTORS_FILE)
        for name, projector in self.projectors.items():
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub and missing_projectors_ok:
                logger.warning("%s has no %s projector: it starts from random weights", path, name)
                continue
            projector.load_state_dict(sub, strict=True)
        for name, encoder in self.encoders.items():
            file = path / ENCODERS_DIR / f"{name}.safetensors"
            if file.is_file():
                encoder.load_state_dict(load_file(file), strict=True)

    def _load_trained(self, path: Path) -> None:
        self.load_trained_parts(path)
        if (path / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            self.llm = PeftModel.from_pretrained(self.llm, path / ADAPTER_DIR)
