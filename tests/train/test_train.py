"""Stage 1 and stage 2 (QLoRA) on tiny models: the loss falls and only the intended parameters change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm_llama.train import StepInfo, build_stage_model, train
from mm_llama.train.report import HISTORY_FILE, LOSS_PLOT_FILE, TENSORBOARD_DIR
from tests.train.conftest import align_stage, instruct_stage, tiny_train_config


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def losses(stage_dir: Path) -> list[float]:
    return json.loads((stage_dir / HISTORY_FILE).read_text())["loss"]


def test_align_then_qlora_instruct_train_only_what_they_should(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    cfg = tiny_train_config(
        tmp_path / "run",
        {"align": align_stage(colour_world), "instruct": instruct_stage(colour_world, init_from="align")},
    )
    final: dict[str, dict[str, torch.Tensor]] = {}

    def keep_final(info: StepInfo) -> None:
        if info.step == info.total_steps:
            final[info.stage] = snapshot(info.model)

    # Stage 1: projector and the from-scratch encoder train; the LLM stays bit-identical.
    before = snapshot(build_stage_model(cfg, "align"))
    align_dir = train(cfg, ["align"], on_step=keep_final)
    changed = changed_keys(before, final["align"])
    projector_keys = {k for k in before if k.startswith("projectors.")}
    assert projector_keys <= changed
    assert any(k.startswith("encoders.image.") for k in changed)
    assert all(k.startswith(("projectors.", "encoders.")) for k in changed)
    stage1 = losses(align_dir)
    assert sum(stage1[-2:]) < sum(stage1[:2])
    assert (align_dir / "projectors.safetensors").is_file() and (align_dir / LOSS_PLOT_FILE).is_file()
    assert any((align_dir / TENSORBOARD_DIR).iterdir())

    # Stage 2 starts from stage 1's projector, in 4 bits with LoRA: projector and LoRA train, nothing else.
    before = snapshot(build_stage_model(cfg, "instruct"))
    assert all(torch.equal(before[k], final["align"][k]) for k in projector_keys)
    instruct_dir = train(cfg, ["instruct"], on_step=keep_final)
    assert any(v.dtype == torch.uint8 for k, v in final["instruct"].items() if k.startswith("llm.")), (
        "not 4-bit"
    )
    changed = changed_keys(before, final["instruct"])
    lora_keys = {k for k in before if "lora_" in k}
    assert lora_keys and lora_keys <= changed
    assert projector_keys <= changed
    assert changed <= lora_keys | projector_keys
    stage2 = losses(instruct_dir)
    assert sum(stage2[-2:]) < sum(stage2[:2])
    assert (instruct_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_full_and_lora_fine_tuning_with_gradient_checkpointing(
    tmp_path: Path, colour_world: dict[str, Path], mode: str
) -> None:
    stage = instruct_stage(colour_world, llm=mode, max_steps=2, gradient_checkpointing=True, lr=1e-3)
    cfg = tiny_train_config(tmp_path / "run", {"instruct": stage})
    final: dict[str, torch.Tensor] = {}
    checkpointing: list[bool] = []

    def keep_final(info: StepInfo) -> None:
        checkpointing.append(bool(info.model.llm.get_decoder().gradient_checkpointing))
        final.update(snapshot(info.model))

    before = snapshot(build_stage_model(cfg, "instruct"))
    out = train(cfg, on_step=keep_final)
    assert checkpointing == [True, True]
    changed = changed_keys(before, final)
    llm_changed = {k for k in changed if k.startswith("llm.")}
    if mode == "full":
        assert not any("lora_" in k for k in before)
        assert len(llm_changed) > len({k for k in before if k.startswith("llm.")}) // 2
        assert (out / "llm" / "config.json").is_file()  # the fine-tuned LLM is saved with the model
    else:
        assert llm_changed and all("lora_" in k for k in llm_changed)
        assert (out / "adapter" / "adapter_config.json").is_file()
    assert not any(k.startswith("encoders.") for k in changed)


def test_stages_may_autocast_differently(tmp_path: Path, colour_world: dict[str, Path]) -> None:
    stages = {
        "fp32": align_stage(colour_world, max_steps=1, mixed_precision="no"),
        "bf16": align_stage(colour_world, max_steps=1, mixed_precision="bf16", init_from="fp32"),
    }
    out = train(tiny_train_config(tmp_path / "run", stages))
    assert len(losses(out)) == 1 and losses(out)[0] > 0
