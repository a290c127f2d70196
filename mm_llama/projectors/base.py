"""The projector contract: the learned bridge from encoder features to LLM input embeddings.

    forward(x: (B, N, D_enc)) -> (B, M, D_llm)
    count_tokens(options, n) -> M   how many placeholder slots one item with N encoder tokens needs
                                    (a classmethod of the options alone: the standalone processor
                                    counts without building the projector); ``num_tokens(n)`` calls it

Concrete projectors take ``(in_dim, out_dim, options)`` and declare an ``Options`` dataclass.

Optional hooks, for projectors that need more than gradient steps; the defaults do nothing, and the
trainer calls them on every projector without knowing its class:

    prepare(context)           before a stage's first step: set-up from the stage's training data and the
                               LLM (``ProjectorContext``: the modality, the tokenizer, the LLM's input
                               embedding table, the replies of the records that hold the modality)
    LOSS_TERMS                 the names of the extra loss terms the projector can add to an objective
    project_with_aux(x)        (tokens, aux): the tokens of ``forward`` and per-item auxiliary outputs
    loss_terms(batch)          name -> scalar tensor, from the aux of a micro-batch (``AuxBatch``) and
                               the samples' reply tokens

A term counts in a stage that gives it a weight (``loss_terms: {name: weight}`` in the stage's config;
unweighted, it is not computed and ``forward`` runs instead of ``project_with_aux``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mm_llama.config import ProjectorConfig, build_options
from mm_llama.registry import Registry

PROJECTORS: Registry[type[Projector]] = Registry("projector")


@dataclass
class NoOptions:
    """A projector without options."""


@dataclass
class ProjectorContext:
    """What :meth:`Projector.prepare` gets from the stage about to train the projector."""

    modality: str
    """The modality this projector serves."""
    stage: str
    """The stage's name."""
    tokenizer: Any
    """The LLM's tokenizer (a ``transformers`` tokenizer)."""
    input_embeddings: nn.Embedding
    """The LLM's input embedding table (frozen in stages where the LLM is)."""
    read_replies: Callable[[], Iterable[list[str]]] = field(repr=False)
    """Reads the replies for :meth:`replies` (the trainer supplies it)."""
    log: Callable[[str], None] = field(repr=False, default=lambda message: None)
    """Logs a message under the stage's name (``stages.<stage>: <message>``)."""

    def replies(self) -> Iterator[list[str]]:
        """The assistant replies of each training record of the stage that holds this modality, one list
        per record in data order (a caption record gives ``[caption]``). The data files are read when
        this is iterated, not before, so a ``prepare`` that does not ask costs nothing."""
        yield from self.read_replies()


@dataclass
class AuxBatch:
    """What :meth:`Projector.loss_terms` gets for one micro-batch."""

    aux: list[torch.Tensor]
    """One tensor per sample whose items gave an aux: their ``aux`` rows concatenated along dim 0."""
    caption_ids: torch.Tensor
    """(S, L) the same samples' reply token ids (the supervised label tokens), -1 padded."""


class Projector(nn.Module, ABC):
    """Base class of every projector."""

    Options: ClassVar[type] = NoOptions
    LOSS_TERMS: ClassVar[tuple[str, ...]] = ()
    """Names of the loss terms :meth:`loss_terms` returns (checked against the stages' ``loss_terms``)."""

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

    # ---- optional hooks --------------------------------------------------------------------------------
    def prepare(self, context: ProjectorContext) -> None:
        """Called on every projector of the model when a stage builds it, before its first step (after
        ``init_from`` weights load, before LoRA adapters are added; on a resume the checkpoint's weights
        are loaded after it). Does nothing by default."""

    def project_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, D_enc) -> (the tokens of :meth:`forward` (B, M, D_llm), an aux tensor with the batch
        first, or ``None``). Only called when one of :attr:`LOSS_TERMS` is weighted in the stage; item
        ``i`` of the batch owns ``aux[i]``. Default: ``(self(x), None)``."""
        return self(x), None

    def loss_terms(self, batch: AuxBatch) -> dict[str, torch.Tensor]:
        """Scalar loss terms by name (names of :attr:`LOSS_TERMS`), each a mean over the micro-batch's
        samples; the objective adds ``weight * term`` for the weighted ones. Default: none."""
        return {}


def build_projector(modality: str, cfg: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    """Instantiate the projector named by ``cfg.type`` mapping ``in_dim`` -> ``out_dim``."""
    cls = PROJECTORS.get(cfg.type)
    options = build_options(cls.Options, cfg.options, f"modalities.{modality}.projector.options")
    return cls(in_dim, out_dim, options)
