"""Projectors and their registry: one line per built-in projector."""

from mm_llama.projectors.base import PROJECTORS, Projector, build_projector
from mm_llama.projectors.linear import LinearProjector
from mm_llama.projectors.mlp import MLPProjector

PROJECTORS.register("linear", LinearProjector)
PROJECTORS.register("mlp2x_gelu", MLPProjector)

__all__ = ["PROJECTORS", "Projector", "build_projector"]
