"""The ``contrastive`` objective: ImageBind-style alignment of encoders and projectors to the frozen LLM's
input embeddings, with no LLM forward or backward pass.

The "text tower" is the frozen LLM's input embedding table: a caption's embedding is the (idf-weighted
or plain) mean of its token embeddings, and a sample's media embedding is the mean of its projected
tokens (projector(encoder(x))). Captions are each record's supervised tokens (a ``plain`` caption
record's reply), so such a stage reads the same data as LLaVA's stage 1. The loss is a weighted sum of
named pieces (:mod:`mm_llama.train.losses`: ``infonce``, ``caption_words``, ``word_match``,
``token_scale``, and any a user registers) and of the terms the modalities' projectors contribute
(``Projector.loss_terms``); negatives are the other samples of the process's micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mm_llama.model import MultimodalLM
from mm_llama.processor import IGNORE_INDEX
from mm_llama.train.losses import (
    CONTRASTIVE_TERMS,
    ContrastiveInputs,
    idf,
    loss_weights,
    projector_terms,
    reply_ids,
    sample_rows,
    weighted_terms,
)

WEIGHTINGS = ("idf", "uniform")
"""How a caption's token embeddings are pooled into its embedding: ``idf`` weighs each token by
log((1 + B) / (1 + df)), df = how many captions of the micro-batch hold it, so words every caption has
count for nothing; ``uniform`` is the plain mean."""


class ContrastiveAligner(nn.Module):
    """Wraps a model so that ``forward(**batch)`` returns the contrastive loss of a caption batch (a scalar,
    the mean over its samples).

    ``terms``: loss-term weights by name over the defaults (see :func:`mm_llama.train.losses.loss_weights`).
    Wrapping (rather than calling model methods) keeps DDP's gradient hooks on the path."""

    def __init__(
        self,
        model: MultimodalLM,
        temperature: float = 0.07,
        weighting: str = "idf",
        terms: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"contrastive weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
        self.model = model
        self.temperature = temperature
        self.weighting = weighting
        names = [t for p in model.projectors.values() for t in p.LOSS_TERMS]
        self.weights = loss_weights("contrastive", terms or {}, names, "contrastive loss_terms")
        self.aux_terms = weighted_terms(model.projectors, self.weights)

    def media_tokens(
        self,
        input_ids: torch.Tensor,
        media: dict[str, list[torch.Tensor]],
        features: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """The projected media tokens of each sample, (M_b, D_llm) float32 (all its items' tokens)."""
        return self._media(input_ids, media, features)[0]

    def _media(
        self,
        input_ids: torch.Tensor,
        media: dict[str, list[torch.Tensor]],
        features: dict[str, list[torch.Tensor]],
    ) -> tuple[list[torch.Tensor], dict[str, dict[int, list[torch.Tensor]]]]:
        """``media_tokens``, and the aux of each modality whose projector has a weighted loss term:
        modality -> sample row -> its items' aux."""
        model = self.model
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        aux: dict[str, dict[int, list[torch.Tensor]]] = {}
        for name, pid in model.processor.placeholder_ids.items():
            items = features.get(name) or media.get(name) or []
            if not items:
                continue
            encoded = name in features
            if name in self.aux_terms:
                pairs = model.encode_with_aux(name, items, encoded)
                aux[name] = {}
            else:
                pairs = [(t, None) for t in model.encode(name, items, encoded)]
            rows = sample_rows(
                input_ids,
                pid,
                [t.shape[0] for t, _ in pairs],
                f"contrastive stage: the {name} inputs do not match the <{name}> placeholders",
            )
            for row, (t, item_aux) in zip(rows, pairs):
                per_sample[row].append(t.float())
                if item_aux is not None:
                    aux[name].setdefault(row, []).append(item_aux)
        if not all(per_sample):
            raise ValueError(
                "contrastive stage: every record needs a media item (a caption record: '<image>' + caption)"
            )
        return [torch.cat(tokens) for tokens in per_sample], aux

    @torch.no_grad()
    def captions(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) caption ids (the supervised tokens, -1 padded) and (B, L) their weights (idf or uniform,
        0 at padding)."""
        if bool(((labels != IGNORE_INDEX).sum(1) == 0).any()):
            raise ValueError("contrastive stage: a record has no caption (no assistant reply)")
        ids = reply_ids(labels).to(self.model.device)
        mask = (ids >= 0).float()
        weights = mask
        if self.weighting == "idf":
            weights = mask * idf(ids)
            # a caption made only of words every caption has: fall back to its plain mean
            weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, mask)
        return ids, weights

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        media: dict[str, list[torch.Tensor]] | None = None,
        features: dict[str, list[torch.Tensor]] | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """The weighted sum of the objective's pieces, then of the projectors' terms (a scalar)."""
        tokens, aux = self._media(input_ids, media or {}, features or {})
        caption_ids, weights = self.captions(labels)  # (B, L), (B, L)
        table = self.model.llm.get_input_embeddings()
        with torch.no_grad():
            embeds = table(caption_ids.clamp(min=0)).float()  # (B, L, D)
            word_norm = embeds.norm(dim=-1)[caption_ids >= 0].mean()
            text = (embeds * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)  # (B, D)
        inputs = ContrastiveInputs(
            tokens, caption_ids, weights, embeds, text, word_norm, table, self.temperature
        )
        loss: torch.Tensor | None = None
        for name, piece in CONTRASTIVE_TERMS.items():
            weight = self.weights.get(name, 0.0)
            if weight > 0:
                term = weight * piece.compute(inputs)
                loss = term if loss is None else loss + term
        for term in projector_terms(self.model.projectors, aux, caption_ids, self.weights):
            loss = term if loss is None else loss + term
        if loss is None:
            raise ValueError("contrastive objective: no loss term has a positive weight")
        return loss
