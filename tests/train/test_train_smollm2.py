"""Both stages on the real SmolLM2-135M (QLoRA in stage 2), then the saved model loads and answers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm_llama.config import LLMConfig
from mm_llama.model import MultimodalLM
from mm_llama.train import train
from mm_llama.train.report import HISTORY_FILE
from tests.train.conftest import align_stage, instruct_stage, tiny_train_config

STEPS = 2


@pytest.mark.slow
def test_align_and_qlora_instruct_on_smollm2(tmp_path: Path, colour_world: dict[str, Path]) -> None:
    cfg = tiny_train_config(
        tmp_path / "run",
        {
            "align": align_stage(colour_world, max_steps=STEPS, lr=1e-3),
            "instruct": instruct_stage(
                colour_world, max_steps=STEPS, lr=1e-3, projector_lr=1e-4, init_from="align"
            ),
        },
    )
    cfg = replace(cfg, model=replace(cfg.model, llm=LLMConfig(name_or_path="smollm2-135m")))
    out = train(cfg)
    for stage in ("align", "instruct"):
        losses = json.loads((out.parent / stage / HISTORY_FILE).read_text())["loss"]
        assert len(losses) == STEPS and all(0 < loss < 20 for loss in losses)

    model = MultimodalLM.from_pretrained(out).eval()
    assert model.config.llm.quantization == "nf4" and hasattr(model.llm, "peft_config")
    image = colour_world["align"].parent / "images" / "0.png"
    with torch.no_grad():
        answer = model.generate("<image>\nWhat colour is it?", images=[image], max_new_tokens=3)
    assert isinstance(answer, str)
