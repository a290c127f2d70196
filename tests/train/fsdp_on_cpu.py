"""Run ``train()`` under accelerate's FSDP2 on the CPU (gloo), for tests/train/test_fsdp.py.

``accelerate launch --config_file training/accelerate/fsdp.yaml`` passes the shipped FSDP settings to
every process; accelerate then enables FSDP only on accelerators (on the CPU it falls back to DDP),
while torch's FSDP2 itself shards over gloo on the CPU. This module, launched in place of
``mm_llama.train``, puts the FSDP state back onto accelerate's CPU setup, so that the loop, its
sharded checkpoints and the final save run here as they do on GPUs.

    ACCELERATE_USE_CPU=true accelerate launch --config_file training/accelerate/fsdp.yaml \\
        --num_processes 2 -m tests.train.fsdp_on_cpu CONFIG [--crash-at STEP]
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import mm_llama.train.accel as accel
from mm_llama.train import StepInfo, train
from mm_llama.train.config import load_train_config


class CrashAt(Exception):
    """Raised on every process from the step callback at the step asked for."""


class FSDPOnCPU(accelerate.Accelerator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
        super().__init__(*args, fsdp_plugin=plugin, **kwargs)
        # Both states: accelerate rebuilds AcceleratorState from PartialState's shared dict.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--crash-at", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    def on_step(info: StepInfo) -> None:
        if info.step == args.crash_at:
            raise CrashAt(f"stopped at step {info.step}")

    accel.Accelerator = FSDPOnCPU  # type: ignore[misc]
    try:
        train(load_train_config(args.config), on_step=on_step)
    except CrashAt:
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
