"""``linear``: one affine map per token (LLaVA-1's projector; Fuyu's patch embedding)."""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.projectors.base import Projector


class LinearProjector(Projector):
    """(B, N, D_enc) -> (B, N, D_llm) with a single ``nn.Linear``."""

    def __init__(self, in_dim: int, out_dim: int, options: object) -> None:
        super().__init__(in_dim, out_dim, options)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
