"""What a stage optimises: the module the loop calls with each micro-batch (:func:`build_objective`).

``lm``: the model itself (next-token loss on the replies), or, when a projector term is weighted, an
:class:`LMObjective` that adds those terms. ``contrastive``: a
:class:`~mm_llama.train.contrastive.ContrastiveAligner`. Term weights: :mod:`mm_llama.train.losses`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mm_llama.model import MultimodalLM, MultimodalOutput
from mm_llama.train.config import StageConfig
from mm_llama.train.contrastive import ContrastiveAligner
from mm_llama.train.losses import loss_weights, projector_terms, reply_ids, sample_rows, weighted_terms


def projector_term_names(model: MultimodalLM) -> list[str]:
    """The loss terms the model's projectors can contribute, in modality order."""
    return [t for projector in model.projectors.values() for t in projector.LOSS_TERMS]


def build_objective(model: MultimodalLM, stage: StageConfig, where: str) -> nn.Module:
    """The module whose ``forward(**micro_batch)`` gives the stage's loss: a ``MultimodalOutput``-like
    output for ``lm``, a scalar for ``contrastive`` (the loop scales them by tokens and samples)."""
    if stage.objective == "contrastive":
        return ContrastiveAligner(
            model, stage.contrastive.temperature, stage.contrastive.weighting, stage.loss_terms
        )
    weights = loss_weights(stage.objective, stage.loss_terms, projector_term_names(model), where)
    if not weighted_terms(model.projectors, weights):
        return model
    return LMObjective(model, weights)


class LMObjective(nn.Module):
    """The next-token loss plus the weighted projector terms: ``forward`` returns the model's output with
    ``loss`` = next-token loss + sum of weight x term (each term a mean over the micro-batch's samples)."""

    def __init__(self, model: MultimodalLM, weights: dict[str, float]) -> None:
        super().__init__()
        self.model = model
        self.weights = weights
        self.aux_terms = weighted_terms(model.projectors, weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        media: dict[str, list[torch.Tensor]] | None = None,
        features: dict[str, list[torch.Tensor]] | None = None,
        **_: Any,
    ) -> MultimodalOutput:
        model = self.model
        with model.recording_aux(self.aux_terms) as record:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                media=media,
                features=features,
            )
        if labels is None or out.loss is None:
            return out
        aux: dict[str, dict[int, list[torch.Tensor]]] = {}
        for name, pairs in record.items():
            rows = sample_rows(
                input_ids,
                model.processor.placeholder_ids[name],
                [t.shape[0] for t, _ in pairs],
                f"the {name} inputs do not match the <{name}> placeholders",
            )
            aux[name] = {}
            for row, (_, item_aux) in zip(rows, pairs):
                if item_aux is not None:
                    aux[name].setdefault(row, []).append(item_aux)
        loss = out.loss
        for term in projector_terms(model.projectors, aux, reply_ids(labels).to(model.device), self.weights):
            loss = loss + term
        return replace(out, loss=loss)
