"""Training: the LLaVA two-stage recipe (projector alignment, then instruction tuning with full, LoRA or
QLoRA fine-tuning) on accelerate, with resumable checkpoints. Entry point: :func:`train`."""

from mm_llama.train.config import (
    ContrastiveOptions,
    LoraSettings,
    StageConfig,
    TrainConfig,
    load_train_config,
)
from mm_llama.train.freeze import freeze_for_stage
from mm_llama.train.loop import StepInfo, train, train_stage
from mm_llama.train.stage import build_stage_model

__all__ = [
    "ContrastiveOptions",
    "LoraSettings",
    "StageConfig",
    "StepInfo",
    "TrainConfig",
    "build_stage_model",
    "freeze_for_stage",
    "load_train_config",
    "train",
    "train_stage",
]
