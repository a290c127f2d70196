"""ImageBind-style contrastive pretraining of encoders built from scratch.

An encoder with random weights learns slowly through a frozen LLM: the caption loss reaches it through
the whole decoder, one expensive step at a time. ImageBind instead aligns each modality's encoder to a
frozen text embedding with InfoNCE, which needs no LLM backward pass. Here the "text tower" is the
frozen LLM's input embedding table: a caption's embedding is the mean of its token embeddings, and a
sample's media embedding is the mean of its projected tokens (projector(encoder(x))). Both live in the
space the projector must write into, so the projector is pre-aligned to the LLM's input space too, and
the objective costs no LLM forward pass at all (running the decoder over the captions would cost more
than the encoders themselves on a CPU). Captions come from the stage's labels (the
supervised tokens of a ``plain`` caption record), so the stage reads the same data as stage 1.

A second term keeps each projected token's norm at the mean norm of the caption's word embeddings
(InfoNCE alone leaves the scale free, and tokens several times larger than any word derail the LLM).

Samples with identical captions are positives of each other (soft targets), so templated captions
("a person running") do not push apart media that should match. Negatives are the other samples of the
process's micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.model import MultimodalLM
from mm_llama.processor import IGNORE_INDEX


class ContrastiveAligner(nn.Module):
    """Wraps a model so that ``forward(**batch)`` returns the symmetric InfoNCE loss of a caption batch.

    Wrapping (rather than calling model methods) keeps DDP's gradient hooks on the path."""

    def __init__(self, model: MultimodalLM, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        self.model = model
        self.temperature = temperature

    def media_embeddings(
        self,
        input_ids: torch.Tensor,
        media: dict[str, list[torch.Tensor]],
        features: dict[str, list[torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D_llm) the mean projected media token of each sample, and (K,) the norm of every token."""
        model = self.model
        batch, device = input_ids.shape[0], model.device
        dim = model.llm.get_input_embeddings().embedding_dim
        sums = torch.zeros(batch, dim, device=device)
        counts = torch.zeros(batch, device=device)
        norms = []
        for name, pid in model.processor.placeholder_ids.items():
            items = features.get(name) or media.get(name) or []
            if not items:
                continue
            tokens = model.encode(name, items, name in features)  # each (M_i, D)
            slots = (input_ids == pid).sum(1).tolist()  # placeholders per sample
            owners, row = [], 0
            for t in tokens:  # items fill the samples' placeholder slots in batch order
                while row < batch and slots[row] == 0:
                    row += 1
                if row == batch or slots[row] < t.shape[0]:
                    raise ValueError(
                        f"contrastive stage: the {name} inputs do not match the <{name}> placeholders"
                    )
                owners.append(row)
                slots[row] -= t.shape[0]
            for row, t in zip(owners, tokens):
                sums[row] = sums[row] + t.float().mean(0)
                norms.append(t.float().norm(dim=-1))
                counts[row] += 1
        if bool((counts == 0).any()):
            raise ValueError(
                "contrastive stage: every record needs a media item (a caption record: '<image>' + caption)"
            )
        return sums / counts.unsqueeze(-1), torch.cat(norms)

    @torch.no_grad()
    def caption_embeddings(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D_llm) mean input embedding of each caption's tokens, (B, L) caption ids (-1 padded), and
        the mean norm of those token embeddings (a scalar)."""
        model = self.model
        supervised = labels != IGNORE_INDEX  # (B, T)
        lengths = supervised.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("contrastive stage: a record has no caption (no assistant reply)")
        width = int(lengths.max())
        ids = torch.full((labels.shape[0], width), model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row in range(labels.shape[0]):
            caption = labels[row][supervised[row]]
            ids[row, : len(caption)] = caption
            mask[row, : len(caption)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        embeds = model.llm.get_input_embeddings()(ids)  # (B, L, D)
        weights = mask.unsqueeze(-1).float()
        token_norm = embeds.float().norm(dim=-1)[mask.bool()].mean()
        return (embeds.float() * weights).sum(1) / weights.sum(1), ids.masked_fill(mask == 0, -1), token_norm

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        media: dict[str, list[torch.Tensor]] | None = None,
        features: dict[str, list[torch.Tensor]] | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Mean symmetric InfoNCE over the batch (a scalar)."""
        pooled, norms = self.media_embeddings(input_ids, media or {}, features or {})
        z_media = F.normalize(pooled, dim=-1)  # (B, D)
        text, caption_ids, word_norm = self.caption_embeddings(labels)
        z_text = F.normalize(text, dim=-1)  # (B, D)
        logits = z_media @ z_text.T / self.temperature  # (B, B)
        same = _same_rows(caption_ids).float()  # identical captions are positives of each other
        targets = same / same.sum(1, keepdim=True)
        loss_media = -(targets * F.log_softmax(logits, dim=1)).sum(1)
        loss_text = -(targets * F.log_softmax(logits.T, dim=1)).sum(1)
        # InfoNCE only sees directions; keep every projected token at the scale of a word embedding, or
        # the LLM later reads tokens 3-10x larger than any word it knows.
        scale = ((norms / word_norm - 1.0) ** 2).mean()
        return ((loss_media + loss_text) / 2).mean() + scale


def _same_rows(ids: torch.Tensor) -> torch.Tensor:
    """(B, B) True where two rows of ``ids`` are identical."""
    return (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1)
