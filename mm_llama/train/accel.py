"""The accelerator of a stage: mixed precision, DDP settings, and the launches the loop refuses."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from mm_llama.train.config import StageConfig


def resolve_mixed_precision(setting: str, autocast_to: str | None = None) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on other GPUs, ``no`` (fp32) on the CPU.
    ``autocast_to`` (``bfloat16`` / ``float16``): the half dtype the config asked for, of weights that
    train in float32 (a full fine-tune's master copy): ``auto`` then autocasts to it on GPUs (fp16 where
    bf16 is unsupported) and to bf16 on the CPU (its fp16 autocast has no gradient scaler)."""
    if setting != "auto":
        return setting
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if autocast_to is not None:
        if not torch.cuda.is_available():
            return "bf16"
        return "bf16" if autocast_to == "bfloat16" and bf16_ok else "fp16"
    if torch.cuda.is_available():
        return "bf16" if bf16_ok else "fp16"
    return "no"


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse the launches whose checkpoints this loop cannot write: DeepSpeed (its engine owns the
    optimizer and partitions parameters its own way) and FSDP version 1 (flat parameters)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "accelerate config: distributed_type DEEPSPEED is not supported by mm_llama's training loop; "
            "to shard a model over GPUs use distributed_type FSDP with fsdp_version 2 (or DDP: MULTI_GPU)"
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "accelerate config: fsdp_version 1 is not supported by mm_llama's training loop (its flat "
            "parameters); set fsdp_version: 2"
        )


def stage_accelerator(stage: StageConfig, autocast_to: str | None = None) -> Accelerator:
    """A fresh accelerator for one stage (its own mixed precision; ``autocast_to``: see
    :func:`resolve_mixed_precision`), checked by :func:`check_distributed`."""
    # Some trainable parameters may get no gradient in a step (a modality absent from a batch, the layers
    # after an encoder's select_layer): DDP must look for them. Checkpointing here is non-reentrant,
    # which is compatible with that search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # Each stage may autocast differently: forget the previous stage's accelerator settings (accelerate
    # refuses a second mixed_precision per process otherwise); the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(stage.mixed_precision, autocast_to),
        kwargs_handlers=[ddp],
    )
    check_distributed(accelerator)
    return accelerator
