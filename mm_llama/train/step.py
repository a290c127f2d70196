"""One optimizer step's parts: AdamW parameter groups, the learning-rate schedule, and gradient
accumulation over a global batch's micro-batches."""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from mm_llama.errors import MMInputError
from mm_llama.model import MultimodalLM
from mm_llama.processor import IGNORE_INDEX
from mm_llama.train.config import StageConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SCHEDULES = {
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
    "constant": lambda optimizer, num_warmup_steps, num_training_steps: get_constant_schedule_with_warmup(
        optimizer, num_warmup_steps
    ),
}


def param_groups(model: MultimodalLM, stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: projectors, encoders and LLM each at their own learning rate; weight decay
    on matrices only."""
    projector_lr = stage.projector_lr if stage.projector_lr is not None else stage.lr
    encoder_lr = stage.encoder_lr if stage.encoder_lr is not None else projector_lr
    groups = []
    for name, module, lr in (
        ("projectors", model.projectors, projector_lr),
        ("encoders", model.encoders, encoder_lr),
        ("llm", model.llm, stage.lr),
    ):
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": stage.weight_decay})
        if no_decay:
            groups.append({"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def make_optimizer(model: MultimodalLM, stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def make_scheduler(
    optimizer: torch.optim.Optimizer, stage: StageConfig, total: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup_ratio`` of ``total`` steps, then the stage's ``lr_schedule``."""
    return SCHEDULES[stage.lr_schedule](
        optimizer, num_warmup_steps=math.ceil(stage.warmup_ratio * total), num_training_steps=total
    )


def apply_update(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> float | None:
    """Clip the accumulated gradients (when ``max_grad_norm`` > 0; returns their norm before clipping),
    step the optimizer and the schedule (not after an fp16 overflow, when the step did not happen), and
    clear the gradients."""
    grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm)) if max_grad_norm > 0 else None
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def accumulate_gradients(
    accelerator: Accelerator, model: torch.nn.Module, micro: list[dict[str, Any]], objective: str = "lm"
) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches of one global batch.

    Each micro-batch's summed loss is divided by the count of the whole global batch (supervised tokens
    for ``lm``, samples for ``contrastive``) and scaled by processes x accumulation, which undoes
    accelerate's and DDP's averaging: the gradient is that of the mean over the global batch. Returns
    that mean loss and the global number of (non-padding) tokens."""
    contrastive = objective == "contrastive"
    present = [b for b in micro if not b.get("empty")]
    local = torch.tensor(
        [
            sum(
                b["labels"].shape[0] if contrastive else int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                for b in present
            ),
            sum(int(b["attention_mask"].sum()) for b in present),
            len(micro) - len(present),
        ],
        device=accelerator.device,
    )
    units, tokens, empty = (int(v) for v in accelerator.reduce(local, reduction="sum"))
    if empty and accelerator.num_processes > 1:  # every process raises: none waits in an all-reduce
        raise MMInputError(
            f"{empty} micro-batch(es) of this step had only unreadable records (on_error: skip); with "
            f"{accelerator.num_processes} processes a micro-batch cannot be left out: fix or remove the "
            "records the log names"
        )
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(units, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro:
        with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-batch
            if batch.get("empty"):  # its records were all skipped: the accumulation count still runs
                continue
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                media=batch["media"],
                features=batch["features"],
            )
            if contrastive:  # a scalar: the mean loss over this micro-batch's samples
                summed = out * batch["labels"].shape[0]
            else:
                summed = out.loss * out.num_label_tokens  # summed over this micro-batch's tokens
            accelerator.backward(summed * scale)
            loss_sum += summed.detach().float()
    loss = float(accelerator.reduce(loss_sum, reduction="sum")) / max(units, 1)
    return loss, tokens
