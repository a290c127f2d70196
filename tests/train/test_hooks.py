"""The trainer reaches projectors only through their contract's hooks (``prepare``, loss terms), and the
contrastive objective is a registry of named loss pieces: a user's projector and a user's piece take
part in training without the trainer knowing them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import mm_llama.train.stage as stage_module
from mm_llama.config import ProjectorConfig
from mm_llama.data.dataset import ConversationDataset
from mm_llama.llm import load_tokenizer
from mm_llama.projectors import PROJECTORS
from mm_llama.projectors.base import AuxBatch, Projector, ProjectorContext
from mm_llama.train import build_stage_model, train
from mm_llama.train.config import TrainConfig, validate_train_config
from mm_llama.train.contrastive import ContrastiveAligner
from mm_llama.train.losses import CONTRASTIVE_TERMS, ContrastiveInputs, LossPiece
from mm_llama.train.objectives import LMObjective, build_objective
from mm_llama.train.report import HISTORY_FILE
from tests.conftest import tiny_llm_config
from tests.train.conftest import COLORS, NUM_RECORDS, align_stage, tiny_train_config

WEIGHT = 0.5


class EnergyProjector(Projector):
    """A user's projector: linear, records what its ``prepare`` hook is given, and adds a ``token_energy``
    term (the mean squared value of its tokens) whose values it records."""

    LOSS_TERMS = ("token_energy",)
    prepared: ClassVar[list[dict[str, Any]]] = []
    computed: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, in_dim: int, out_dim: int, options: Any) -> None:
        super().__init__(in_dim, out_dim, options)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def prepare(self, context: ProjectorContext) -> None:
        EnergyProjector.prepared.append(
            {
                "modality": context.modality,
                "stage": context.stage,
                "replies": list(context.replies()),
                "table": tuple(context.input_embeddings.weight.shape),
                "tokenizer": context.tokenizer,
            }
        )

    def project_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self(x)
        return tokens, tokens.float().pow(2).mean(-1)  # (B, M): each token's energy

    def loss_terms(self, batch: AuxBatch) -> dict[str, torch.Tensor]:
        value = torch.stack([a.mean() for a in batch.aux]).mean()
        EnergyProjector.computed.append(
            {"value": value.item(), "samples": len(batch.aux), "captions": batch.caption_ids.tolist()}
        )
        return {"token_energy": value}


if "test_energy" not in PROJECTORS:
    PROJECTORS.register("test_energy", EnergyProjector)


@pytest.fixture
def energy() -> Any:
    EnergyProjector.prepared.clear()
    EnergyProjector.computed.clear()
    yield EnergyProjector
    EnergyProjector.prepared.clear()
    EnergyProjector.computed.clear()


def energy_config(out: Path, world: dict[str, Path], weight: float) -> TrainConfig:
    """A contrastive stage and an lm stage (both from fresh seeded weights, one optimizer step of the
    whole colour world each), with ``token_energy`` at ``weight``."""
    common: dict[str, Any] = {
        "batch_size": NUM_RECORDS,
        "micro_batch_size": NUM_RECORDS,
        "max_steps": 1,
        "group_by_length": False,
        "loss_terms": {"token_energy": weight},
    }
    stages = {
        "pre": align_stage(world, objective="contrastive", train_encoders="all", **common),
        "chat": replace(align_stage(world, template="chat", **common), data=[str(world["instruct"])]),
    }
    cfg = tiny_train_config(out, stages)
    cfg.model.modalities["image"].projector = ProjectorConfig(type="test_energy")
    return cfg


def first_losses(out: Path) -> dict[str, float]:
    return {name: json.loads((out / name / HISTORY_FILE).read_text())["loss"][0] for name in ("pre", "chat")}


def test_a_users_projector_is_prepared_and_adds_its_term_in_both_objectives(
    tmp_path: Path, colour_world: dict[str, Path], energy: type[EnergyProjector]
) -> None:
    train(energy_config(tmp_path / "with", colour_world, WEIGHT))
    colours = [list(COLORS)[i % len(COLORS)] for i in range(NUM_RECORDS)]
    assert [(p["modality"], p["stage"], p["replies"]) for p in energy.prepared] == [
        ("image", "pre", [[f"a {c} picture"] for c in colours]),
        ("image", "chat", [[c] for c in colours]),
    ]
    hidden = tiny_llm_config().from_config["hidden_size"]
    assert all(
        p["table"][1] == hidden and hasattr(p["tokenizer"], "all_special_ids") for p in energy.prepared
    )
    # the term's inputs: one aux per sample, and each sample's reply tokens
    assert [(c["samples"], len(c["captions"])) for c in energy.computed] == [(NUM_RECORDS, NUM_RECORDS)] * 2
    tokenizer = load_tokenizer(tiny_llm_config())
    for computed, template in zip(energy.computed, ("a {} picture", "{}")):
        replies = [
            tokenizer.decode([i for i in row if i >= 0], skip_special_tokens=True)
            for row in computed["captions"]
        ]
        assert sorted(r.strip() for r in replies) == sorted(template.format(c) for c in colours)
    terms = {"pre": energy.computed[0]["value"], "chat": energy.computed[1]["value"]}
    with_term = first_losses(tmp_path / "with")

    energy.computed.clear()
    train(energy_config(tmp_path / "without", colour_world, 0.0))
    assert energy.computed == []  # weight 0: the term is not computed
    assert len(energy.prepared) == 4  # prepared in every stage, weighted or not
    without = first_losses(tmp_path / "without")
    for name in ("pre", "chat"):  # the same weights and batch: the loss differs by weight x term
        assert terms[name] > 0
        assert with_term[name] == pytest.approx(without[name] + WEIGHT * terms[name], rel=1e-5)


def test_a_registered_loss_piece_is_weighted_by_name(colour_world: dict[str, Path]) -> None:
    def spread(inputs: ContrastiveInputs) -> torch.Tensor:
        """The mean variance of each sample's tokens."""
        return torch.stack([t.var(0).mean() for t in inputs.tokens]).mean()

    CONTRASTIVE_TERMS.register("test_spread", LossPiece(spread))
    try:
        stage = align_stage(colour_world, objective="contrastive", loss_terms={"test_spread": 2.0})
        cfg = tiny_train_config(Path("unused"), {"pre": stage})
        validate_train_config(cfg)
        model = build_stage_model(cfg, "pre")
        aligner = build_objective(model, stage, "stages.pre.loss_terms")
        assert isinstance(aligner, ContrastiveAligner) and aligner.weights["test_spread"] == 2.0
        dataset = ConversationDataset(stage.data, model.processor)
        batch = model.processor.collate([dataset[i] for i in range(4)])
        inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "media": batch["media"]}
        with torch.no_grad():
            tokens = aligner.media_tokens(batch["input_ids"], batch["media"], {})
            piece = torch.stack([t.var(0).mean() for t in tokens]).mean()
            default = ContrastiveAligner(model)(**inputs)  # a user's piece is off unless weighted
            torch.testing.assert_close(aligner(**inputs), default + 2.0 * piece)
        with pytest.raises(ValueError, match="contrastive loss term 'test_spread' is already registered"):
            CONTRASTIVE_TERMS.register("test_spread", LossPiece(spread))
    finally:
        CONTRASTIVE_TERMS._entries.pop("test_spread")
    with pytest.raises(ValueError, match=r"unknown loss term 'test_spread' for objective contrastive"):
        validate_train_config(cfg)


def test_hooks_cost_nothing_when_unused(
    monkeypatch: pytest.MonkeyPatch, colour_world: dict[str, Path], energy: type[EnergyProjector]
) -> None:
    def no_reading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the stage's data was read for a prepare hook that does not ask for it")

    monkeypatch.setattr(stage_module, "ConversationDataset", no_reading)
    cfg = tiny_train_config(Path("unused"), {"align": align_stage(colour_world)})
    model = build_stage_model(cfg, "align")  # mlp2x_gelu: the default prepare
    assert build_objective(model, cfg.stages["align"], "x") is model  # lm, no weighted term: the model
    cfg.model.modalities["image"].projector = ProjectorConfig(type="test_energy")
    cfg.stages["align"].loss_terms = {"token_energy": 1.0}
    with pytest.raises(AssertionError, match="data was read"):
        build_stage_model(cfg, "align")  # this prepare reads the replies
    monkeypatch.undo()
    model = build_stage_model(cfg, "align")
    assert isinstance(build_objective(model, cfg.stages["align"], "x"), LMObjective)
