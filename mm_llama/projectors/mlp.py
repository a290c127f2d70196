"""``mlp2x_gelu``: LLaVA-1.5's projector, Linear -> GELU -> Linear, applied per token."""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.projectors.base import Projector


class MLPProjector(Projector):
    """(B, N, D_enc) -> (B, N, D_llm); ``linear_1`` / ``linear_2`` as in transformers' Llava projector."""

    def __init__(self, in_dim: int, out_dim: int, options: object) -> None:
        super().__init__(in_dim, out_dim, options)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
