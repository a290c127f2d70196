"""Projectors and their registry: one line per built-in projector."""

from mm_llama.projectors.base import PROJECTORS, Projector, build_projector
from mm_llama.projectors.linear import LinearProjector
from mm_llama.projectors.mlp import MLPProjector
from mm_llama.projectors.pool import PoolProjector
from mm_llama.projectors.resampler import ResamplerProjector
from mm_llama.projectors.words import WordMixProjector

PROJECTORS.register("linear", LinearProjector)
PROJECTORS.register("mlp2x_gelu", MLPProjector)
PROJECTORS.register("resampler", ResamplerProjector)
PROJECTORS.register("pool", PoolProjector)
PROJECTORS.register("word_mix", WordMixProjector)

__all__ = ["PROJECTORS", "Projector", "build_projector"]
