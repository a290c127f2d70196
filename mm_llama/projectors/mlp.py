"""``mlp2x_gelu``: LLaVA-1.5's projector, Linear -> GELU -> Linear, applied per token.

With ``tokens_per_feature`` K > 1 the second layer writes K LLM tokens for each encoder token
(``(B, N, D_enc) -> (B, N * K, D_llm)``, the K tokens of a feature kept together, in order): a pooled
feature that holds several attributes (a grid cell's shape, colour and size) can then be spelled as
several word-like tokens instead of one blend (the contrastive stage's caption-word and word-match
terms let each of the K tokens take its own word).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm_llama.projectors.base import Projector


@dataclass
class MLPOptions:
    """Options of the ``mlp2x_gelu`` projector."""

    tokens_per_feature: int = 1
    """K: LLM tokens written per encoder token (1: LLaVA-1.5's projector exactly)."""


class MLPProjector(Projector):
    """(B, N, D_enc) -> (B, N * K, D_llm); ``linear_1`` / ``linear_2`` as in transformers' Llava projector."""

    Options = MLPOptions

    def __init__(self, in_dim: int, out_dim: int, options: MLPOptions) -> None:
        super().__init__(in_dim, out_dim, options)
        if options.tokens_per_feature < 1:
            raise ValueError(
                f"mlp2x_gelu projector: options.tokens_per_feature must be >= 1, got {options.tokens_per_feature}"
            )
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim * options.tokens_per_feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_2(self.act(self.linear_1(x)))  # (B, N, K * D)
        return y.reshape(x.shape[0], -1, self.out_dim)  # (B, N * K, D)

    @classmethod
    def count_tokens(cls, options: Any, n: int) -> int:
        return n * options.tokens_per_feature
