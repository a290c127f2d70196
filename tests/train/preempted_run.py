"""Run ``train()`` in its own process and wait to be killed at a step, for tests/train/test_reliability.py.

    python -m tests.train.preempted_run CONFIG STOP_AT MARKER

After optimizer step ``STOP_AT`` it writes ``MARKER`` and sleeps, so the test's kill lands mid-stage
(after that step's bookkeeping and any periodic checkpoint)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mm_llama.train import StepInfo, train
from mm_llama.train.config import load_train_config

WAIT_S = 300


def main() -> None:
    config, stop_at, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)  # as the tests' in-process runs: the same float sums, bit for bit

    def stop(info: StepInfo) -> None:
        if info.step == stop_at:
            marker.write_text(str(info.step))
            time.sleep(WAIT_S)

    train(load_train_config(config), on_step=stop)


if __name__ == "__main__":
    main()
