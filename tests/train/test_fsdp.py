"""FSDP (accelerate's FSDP2 with training/accelerate/fsdp.yaml, 2 processes over gloo on the CPU): a run that is stopped and resumed from
its sharded checkpoints ends with the losses, checkpoint and saved model of one uninterrupted process;
DeepSpeed and FSDP version 1 are refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from mm_llama.config import save_config
from mm_llama.model_io import ADAPTER_DIR, LLM_DIR, PROJECTORS_FILE
from mm_llama.train import train
from mm_llama.train.accel import check_distributed
from mm_llama.train.checkpoint import STATE_FILE, TRAINABLE_FILE, list_checkpoints
from mm_llama.train.config import LoraSettings
from tests.train.conftest import align_stage, instruct_stage, tiny_train_config
from tests.train.test_ddp import LAUNCH_TIMEOUT_S, REPO, free_port

FSDP_CONFIG = REPO / "training" / "accelerate" / "fsdp.yaml"
STEPS = 4
CRASH_AT = 3
TOLERANCE = 1e-5
"""Reduce-scatter sums gradients in another order than one process does: equal up to float rounding."""


def launch(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "tests.train.fsdp_on_cpu", str(config), *extra,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )


def saved(stage_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The last checkpoint's trainable tensors and losses, and the saved model's projector and adapter."""
    last = list_checkpoints(stage_dir)[-1]
    assert last.name == f"step-{STEPS:06d}"
    tensors = {f"ckpt/{k}": v for k, v in load_file(str(last / TRAINABLE_FILE)).items()}
    tensors |= {f"model/{k}": v for k, v in load_file(str(stage_dir / PROJECTORS_FILE)).items()}
    for folder in (ADAPTER_DIR, LLM_DIR):
        for file in sorted((stage_dir / folder).glob("*.safetensors")):
            tensors |= {f"{folder}/{k}": v for k, v in load_file(str(file)).items()}
    return tensors, json.loads((last / STATE_FILE).read_text())["history"]["loss"]


def test_fsdp_run_resumed_from_sharded_checkpoints_matches_one_process(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    # Stage 1 trains the projector; then LoRA on all linear layers of the sharded LLM, in 4 bits and
    # not (the saved model holds the adapter); then the whole LLM (the saved model holds a copy). Every
    # process runs 1 micro-batch of 2 per step, the single process 2 accumulation steps of 2.
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    stages = {
        "align": align_stage(colour_world, max_steps=STEPS, save_every=2),
        "qlora": instruct_stage(colour_world, llm="qlora", lora=lora, max_steps=STEPS, save_every=2),
        "lora": instruct_stage(colour_world, llm="lora", lora=lora, max_steps=STEPS, save_every=2),
        "full": instruct_stage(colour_world, llm="full", lr=1e-3, max_steps=STEPS, save_every=2),
    }
    cfg = tiny_train_config(tmp_path / "single", stages, freeze_encoder=True)
    train(cfg)
    config_file = tmp_path / "fsdp.yaml"
    save_config(replace(cfg, output_dir=str(tmp_path / "fsdp")), config_file)

    stopped = launch(config_file, "--crash-at", str(CRASH_AT))
    assert stopped.returncode != 0, "the first launch was meant to stop at step 3 of stage 1"
    assert "interrupted (sharded model)" in stopped.stderr, stopped.stderr[-4000:]
    assert [p.name for p in list_checkpoints(tmp_path / "fsdp" / "align")] == ["step-000002"]
    resumed = launch(config_file)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "2 process(es) x 1 accumulation x micro-batch 2 = global batch 4" in resumed.stderr
    assert resumed.stderr.count("distributed FSDP (parameters sharded)") == len(stages)

    for stage in stages:
        single, single_losses = saved(tmp_path / "single" / stage)
        fsdp, fsdp_losses = saved(tmp_path / "fsdp" / stage)
        torch.testing.assert_close(
            torch.tensor(fsdp_losses), torch.tensor(single_losses), atol=TOLERANCE, rtol=0
        )
        assert fsdp.keys() == single.keys()
        assert any(k.startswith(f"{ADAPTER_DIR}/") for k in single) == (stage in ("qlora", "lora"))
        assert any(k.startswith(f"{LLM_DIR}/") for k in single) == (stage == "full")
        for key in single:
            torch.testing.assert_close(fsdp[key], single[key], atol=TOLERANCE, rtol=0, msg=f"{stage}: {key}")


@pytest.mark.parametrize(
    ("kind", "fsdp2", "message"),
    [
        (DistributedType.DEEPSPEED, False, "DEEPSPEED is not supported"),
        (DistributedType.FSDP, False, "fsdp_version 1"),
    ],
)
def test_launches_the_checkpoints_cannot_follow_are_refused(
    kind: DistributedType, fsdp2: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_distributed(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2))  # type: ignore[arg-type]
    check_distributed(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))  # type: ignore[arg-type]
