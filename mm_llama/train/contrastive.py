"""ImageBind-style contrastive pretraining of encoders built from scratch.

An encoder with random weights learns slowly through a frozen LLM: the caption loss reaches it through
the whole decoder, one expensive step at a time. ImageBind instead aligns each modality's encoder to a
frozen text embedding with InfoNCE, which needs no LLM backward pass. Here the "text tower" is the
frozen LLM's input embedding table: a caption's embedding is the mean of its token embeddings, and a
sample's media embedding is the mean of its projected tokens (projector(encoder(x))). With ``idf``
weighting (the default) the caption mean weighs each token by its inverse document frequency within the
batch, log((1 + B) / (1 + df)), so the words every caption shares ("a", "in the", ",") count for nothing
and the media tokens align with the words that tell samples apart (shapes, colours, counts, pitches):
the words the later questions ask about. ``uniform`` is the plain mean. Both live in the
space the projector must write into, so the projector is pre-aligned to the LLM's input space too, and
the objective costs no LLM forward pass at all (running the decoder over the captions would cost more
than the encoders themselves on a CPU). Captions come from the stage's labels (the
supervised tokens of a ``plain`` caption record), so the stage reads the same data as stage 1.

For a modality with a ``word_mix`` projector (tokens that are mixtures of caption-word embeddings), the
word-count term (``count_weight``) supervises the mixtures themselves: each sample's tokens must give
every vocabulary word as much probability mass as its caption has occurrences of it.

A last term keeps each projected token's norm at the mean norm of the caption's word embeddings
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
from mm_llama.projectors.words import WordMixProjector

WEIGHTINGS = ("idf", "uniform")
"""How a caption's token embeddings are pooled into its embedding (see the module docstring)."""


class ContrastiveAligner(nn.Module):
    """Wraps a model so that ``forward(**batch)`` returns the symmetric InfoNCE loss of a caption batch.

    Wrapping (rather than calling model methods) keeps DDP's gradient hooks on the path."""

    def __init__(
        self,
        model: MultimodalLM,
        temperature: float,
        weighting: str = "idf",
        word_weight: float = 1.0,
        match_weight: float = 0.0,
        count_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"contrastive weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
        if word_weight < 0 or match_weight < 0 or count_weight < 0:
            raise ValueError(
                "contrastive word / match / count weights must be >= 0, got "
                f"{word_weight}, {match_weight}, {count_weight}"
            )
        self.model = model
        self.temperature = temperature
        self.weighting = weighting
        self.word_weight = word_weight
        self.match_weight = match_weight
        self.count_weight = count_weight

    def media_tokens(
        self,
        input_ids: torch.Tensor,
        media: dict[str, list[torch.Tensor]],
        features: dict[str, list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """The projected media tokens of each sample, (M_b, D_llm) float32 (all its items' tokens)."""
        return self._media(input_ids, media, features, word_probs=False)[0]

    def _media(
        self,
        input_ids: torch.Tensor,
        media: dict[str, list[torch.Tensor]],
        features: dict[str, list[torch.Tensor]],
        word_probs: bool,
    ) -> tuple[list[torch.Tensor], dict[str, dict[int, list[torch.Tensor]]]]:
        """``media_tokens``, and with ``word_probs`` the word distributions of each ``word_mix`` modality:
        modality -> sample row -> its items' (M_i, V + 1) distributions."""
        model = self.model
        batch = input_ids.shape[0]
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        words: dict[str, dict[int, list[torch.Tensor]]] = {}
        for name, pid in model.processor.placeholder_ids.items():
            items = features.get(name) or media.get(name) or []
            if not items:
                continue
            encoded = name in features
            if word_probs and isinstance(model.projectors[name], WordMixProjector):
                pairs = model.encode_words(name, items, encoded)
                words[name] = {}
            else:
                pairs = [(t, None) for t in model.encode(name, items, encoded)]
            slots = (input_ids == pid).sum(1).tolist()  # placeholders per sample
            row = 0
            for t, probs in pairs:  # items fill the samples' placeholder slots in batch order
                while row < batch and slots[row] == 0:
                    row += 1
                if row == batch or slots[row] < t.shape[0]:
                    raise ValueError(
                        f"contrastive stage: the {name} inputs do not match the <{name}> placeholders"
                    )
                per_sample[row].append(t.float())
                if probs is not None:
                    words[name].setdefault(row, []).append(probs)
                slots[row] -= t.shape[0]
        if not all(per_sample):
            raise ValueError(
                "contrastive stage: every record needs a media item (a caption record: '<image>' + caption)"
            )
        return [torch.cat(tokens) for tokens in per_sample], words

    @torch.no_grad()
    def captions(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) caption ids (the supervised tokens, -1 padded) and (B, L) their weights (idf or uniform,
        0 at padding)."""
        supervised = labels != IGNORE_INDEX  # (B, T)
        lengths = supervised.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("contrastive stage: a record has no caption (no assistant reply)")
        ids = torch.full((labels.shape[0], int(lengths.max())), -1, dtype=torch.long)
        for row in range(labels.shape[0]):
            caption = labels[row][supervised[row]]
            ids[row, : len(caption)] = caption
        ids = ids.to(self.model.device)
        mask = (ids >= 0).float()
        weights = mask
        if self.weighting == "idf":
            weights = mask * _idf(ids)
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
        """InfoNCE + caption-word prediction + word match + word count + token scale, averaged over the
        batch (a scalar)."""
        tokens, words = self._media(input_ids, media or {}, features or {}, self.count_weight > 0)
        caption_ids, weights = self.captions(labels)  # (B, L), (B, L)
        table = self.model.llm.get_input_embeddings()
        with torch.no_grad():
            embeds = table(caption_ids.clamp(min=0)).float()  # (B, L, D)
            word_norm = embeds.norm(dim=-1)[caption_ids >= 0].mean()
            text = (embeds * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)  # (B, D)

        # 1. InfoNCE between the mean media token and the (weighted) mean caption embedding
        z_media = F.normalize(torch.stack([t.mean(0) for t in tokens]), dim=-1)  # (B, D)
        logits = z_media @ F.normalize(text, dim=-1).T / self.temperature  # (B, B)
        same = _same_rows(caption_ids).float()  # identical captions are positives of each other
        targets = same / same.sum(1, keepdim=True)
        loss_media = -(targets * F.log_softmax(logits, dim=1)).sum(1)
        loss_text = -(targets * F.log_softmax(logits.T, dim=1)).sum(1)
        loss = ((loss_media + loss_text) / 2).mean()

        # 2. Caption words (see caption_word_loss)
        if self.word_weight > 0:
            loss = loss + self.word_weight * caption_word_loss(
                tokens, caption_ids, weights, table, self.temperature
            )

        # 3. Word match (see word_match_loss)
        if self.match_weight > 0:
            loss = loss + self.match_weight * word_match_loss(tokens, embeds, weights)

        # 4. Word count (see word_count_loss), for each modality with a word_mix projector
        for name, by_row in words.items():
            rows = sorted(by_row)
            loss = loss + self.count_weight * word_count_loss(
                [torch.cat(by_row[r]) for r in rows], self.model.projectors[name].word_ids, caption_ids[rows]
            )

        # 5. InfoNCE only sees directions; keep every projected token at the scale of a word embedding, or
        # the LLM later reads tokens 3-10x larger than any word it knows.
        norms = torch.cat([t.norm(dim=-1) for t in tokens])
        return loss + ((norms / word_norm - 1.0) ** 2).mean()


def caption_word_loss(
    tokens: list[torch.Tensor],
    caption_ids: torch.Tensor,
    weights: torch.Tensor,
    table: nn.Embedding,
    temperature: float,
) -> torch.Tensor:
    """Symmetric cross-entropy between the samples' captions (weighted bags of words) and what their media
    tokens name.

    The vocabulary is the batch's caption words; a sample names a word as strongly as its closest token
    (a logsumexp over its tokens of cosine / temperature with the word's input embedding), so each token
    may carry its own words (a grid cell its shape and colour). Both ways, as InfoNCE: each sample must
    name its caption's words among the batch's words (InfoNCE alone stops learning an attribute once the
    others tell the batch's samples apart), and each word must be named by the samples whose captions
    hold it more than by the others (without this direction a token that names a word for every sample,
    an empty grid cell saying "circle", satisfies the first direction for free).
    ``tokens``: B x (M_b, D); ``caption_ids`` (B, L), -1 padded; ``weights`` (B, L), 0 at padding."""
    vocab, inverse = torch.unique(caption_ids, return_inverse=True)  # (V,), (B, L)
    with torch.no_grad():
        words = F.normalize(table(vocab.clamp(min=0)).float(), dim=-1)  # (V, D)
        target = torch.zeros(len(tokens), len(vocab), device=words.device)  # (B, V)
        target.scatter_add_(1, inverse, weights.float())
        target[:, vocab < 0] = 0.0
    scores = torch.stack([(F.normalize(t, dim=-1) @ words.T / temperature).logsumexp(0) for t in tokens])
    padding = vocab < 0
    log_words = F.log_softmax(scores.masked_fill(padding, float("-inf")), dim=1)  # (B, V): sample -> words
    by_sample = target / target.sum(1, keepdim=True)
    loss_words = -(by_sample * log_words.masked_fill(padding, 0.0)).sum(1).mean()
    named = target.sum(0) > 0  # (V,) words some caption weighs; idf-0 words (in every caption) drop out
    log_samples = F.log_softmax(scores[:, named], dim=0)  # (B, V'): word -> samples
    by_word = target[:, named] / target[:, named].sum(0, keepdim=True)
    loss_samples = -(by_word * log_samples).sum(0).mean()
    return (loss_words + loss_samples) / 2


def word_match_loss(tokens: list[torch.Tensor], words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the caption-weighted 1 - cosine between each caption word's input embedding and
    the sample's media token closest to it.

    The ranking terms only ask a token to be nearer its words than other words (on the toy world a
    token's nearest word sat at cosine 0.3-0.4); this one asks it to be the word (0.5-0.8 with weight
    0.3 and 5 tokens per grid cell, 0.8-0.95 with weight 1), so the frozen LLM meets media tokens that
    look like words it knows. Each word pulls only its closest token, so tokens settle on a word each.
    ``tokens``: B x (M_b, D); ``words``: (B, L, D) the captions' input embeddings (any value at padding);
    ``weights`` (B, L), 0 at padding."""
    words = F.normalize(words.detach().float(), dim=-1)
    losses = []
    for t, w, wt in zip(tokens, words, weights):
        closest = (w @ F.normalize(t, dim=-1).T).max(1).values  # (L,) each word's best cosine
        losses.append((wt * (1.0 - closest)).sum() / wt.sum().clamp(min=1e-8))
    return torch.stack(losses).mean()


def word_count_loss(
    probs: list[torch.Tensor], word_ids: torch.Tensor, caption_ids: torch.Tensor
) -> torch.Tensor:
    """Idf-weighted mean squared error between how much probability a sample's media tokens give each
    vocabulary word and how many times its caption holds the word.

    A count, not a "named by some token" likelihood: with a noisy-OR or a max over tokens, tokens that
    cannot tell (an empty grid cell) hedge on the common words ("circle" in half the captions) at little
    cost, and the LLM then meets a circle in every empty cell; here every unit of mass on a word the
    caption lacks costs as much as a missing one, so empty cells take the null entry. Idf is over these
    samples (a word in every caption weighs 0). ``probs``: B x (M_b, V + 1) word distributions of a
    ``word_mix`` projector; ``word_ids`` (V,) its vocabulary (-1: unused); ``caption_ids`` (B, L), -1
    padded."""
    used = word_ids >= 0  # (V,)
    hits = (caption_ids.unsqueeze(-1) == word_ids.view(1, 1, -1)) & used & (caption_ids >= 0).unsqueeze(-1)
    counts = hits.float().sum(1)  # (B, V) occurrences of each word in each caption
    rows = caption_ids.shape[0]
    idf = torch.log((1.0 + rows) / (1.0 + (counts > 0).float().sum(0))) * used  # (V,)
    mass = torch.stack([p[:, : len(word_ids)].sum(0) for p in probs])  # (B, V)
    weights = idf.unsqueeze(0).expand_as(mass)
    return (weights * (mass - counts) ** 2).sum() / weights.sum().clamp(min=1e-8)


def _idf(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids (-1 = padding) -> (B, L) log((1 + B) / (1 + df)) of each token, df = how many rows hold it."""
    rows = ids.shape[0]
    vocab, inverse = torch.unique(ids, return_inverse=True)  # (V,), (B, L)
    present = torch.zeros(rows, len(vocab), dtype=torch.bool, device=ids.device)
    present.scatter_(1, inverse, True)
    df = present.sum(0).float()  # (V,) rows holding each token
    idf = torch.log((1.0 + rows) / (1.0 + df))
    return idf[inverse]


def _same_rows(ids: torch.Tensor) -> torch.Tensor:
    """(B, B) True where two rows of ``ids`` are identical."""
    return (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1)
