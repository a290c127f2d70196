"""Starting or resuming a stage, and writing its resumable checkpoints."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from mm_llama.config import to_dict
from mm_llama.model import MultimodalLM
from mm_llama.train.checkpoint import (
    CHECKPOINTS_DIR,
    RNGState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    save_checkpoint,
    step_dir_name,
)
from mm_llama.train.config import RUNTIME_FIELDS, StageConfig, TrainConfig
from mm_llama.train.stage import stage_dir

logger = logging.getLogger(__name__)


def new_history() -> dict[str, Any]:
    """The bookkeeping of a stage that has not taken a step."""
    return {"step": 0, "loss": [], "lr": [], "tokens": 0, "seconds": 0.0}


def resume_or_start(
    cfg: TrainConfig,
    name: str,
    accelerator: Accelerator,
    model: MultimodalLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Restore the newest checkpoint (weights, optimizer, scheduler, RNG) and return its history, or seed
    a fresh start (deleting old checkpoints when ``resume`` is off). ``record``: the stage's settings,
    which must equal the checkpoint's but for :data:`~mm_llama.train.config.RUNTIME_FIELDS`."""
    out, rank = stage_dir(cfg, name), accelerator.process_index
    checkpoints = list_checkpoints(out)
    history = new_history()
    if checkpoints and cfg.resume:
        latest = checkpoints[-1]
        saved = read_trainer_state(latest)
        defaults = to_dict(StageConfig(data=[]))  # a setting newer than the checkpoint: its default
        changed = [
            k
            for k in record
            if k not in RUNTIME_FIELDS and saved["stage"].get(k, defaults.get(k)) != record[k]
        ]
        if changed:
            raise ValueError(
                f"{latest} was written with different settings ({', '.join(changed)} changed); resuming "
                "would not continue the same run: use another output_dir, or set resume: false to start over"
            )
        state, rng = load_checkpoint(latest, model, optimizer, scheduler, rank)
        history = state["history"]
        if rng is None:  # written by a crash handler on the main process only
            set_seed(cfg.seed + rank + history["step"])
        else:
            rng.restore()
        logger.info("%s: resuming from %s (step %d)", name, latest, history["step"])
    else:
        if checkpoints and accelerator.is_main_process:
            logger.warning(
                "%s: resume is off: deleting the old checkpoints in %s", name, out / CHECKPOINTS_DIR
            )
            shutil.rmtree(out / CHECKPOINTS_DIR)
        set_seed(cfg.seed + rank)  # dropout differs across processes, as different samples do
    accelerator.wait_for_everyone()
    return history


@dataclass
class CheckpointWriter:
    """Writes a stage's resumable checkpoints into ``<stage dir>/checkpoints/`` and prunes old ones."""

    out: Path
    """The stage's folder."""
    accelerator: Accelerator
    model: MultimodalLM
    """The unwrapped model."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    record: dict[str, Any]
    """The stage's settings (compared on resume)."""
    steps_per_epoch: int
    keep: int
    """How many of the newest checkpoints to keep."""

    def save(self, history: dict[str, Any], rng: RNGState, crash: bool = False) -> None:
        """Checkpoint at ``history["step"]`` with ``rng`` (the RNG at that step boundary). ``crash``: only
        this process is left to write (no barrier)."""
        accelerator = self.accelerator
        main = accelerator.is_main_process
        save_checkpoint(
            self.out / CHECKPOINTS_DIR / step_dir_name(history["step"]),
            self.model,
            self.optimizer,
            self.scheduler,
            {"history": history, "stage": self.record, "steps_per_epoch": self.steps_per_epoch},
            rng,
            rank=accelerator.process_index,
            is_main=main,
            barrier=(lambda: None) if crash else accelerator.wait_for_everyone,
        )
        if main:
            prune_checkpoints(self.out, self.keep)
