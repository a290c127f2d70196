"""Two DDP processes on the CPU (gloo, through ``accelerate launch``) match one process on the same
global batch: same losses, same trained weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from mm_llama.config import save_config
from mm_llama.train import train
from mm_llama.train.checkpoint import STATE_FILE, TRAINABLE_FILE, list_checkpoints
from tests.train.conftest import align_stage, tiny_train_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
LAUNCH_TIMEOUT_S = 300
TOLERANCE = 1e-5
"""All-reduce sums gradients in another order than accumulation does: equal up to float rounding."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def final_state(stage_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    last = list_checkpoints(stage_dir)[-1]
    return load_file(str(last / TRAINABLE_FILE)), json.loads((last / STATE_FILE).read_text())["history"][
        "loss"
    ]


def test_two_ddp_processes_match_one_process(tmp_path: Path, colour_world: dict[str, Path]) -> None:
    # Global batch 4: one process runs 2 accumulation steps of 2, two processes run 1 step of 2 each.
    cfg = tiny_train_config(tmp_path / "single", {"align": align_stage(colour_world, max_steps=STEPS)})
    single, single_losses = final_state(train(cfg))

    config_file = tmp_path / "ddp.yaml"
    save_config(replace(cfg, output_dir=str(tmp_path / "ddp")), config_file)
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "mm_llama.train", "--config", str(config_file),
    ]  # fmt: skip
    # `--cpu` makes accelerate launch one process unless MPI is set up; torchrun's processes (what
    # --multi_gpu launches) with ACCELERATE_USE_CPU=true run DDP on the CPU over gloo.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es) x 1 accumulation x micro-batch 2 = global batch 4" in done.stderr

    ddp, ddp_losses = final_state(tmp_path / "ddp" / "align")
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), atol=TOLERANCE, rtol=0)
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=TOLERANCE, rtol=0, msg=key)
