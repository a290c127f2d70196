"""A run stopped mid-way and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.train import StepInfo, train
from mm_llama.train.checkpoint import STATE_FILE, TRAINABLE_FILE, list_checkpoints
from mm_llama.train.config import LoraSettings, TrainConfig
from tests.train.conftest import instruct_stage, tiny_train_config

STEPS = 6
SAVE_EVERY = 2
CRASH_AT = 3


class SimulatedCrash(Exception):
    """Raised from the step callback, as a bug or a Ctrl-C mid-run would interrupt training."""


def crash_at(step: int):
    def callback(info: StepInfo) -> None:
        if info.step == step:
            raise SimulatedCrash(f"stopped at step {step}")

    return callback


def resume(cfg: TrainConfig) -> tuple[Path, list[int]]:
    """Rerun ``cfg`` (it resumes); return its folder and the steps it actually ran."""
    steps: list[int] = []
    out = train(cfg, on_step=lambda info: steps.append(info.step))
    return out, steps


def final_state(run: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    last = list_checkpoints(run / "instruct")[-1]
    assert last.name == f"step-{STEPS:06d}"
    history = json.loads((last / STATE_FILE).read_text())["history"]
    return load_file(str(last / TRAINABLE_FILE)), history["loss"]


@pytest.fixture
def config(tmp_path: Path, colour_world: dict[str, Path]) -> TrainConfig:
    # QLoRA with LoRA dropout and a trainable encoder: resuming must restore weights, AdamW moments,
    # the schedule, the data position and the dropout RNG to match bit for bit.
    stage = instruct_stage(
        colour_world,
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),
        train_encoders="auto",
        max_steps=STEPS,
        save_every=SAVE_EVERY,
        warmup_ratio=0.2,
        keep_checkpoints=3,
    )
    return tiny_train_config(tmp_path / "reference", {"instruct": stage})


def test_crash_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path: Path, config: TrainConfig) -> None:
    reference, reference_losses = final_state(train(config).parent)

    crashed = replace(config, output_dir=str(tmp_path / "crashed"))
    with pytest.raises(SimulatedCrash):
        train(crashed, on_step=crash_at(CRASH_AT))
    names = [p.name for p in list_checkpoints(tmp_path / "crashed" / "instruct")]
    assert names == [f"step-{SAVE_EVERY:06d}", f"step-{CRASH_AT:06d}"]  # periodic + written by the crash
    assert not (tmp_path / "crashed" / "instruct" / "projectors.safetensors").exists()

    out, steps = resume(crashed)
    assert steps == list(range(CRASH_AT + 1, STEPS + 1))
    resumed, resumed_losses = final_state(out.parent)
    assert resumed_losses == reference_losses
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_resume_from_an_earlier_periodic_checkpoint(tmp_path: Path, config: TrainConfig) -> None:
    reference, reference_losses = final_state(train(config).parent)

    crashed = replace(config, output_dir=str(tmp_path / "crashed"))
    with pytest.raises(SimulatedCrash):
        train(crashed, on_step=crash_at(CRASH_AT))
    shutil.rmtree(tmp_path / "crashed" / "instruct" / "checkpoints" / f"step-{CRASH_AT:06d}")

    out, steps = resume(crashed)
    assert steps == list(range(SAVE_EVERY + 1, STEPS + 1))
    resumed, resumed_losses = final_state(out.parent)
    assert resumed_losses == reference_losses
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_resume_refuses_a_changed_config(tmp_path: Path, config: TrainConfig) -> None:
    crashed = replace(config, output_dir=str(tmp_path / "crashed"))
    with pytest.raises(SimulatedCrash):
        train(crashed, on_step=crash_at(CRASH_AT))
    changed = replace(crashed, stages={"instruct": replace(crashed.stages["instruct"], lr=1e-4)})
    with pytest.raises(ValueError, match="lr changed"):
        train(changed)
