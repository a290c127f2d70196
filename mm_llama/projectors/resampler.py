"""``resampler``: the Perceiver resampler of Flamingo, used by AnyMAL for images and video.

M learned latent queries read the encoder features through L layers of cross-attention (the latents
attend to the concatenation [features; latents], as in Flamingo) each followed by a feed-forward
block, both pre-norm with residuals. Any number N of input tokens becomes a fixed M output tokens,
which a final layer norm and a linear map take to the LLM width:

    (B, N, D_enc) -in_proj-> (B, N, dim) -L x [cross-attn + FFN] on (B, M, dim)-> (B, M, D_llm)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mm_llama.projectors.base import Projector

DEFAULT_NUM_LATENTS = 64
"""Flamingo's and AnyMAL's latent count."""
DEFAULT_DEPTH = 2
DEFAULT_HEADS = 8
DEFAULT_DIM = 512
DEFAULT_FF_MULT = 4
LATENT_INIT_STD = 0.02


@dataclass
class ResamplerOptions:
    """Options of the ``resampler`` projector."""

    num_latents: int = DEFAULT_NUM_LATENTS
    """M: the number of learned queries, hence of output tokens."""
    depth: int = DEFAULT_DEPTH
    """L: cross-attention + feed-forward layers."""
    heads: int = DEFAULT_HEADS
    """Attention heads; must divide ``dim``."""
    dim: int = DEFAULT_DIM
    """Width of the latents inside the resampler."""
    ff_mult: int = DEFAULT_FF_MULT
    """Hidden width of each feed-forward block, as a multiple of ``dim``."""


class PerceiverLayer(nn.Module):
    """One resampler layer: latents cross-attend to [features; latents], then a feed-forward block."""

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, T, dim) -> (B, H, T, dim/H)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (B, N, dim), latents (B, M, dim) -> latents (B, M, dim)."""
        media_n = self.norm_media(media)
        latents_n = self.norm_latents(latents)
        q = self._split(self.to_q(latents_n))  # (B, H, M, dh)
        k, v = self.to_kv(torch.cat([media_n, latents_n], dim=1)).chunk(2, dim=-1)  # (B, N+M, dim) each
        attended = F.scaled_dot_product_attention(q, self._split(k), self._split(v))  # (B, H, M, dh)
        latents = latents + self.to_out(attended.transpose(1, 2).flatten(2))
        return latents + self.ff(latents)


class ResamplerProjector(Projector):
    """(B, N, D_enc) -> (B, M, D_llm) with M = ``num_latents`` whatever N is."""

    Options = ResamplerOptions

    def __init__(self, in_dim: int, out_dim: int, options: ResamplerOptions) -> None:
        super().__init__(in_dim, out_dim, options)
        o = options
        for field in ("num_latents", "depth", "heads", "dim", "ff_mult"):
            if getattr(o, field) < 1:
                raise ValueError(
                    f"resampler projector: options.{field} must be >= 1, got {getattr(o, field)}"
                )
        if o.dim % o.heads:
            raise ValueError(
                f"resampler projector: options.dim={o.dim} must be divisible by options.heads={o.heads}"
            )
        self.in_proj = nn.Linear(in_dim, o.dim)
        self.latents = nn.Parameter(torch.randn(o.num_latents, o.dim) * LATENT_INIT_STD)
        self.layers = nn.ModuleList(PerceiverLayer(o.dim, o.heads, o.ff_mult) for _ in range(o.depth))
        self.norm = nn.LayerNorm(o.dim)
        self.out_proj = nn.Linear(o.dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        media = self.in_proj(x)  # (B, N, dim)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, M, dim)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.out_proj(self.norm(latents))  # (B, M, D_llm)

    @classmethod
    def count_tokens(cls, options: Any, n: int) -> int:
        return options.num_latents
