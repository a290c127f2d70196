"""What trains in a stage, decided in one auditable place.

:func:`freeze_for_stage` first freezes everything, then sets ``requires_grad`` explicitly on what the
stage trains (projectors, encoders, the LLM or its LoRA adapters), puts frozen encoders in eval mode
(so normalisation statistics never drift) and logs one line per component with its trainable and total
parameter counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from mm_llama.model import MultimodalLM
from mm_llama.train.config import StageConfig

logger = logging.getLogger(__name__)

LORA_PARAM_MARKER = "lora_"
"""PEFT names every LoRA parameter ``...lora_A...`` / ``...lora_B...`` (also ``lora_embedding_*``)."""


@dataclass
class TrainableSummary:
    """Trainable / total parameter counts per component (``projectors.image``, ``encoders.image``, ``llm``)."""

    counts: dict[str, tuple[int, int]]

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts.values())

    def table(self) -> str:
        width = max(len(k) for k in self.counts)
        rows = [f"{k:<{width}}  {t:>13,} / {n:>13,} trainable" for k, (t, n) in self.counts.items()]
        return "\n".join(rows + [f"{'total':<{width}}  {self.trainable:>13,} / {self.total:>13,} trainable"])


def encoder_trains(model: MultimodalLM, modality: str, stage: StageConfig) -> bool:
    """Whether the stage trains this modality's encoder (see ``StageConfig.train_encoders``)."""
    if stage.train_encoders == "none":
        return False
    if stage.train_encoders == "all":
        return True
    configured = model.config.modalities[modality].encoder.freeze
    frozen = configured if configured is not None else model.encoders[modality].is_pretrained
    return not frozen


def _counts(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def set_train_modes(model: MultimodalLM) -> None:
    """Training mode everywhere except in encoders without trainable parameters (eval mode, so that
    batch-norm statistics and dropout in a frozen encoder behave as in inference and in the cache)."""
    model.train()
    for encoder in model.encoders.values():
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()


def freeze_for_stage(model: MultimodalLM, stage: StageConfig) -> TrainableSummary:
    """Set ``requires_grad`` on every parameter of ``model`` for ``stage`` and log what trains.

    - projectors: ``stage.train_projectors``;
    - encoders: ``encoder_trains`` (via each encoder's ``set_frozen``, which may keep a pretrained
      backbone frozen under new trainable parts); with ``train_encoders: none``, nothing of them trains;
    - LLM: nothing when ``frozen``; every parameter for ``full``; only the LoRA parameters for
      ``lora`` / ``qlora`` (the LLM must already carry adapters, see ``mm_llama.train.lora``).
    """
    model.requires_grad_(False)
    for projector in model.projectors.values():
        projector.requires_grad_(stage.train_projectors)
    for name, encoder in model.encoders.items():
        if stage.train_encoders != "none":  # `none` freezes new parts too (a video's temporal embedding)
            encoder.set_frozen(not encoder_trains(model, name, stage))
    if stage.llm == "full":
        model.llm.requires_grad_(True)
    elif stage.llm in ("lora", "qlora"):
        lora = [p for n, p in model.llm.named_parameters() if LORA_PARAM_MARKER in n]
        if not lora:
            raise ValueError(
                f"llm: {stage.llm} but the LLM has no LoRA parameters; call mm_llama.train.lora.add_lora first"
            )
        for p in lora:
            p.requires_grad_(True)
    set_train_modes(model)
    counts = {f"projectors.{m}": _counts(p) for m, p in model.projectors.items()}
    counts |= {f"encoders.{m}": _counts(e) for m, e in model.encoders.items()}
    counts["llm"] = _counts(model.llm)
    summary = TrainableSummary(counts)
    if summary.trainable == 0:
        raise ValueError("this stage trains nothing: every parameter is frozen; check train_projectors / llm")
    logger.info("trainable parameters (llm: %s):\n%s", stage.llm, summary.table())
    return summary
