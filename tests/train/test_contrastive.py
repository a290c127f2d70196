"""The contrastive encoder-pretraining objective (ImageBind-style) and its stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama.train import StepInfo, build_stage_model, train
from mm_llama.train.config import validate_train_config
from mm_llama.train.contrastive import ContrastiveAligner, _same_rows
from tests.train.conftest import align_stage, tiny_train_config
from tests.train.test_train import changed_keys, losses, snapshot


def test_contrastive_stage_trains_encoder_and_projector_only(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    stage = align_stage(
        colour_world,
        objective="contrastive",
        train_encoders="all",
        batch_size=8,
        micro_batch_size=8,
        max_steps=8,
        lr=3e-3,
    )
    cfg = tiny_train_config(tmp_path / "run", {"pretrain": stage})
    before = snapshot(build_stage_model(cfg, "pretrain"))
    final: dict[str, torch.Tensor] = {}

    def keep_final(info: StepInfo) -> None:
        if info.step == info.total_steps:
            final.update(snapshot(info.model))

    out = train(cfg, on_step=keep_final)
    changed = changed_keys(before, final)
    assert any(k.startswith("encoders.image.") for k in changed)
    assert any(k.startswith("projectors.image.") for k in changed)
    assert not any(k.startswith("llm.") for k in changed)
    history = losses(out)
    assert history[-1] < history[0]
    assert (out / "encoders" / "image.safetensors").is_file()


def test_identical_captions_are_positives(colour_world: dict[str, Path]) -> None:
    cfg = tiny_train_config(Path("unused"), {"pretrain": align_stage(colour_world, objective="contrastive")})
    model = build_stage_model(cfg, "pretrain")
    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[..., 0] = 230
    blue = np.zeros((32, 32, 3), dtype=np.uint8)
    blue[..., 2] = 230
    examples = [
        model.processor(
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}], {"image": [img]}
        )
        for caption, img in (("a red picture", red), ("a red picture", red), ("a blue picture", blue))
    ]
    batch = model.processor.collate(examples)
    aligner = ContrastiveAligner(model, temperature=0.07)
    _, ids, _ = aligner.caption_embeddings(batch["labels"])
    assert _same_rows(ids).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    loss = aligner(input_ids=batch["input_ids"], labels=batch["labels"], media=batch["media"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.projectors["image"].linear_1.weight.grad is not None


def test_contrastive_needs_a_frozen_llm(colour_world: dict[str, Path]) -> None:
    stage = align_stage(colour_world, objective="contrastive", llm="lora")
    with pytest.raises(ValueError, match="contrastive objective uses the frozen LLM"):
        validate_train_config(tiny_train_config(Path("unused"), {"pretrain": stage}))
