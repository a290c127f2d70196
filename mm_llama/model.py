"""``MultimodalLM``: modality encoders + projectors + a Hugging Face causal LM, and its forward pass.

The processor has already expanded every marker into placeholder ids; the model encodes and projects
each media item, scatters the projected tokens into the placeholder slots of the token embeddings (a
count mismatch raises), and runs the LLM. The loss is computed on labelled positions only, and only
those positions go through the LM head, which saves most of the vocabulary projection in training.
Generation lives in :mod:`mm_llama.generation`, checkpoint folders in :mod:`mm_llama.model_io`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import mm_llama.encoders  # noqa: F401  (registers the built-in encoders)
import mm_llama.projectors  # noqa: F401  (registers the built-in projectors)
from mm_llama.config import Dtype, ModelConfig, from_dict, load_config
from mm_llama.encoders.base import ModalityEncoder, build_encoder
from mm_llama.generation import GenerationMixin
from mm_llama.llm import load_llm, load_tokenizer
from mm_llama.model_io import CheckpointMixin
from mm_llama.processor import IGNORE_INDEX, MultimodalProcessor
from mm_llama.projectors.base import Projector, build_projector


@dataclass
class MultimodalOutput:
    """What ``forward`` returns: the mean token loss over labelled positions, and full logits if asked."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    """(B, T, V); only with ``return_logits=True``."""
    num_label_tokens: int


class MultimodalLM(GenerationMixin, CheckpointMixin, nn.Module):
    """An any-to-text model: ``encoders[m]`` -> ``projectors[m]`` -> placeholder slots -> ``llm``."""

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.llm)
        vocab_size = len(tokenizer)  # a random LLM (llm.from_config) is sized before the marker tokens
        self.processor = MultimodalProcessor.from_config(config, tokenizer)
        self.tokenizer = self.processor.tokenizer
        self.llm = llm if llm is not None else load_llm(config.llm, vocab_size=vocab_size)
        hidden = int(self.llm.get_input_embeddings().embedding_dim)
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        for name, spec in config.modalities.items():
            encoder = build_encoder(name, spec.encoder)
            self.encoders[name] = encoder
            self.projectors[name] = build_projector(name, spec.projector, encoder.output_dim, hidden)
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

    @classmethod
    def from_llava(
        cls,
        path: str | Path,
        llm: str | None = None,
        vision_tower: str | None = None,
        allow_pickle: bool = False,
        dtype: Dtype = "float32",
    ) -> MultimodalLM:
        """Import a llava-hf folder or an original LLaVA-1.5 projector checkpoint (``mm_projector.bin``,
        read only with ``allow_pickle``); see :mod:`mm_llama.interop.llava`."""
        from mm_llama.interop.llava import from_llava

        return from_llava(path, llm=llm, vision_tower=vision_tower, allow_pickle=allow_pickle, dtype=dtype)

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
        only the projector runs. Inside :meth:`recording_aux` for ``modality``, the projector runs
        ``project_with_aux`` and each item's (tokens, aux) is recorded."""
        record = getattr(self, "_aux_record", None)
        if record is None or modality not in record:
            return [tokens for tokens, _ in self._encode(modality, items, encoded, with_aux=False)]
        pairs = self._encode(modality, items, encoded, with_aux=True)
        record[modality].extend(pairs)
        return [tokens for tokens, _ in pairs]

    def encode_with_aux(
        self, modality: str, items: Sequence[torch.Tensor], encoded: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Like :meth:`encode`, through the projector's ``project_with_aux``: (tokens (M_i, D_llm), the
        item's aux or ``None``) per item (see :mod:`mm_llama.projectors.base`)."""
        return self._encode(modality, items, encoded, with_aux=True)

    @contextmanager
    def recording_aux(
        self, modalities: Collection[str]
    ) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]]:
        """While open, :meth:`encode` (and so ``forward``) records the (tokens, aux) of every item of
        ``modalities`` it projects, in call order, into the dict this yields (modality -> items): how an
        objective reads projector loss terms from a forward pass."""
        record: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {m: [] for m in modalities}
        previous = getattr(self, "_aux_record", None)
        self._aux_record = record
        try:
            yield record
        finally:
            self._aux_record = previous

    def _encode(
        self, modality: str, items: Sequence[torch.Tensor], encoded: bool, with_aux: bool
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
            if with_aux:
                tokens, aux = projector.project_with_aux(x)  # (B, M, D_llm), (B, ...) or None
            else:
                tokens, aux = projector(x), None
            for j, i in enumerate(indices):
                out[i] = (tokens[j], aux[j] if aux is not None else None)
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
