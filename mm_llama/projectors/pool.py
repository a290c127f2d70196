"""``pool``: reduce N encoder tokens to at most M by adaptive average pooling, then an MLP to the LLM width.

When N and M are both perfect squares the tokens are treated as a sqrt(N) x sqrt(N) grid (a ViT's
patch grid) and pooled in 2-D to sqrt(M) x sqrt(M), as LLaVA-style spatial pooling does; otherwise
they are pooled in 1-D along the token axis, keeping their order. Inputs with N <= M tokens are not
pooled (never upsampled), so M is an upper bound. The MLP is LLaVA-1.5's Linear -> GELU -> Linear.

    (B, N, D_enc) -pool-> (B, min(N, M), D_enc) -MLP-> (B, min(N, M), D_llm)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.projectors.base import Projector

DEFAULT_OUTPUT_TOKENS = 64
"""An 8 x 8 grid: a 24 x 24 CLIP-L/14 grid pooled 3 x 3."""


@dataclass
class PoolOptions:
    """Options of the ``pool`` projector."""

    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    """M: the most tokens per item after pooling; a perfect square enables 2-D pooling of square grids."""


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


class PoolProjector(Projector):
    """(B, N, D_enc) -> (B, min(N, M), D_llm): adaptive average pooling, then Linear -> GELU -> Linear."""

    Options = PoolOptions

    def __init__(self, in_dim: int, out_dim: int, options: PoolOptions) -> None:
        super().__init__(in_dim, out_dim, options)
        if options.output_tokens < 1:
            raise ValueError(
                f"pool projector: options.output_tokens must be >= 1, got {options.output_tokens}"
            )
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, min(N, M), D) by adaptive average pooling (2-D on square grids)."""
        b, n, d = x.shape
        m = self.num_tokens(n)
        if m == n:
            return x
        side, out_side = _square_side(n), _square_side(m)
        if side is not None and out_side is not None:
            grid = x.transpose(1, 2).reshape(b, d, side, side)  # (B, D, s, s)
            return F.adaptive_avg_pool2d(grid, out_side).flatten(2).transpose(1, 2)  # (B, M, D)
        return F.adaptive_avg_pool1d(x.transpose(1, 2), m).transpose(1, 2)  # (B, M, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pool(x))))

    @classmethod
    def count_tokens(cls, options: Any, n: int) -> int:
        return min(n, options.output_tokens)
