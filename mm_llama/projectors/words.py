"""``word_mix``: every media token is a mixture of the LLM's own word embeddings (or of "no word").

Per encoder token, an MLP writes K distributions over a vocabulary of V caption words plus a null
entry, and each output token is ``probs @ [word embeddings; null]``: tokens the frozen LLM reads as
words. (LQAE and SPAE quantize images onto a frozen LLM's vocabulary; Ovis writes probabilistic visual
tokens as mixtures of an embedding table. How this projector made the quickstart's image questions
learnable: docs/quickstart_learning.md.)

Hooks (see :mod:`mm_llama.projectors.base`):

- ``prepare``: the vocabulary is data, not configuration. The first stage that builds the projector
  without one sets it to the V tokens found in the replies of the most records holding the modality
  (:func:`caption_vocabulary`), with their rows of the LLM's input embedding table; the ids and rows
  are buffers, saved and loaded with the projector, so later stages keep them.
- ``word_count`` loss term: for each sample and vocabulary word, the probability mass its tokens give
  the word must equal how many times its caption holds it (:func:`word_count_loss`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.projectors.base import AuxBatch, Projector, ProjectorContext


@dataclass
class WordMixOptions:
    """Options of the ``word_mix`` projector."""

    tokens_per_feature: int = 4
    """K: LLM tokens written per encoder token (kept together, in order)."""
    vocab_size: int = 64
    """V: how many caption words the tokens choose from (the most frequent ones of the training captions)."""
    temperature: float = 1.0
    """Softmax temperature of the word distributions."""


class WordMixProjector(Projector):
    """(B, N, D_enc) -> (B, N * K, D_llm), each token a convex mixture of V word embeddings and a null."""

    Options = WordMixOptions
    LOSS_TERMS = ("word_count",)

    def __init__(self, in_dim: int, out_dim: int, options: WordMixOptions) -> None:
        super().__init__(in_dim, out_dim, options)
        if options.tokens_per_feature < 1 or options.vocab_size < 1:
            raise ValueError(
                "word_mix projector: options.tokens_per_feature and options.vocab_size must be >= 1, got "
                f"{options.tokens_per_feature} and {options.vocab_size}"
            )
        if options.temperature <= 0:
            raise ValueError(
                f"word_mix projector: options.temperature must be > 0, got {options.temperature}"
            )
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, options.tokens_per_feature * (options.vocab_size + 1))
        self.register_buffer("word_ids", torch.full((options.vocab_size,), -1, dtype=torch.long))
        """The vocabulary's LLM token ids; -1 marks an unused slot (fewer distinct caption tokens than V)."""
        self.register_buffer("word_embeds", torch.zeros(options.vocab_size, out_dim))
        """Their rows of the LLM's input embedding table, copied when anchored (frozen)."""
        self.null = nn.Parameter(torch.zeros(out_dim))
        """The "no word" token (learned), for what a caption does not mention (an empty grid cell)."""

    @property
    def anchored(self) -> bool:
        """Whether the vocabulary is set (by :meth:`anchor`, or loaded with the weights)."""
        return bool((self.word_ids >= 0).any())

    @torch.no_grad()
    def anchor(self, ids: Sequence[int], embedding: nn.Embedding) -> None:
        """Set the vocabulary to LLM token ``ids`` (at most V; fewer leave slots unused) with their rows of
        ``embedding``; the null token starts at their mean."""
        if not 0 < len(ids) <= self.options.vocab_size:
            raise ValueError(
                f"word_mix projector: expected 1 to {self.options.vocab_size} vocabulary ids, got {len(ids)}"
            )
        index = torch.as_tensor(list(ids), dtype=torch.long, device=embedding.weight.device)
        rows = embedding(index).to(self.word_embeds)
        self.word_ids.fill_(-1)
        self.word_embeds.zero_()
        self.word_ids[: len(ids)] = index.to(self.word_ids.device)
        self.word_embeds[: len(ids)] = rows
        self.null.copy_(rows.mean(0))

    def word_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D_enc) -> (B, N * K, V + 1) float32 distributions over the vocabulary, null last (all on
        the null entry until the projector is anchored: an untrained model still runs)."""
        v = self.options.vocab_size
        logits = self.linear_2(self.act(self.linear_1(x))).float().reshape(x.shape[0], -1, v + 1)
        unused = torch.cat([self.word_ids < 0, self.word_ids.new_zeros(1, dtype=torch.bool)])
        return F.softmax(logits.masked_fill(unused, float("-inf")) / self.options.temperature, dim=-1)

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, M, V + 1) distributions -> (B, M, D_llm) tokens, in the projector's dtype."""
        table = torch.cat([self.word_embeds, self.null.unsqueeze(0)]).float()
        return (probs @ table).to(self.null.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.word_probs(x))

    # ---- hooks -----------------------------------------------------------------------------------------
    def prepare(self, context: ProjectorContext) -> None:
        """Anchor the vocabulary on the stage's replies, unless it is set already (loaded with the
        weights); a stage without records of this modality leaves it for a later one."""
        if self.anchored:
            return
        ids = caption_vocabulary(context.replies(), context.tokenizer, self.options.vocab_size)
        if not ids:
            return
        self.anchor(ids, context.input_embeddings)
        words = [context.tokenizer.decode([i]) for i in ids]
        context.log(f"{context.modality} projector vocabulary ({len(ids)} words): {words}")

    def project_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens, and their word distributions (B, M, V + 1) as the aux."""
        probs = self.word_probs(x)
        return self.mix(probs), probs

    def loss_terms(self, batch: AuxBatch) -> dict[str, torch.Tensor]:
        return {"word_count": word_count_loss(batch.aux, self.word_ids, batch.caption_ids)}

    @classmethod
    def count_tokens(cls, options: Any, n: int) -> int:
        return n * options.tokens_per_feature


def caption_vocabulary(replies: Iterable[list[str]], tokenizer: Any, size: int) -> list[int]:
    """The ``size`` token ids that the most records hold in their replies (document frequency, ties by id;
    special tokens excluded); ``replies``: one list of reply strings per record, joined by spaces before
    tokenizing. [] when there are none."""
    special = set(tokenizer.all_special_ids)
    df: Counter[int] = Counter()
    for record in replies:
        ids = tokenizer(" ".join(record), add_special_tokens=False)["input_ids"]
        df.update(set(ids) - special)
    return [i for i, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def word_count_loss(
    probs: list[torch.Tensor], word_ids: torch.Tensor, caption_ids: torch.Tensor
) -> torch.Tensor:
    """Idf-weighted mean squared error between how much probability a sample's media tokens give each
    vocabulary word and how many times its caption holds the word.

    Every unit of mass on a word the caption lacks costs as much as a missing one, so tokens that cannot
    tell (an empty grid cell) take the null entry rather than a common word. Idf is over these samples:
    log((1 + S) / (1 + samples whose caption holds the word)), so a word in every caption weighs 0.
    ``probs``: S x (M_s, V + 1) word distributions; ``word_ids`` (V,) the vocabulary (-1: unused);
    ``caption_ids`` (S, L), -1 padded."""
    used = word_ids >= 0  # (V,)
    hits = (caption_ids.unsqueeze(-1) == word_ids.view(1, 1, -1)) & used & (caption_ids >= 0).unsqueeze(-1)
    counts = hits.float().sum(1)  # (S, V) occurrences of each word in each caption
    rows = caption_ids.shape[0]
    idf = torch.log((1.0 + rows) / (1.0 + (counts > 0).float().sum(0))) * used  # (V,)
    mass = torch.stack([p[:, : len(word_ids)].sum(0) for p in probs])  # (S, V)
    weights = idf.unsqueeze(0).expand_as(mass)
    return (weights * (mass - counts) ** 2).sum() / weights.sum().clamp(min=1e-8)
