"""The projector contract: the learned bridge from encoder features to LLM input embeddings.

    forward(x: (B, N, D_enc)) -> (B, M, D_llm)
    count_tokens(options, n) -> M   how many placeholder slots one item with N encoder tokens needs
                                    (a classmethod of the options alone: the standalone processor
                                    counts without building the projector); ``num_tokens(n)`` calls it

Concrete projectors take ``(in_dim, out_dim, options)`` and declare an ``Options`` dataclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mm_llama.config import ProjectorConfig, build_options
from mm_llama.registry import Registry

PROJECTORS: Registry[type[Projector]] = Registry("projector")


@dataclass
class NoOptions:
    """A projector without options."""


class Projector(nn.Module, ABC):
    """Base class of every projector."""

    Options: ClassVar[type] = NoOptions

    def __init__(self, in_dim: int, out_dim: int, options: Any) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.options = in_dim, out_dim, options

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D_enc) -> (B, M, D_llm)."""

    @classmethod
    def count_tokens(cls, options: Any, n: int) -> int:
        """M for an input of N tokens under ``options``; token-wise projectors keep N."""
        return n

    def num_tokens(self, n: int) -> int:
        """M for an input of N tokens."""
        return self.count_tokens(self.options, n)


def build_projector(modality: str, cfg: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    """Instantiate the projector named by ``cfg.type`` mapping ``in_dim`` -> ``out_dim``."""
    cls = PROJECTORS.get(cfg.type)
    options = build_options(cls.Options, cfg.options, f"modalities.{modality}.projector.options")
    return cls(in_dim, out_dim, options)
