"""``word_mix``: every media token is a mixture of the LLM's own word embeddings (or of "no word").

Per encoder token, an MLP writes K distributions over a vocabulary of V caption words plus a null
entry, and each output token is ``probs @ [word embeddings; null]``: a grid cell becomes "large",
"red", "circle", then nulls, tokens the frozen LLM already reads as words, so it copies and compares
them the way it does text. (On the toy world, a frozen SmolLM2-135M given free ``mlp2x_gelu`` tokens
still named the shapes and colours near chance after 150 stage-1 caption steps, 35% and 34% right,
though a linear probe read 96% of the cells' shapes from the same features; given ``word_mix`` tokens,
its captions after 50 steps held 45% of the image's shape and colour words with 0.3 wrong words per
caption.) The idea is old: LQAE and SPAE quantize images onto a frozen LLM's vocabulary, Ovis writes
probabilistic visual tokens as mixtures of an embedding table.

The vocabulary is data, not configuration: the V most frequent tokens of the caption replies of the
first stage that trains the projector (:func:`mm_llama.train.stage.anchor_word_projectors` calls
:meth:`WordMixProjector.anchor`); the ids and their embedding rows are buffers, saved and loaded with
the projector. The contrastive stage's word-count term (``contrastive_count_weight``) then teaches the
distributions: for each sample and vocabulary word, the probability mass of its tokens must equal how
often the caption holds the word, so an empty cell's tokens learn the null entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.projectors.base import Projector


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

    @classmethod
    def count_tokens(cls, options: Any, n: int) -> int:
        return n * options.tokens_per_feature
