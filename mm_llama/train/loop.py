"""The training loop, on Hugging Face accelerate: ``train(cfg)`` runs a config's stages in order.

The same code runs on one process and under ``accelerate launch`` (DDP, or FSDP from the accelerate
config: accelerate's FSDP2, whose shards the checkpoints gather; DeepSpeed is refused, see
:func:`check_distributed`). Per optimizer step, every process draws its micro-batches of one global batch
(``LengthGroupedBatchSampler``), so the global batch does not depend on the number of processes. The
loss is the mean over all supervised tokens of the global batch (token counts are summed across
micro-batches and processes first), so gradient accumulation and data parallelism give the gradient of
one big batch. AdamW with separate learning rates for projectors, encoders and the LLM, a warmup +
cosine (or linear / constant) schedule, gradient clipping, autocast where ``mixed_precision`` asks.

Each stage writes ``<output_dir>/<stage>/``: the model (``MultimodalLM.save_pretrained``), resumable
``checkpoints/`` every ``save_every`` steps (and on a crash or Ctrl-C, before the error propagates),
``tensorboard/``, ``loss.png`` and ``train_log.json``. Rerunning resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch.utils.data import DataLoader
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from mm_llama.config import save_config, to_dict
from mm_llama.data.dataset import Collator, ConversationDataset, LengthGroupedBatchSampler
from mm_llama.data.feature_cache import cache_features, cached_processor, frozen_modalities
from mm_llama.model import MultimodalLM
from mm_llama.processor import IGNORE_INDEX
from mm_llama.train.checkpoint import (
    CHECKPOINTS_DIR,
    RNGState,
    full_state,
    is_sharded,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    save_checkpoint,
    step_dir_name,
)
from mm_llama.train.config import (
    RUNTIME_FIELDS,
    StageConfig,
    TrainConfig,
    load_train_config,
    stage_grad_accumulation,
    validate_train_config,
)
from mm_llama.train.freeze import set_train_modes
from mm_llama.train.objectives import build_objective
from mm_llama.train.report import HISTORY_FILE, LOSS_PLOT_FILE, Reporter, plot_loss, write_history
from mm_llama.train.stage import build_stage_model, stage_dir, stage_model_config

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "train_config.yaml"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SCHEDULES = {
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
    "constant": lambda optimizer, num_warmup_steps, num_training_steps: get_constant_schedule_with_warmup(
        optimizer, num_warmup_steps
    ),
}


@dataclass
class StepInfo:
    """What ``on_step`` callbacks receive after every optimizer step (on every process)."""

    stage: str
    step: int
    total_steps: int
    loss: float
    """Mean loss over the supervised tokens of this step's global batch."""
    lr: float
    tokens_per_s: float
    model: MultimodalLM
    """The model being trained (unwrapped). A callback may evaluate it (``model.eval()``, generate...):
    training modes are restored after the callback returns."""


StepCallback = Callable[[StepInfo], None]


def train(
    cfg: TrainConfig | str | Path,
    stages: Sequence[str] | None = None,
    on_step: StepCallback | None = None,
) -> Path:
    """Run the named stages of ``cfg`` (a config or a YAML/JSON path; default: all, in order).

    Returns the output folder of the last stage, a model folder ``MultimodalLM.from_pretrained`` reads.
    ``on_step`` is called after every optimizer step (raising from it stops training; the crash handler
    checkpoints first)."""
    if isinstance(cfg, (str, Path)):
        cfg = load_train_config(cfg)
    else:
        validate_train_config(cfg)
    names = list(stages) if stages else list(cfg.stages)
    unknown = [n for n in names if n not in cfg.stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; this config has: {', '.join(cfg.stages)}")
    out = Path(cfg.output_dir)
    for name in names:
        out = train_stage(cfg, name, on_step)
    return out


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on other GPUs, ``no`` (fp32) on the CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
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


def train_stage(cfg: TrainConfig, name: str, on_step: StepCallback | None = None) -> Path:
    """Train one stage (resuming from its newest checkpoint when ``cfg.resume``); returns its folder."""
    stage = cfg.stages[name]
    out = stage_dir(cfg, name)
    # Some trainable parameters may get no gradient in a step (a modality absent from a batch, the layers
    # after an encoder's select_layer): DDP must look for them. Checkpointing here is non-reentrant,
    # which is compatible with that search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # Each stage may autocast differently: forget the previous stage's accelerator settings (accelerate
    # refuses a second mixed_precision per process otherwise); the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(stage.mixed_precision), kwargs_handlers=[ddp]
    )
    check_distributed(accelerator)
    accumulation = stage_grad_accumulation(stage, accelerator.num_processes, f"stages.{name}")
    accelerator.gradient_accumulation_steps = accumulation
    main, rank = accelerator.is_main_process, accelerator.process_index
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / RUN_CONFIG_FILE)
    model = build_stage_model(cfg, name)
    optimizer = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    trainee = build_objective(model, stage, f"stages.{name}.loss_terms")
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    unwrapped: MultimodalLM = model
    sharded = is_sharded(unwrapped)  # FSDP: saving gathers the shards, on every process
    sampler, loader = _stage_data(cfg, name, accelerator, unwrapped, accumulation)
    per_epoch = sampler.steps_per_epoch
    total = stage.max_steps if stage.max_steps is not None else math.ceil(stage.epochs * per_epoch)
    if main:
        logger.info(
            "%s: %d records, %d process(es) x %d accumulation x micro-batch %d = global batch %d; "
            "%d steps (%d per epoch), mixed precision %s, distributed %s%s",
            name, len(loader.dataset), accelerator.num_processes, accumulation, stage.micro_batch_size,
            stage.batch_size, total, per_epoch, accelerator.mixed_precision, accelerator.distributed_type.value,
            " (parameters sharded)" if sharded else "",
        )  # fmt: skip
    scheduler = SCHEDULES[stage.lr_schedule](
        optimizer, num_warmup_steps=math.ceil(stage.warmup_ratio * total), num_training_steps=total
    )
    record = to_dict(stage) | {"model": to_dict(stage_model_config(cfg, name)), "seed": cfg.seed}
    history = _resume_or_start(cfg, name, accelerator, unwrapped, optimizer, scheduler, record)

    def save(rng: RNGState, crash: bool = False) -> None:
        save_checkpoint(
            out / CHECKPOINTS_DIR / step_dir_name(history["step"]),
            unwrapped,
            optimizer,
            scheduler,
            {"history": history, "stage": record, "steps_per_epoch": per_epoch},
            rng,
            rank=rank,
            is_main=main,
            barrier=(lambda: None) if crash else accelerator.wait_for_everyone,
        )
        if main:
            prune_checkpoints(out, stage.keep_checkpoints)

    params = [p for p in trainee.parameters() if p.requires_grad]
    reporter = Reporter(out, name, total, history["step"], stage.log_every, main)
    saved_step = history["step"]
    boundary_rng = RNGState.capture()  # the RNG at the last step boundary: what a crash checkpoint holds
    updating = False  # between optimizer.step() and the end of the step's bookkeeping
    try:
        while history["step"] < total:
            epoch, position = divmod(history["step"], per_epoch)
            sampler.set_epoch(epoch, position)
            batches = iter(loader)
            for _ in range(position, min(per_epoch, position + total - history["step"])):
                started = time.perf_counter()
                micro = [next(batches) for _ in range(accumulation)]
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
                loss, tokens = _accumulate_gradients(accelerator, trainee, micro, stage.objective)
                updating = True
                grad_norm = (
                    float(accelerator.clip_grad_norm_(params, stage.max_grad_norm))
                    if stage.max_grad_norm > 0
                    else None
                )
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                history["step"] += 1
                history["loss"].append(loss)
                history["lr"].append(next(iter(lrs.values())))
                history["tokens"] += tokens
                history["seconds"] += time.perf_counter() - started
                boundary_rng = RNGState.capture()
                updating = False
                tokens_per_s = reporter.step(history["step"], loss, lrs, grad_norm, tokens)
                if stage.save_every and history["step"] % stage.save_every == 0:
                    save(boundary_rng)
                    saved_step = history["step"]
                if on_step is not None:
                    info = StepInfo(
                        name, history["step"], total, loss, history["lr"][-1], tokens_per_s, unwrapped
                    )
                    on_step(info)
                    set_train_modes(unwrapped)  # the callback may have switched to eval mode
    except BaseException:
        if main and updating:
            logger.error("%s: interrupted while applying an update; resume from the last checkpoint", name)
        elif main and sharded:  # gathering the shards needs every process, and the others may be gone
            logger.error("%s: interrupted (sharded model): resume from the last checkpoint", name)
        elif main and history["step"] > saved_step:
            logger.error("%s: interrupted after step %d: writing a checkpoint first", name, history["step"])
            save(boundary_rng, crash=True)
        raise
    finally:
        reporter.close()

    if history["step"] > saved_step:
        save(boundary_rng)
    copy_llm = stage.llm == "full"
    gathered = full_state(unwrapped, with_frozen_llm=copy_llm, keep=main) if sharded else None
    if main:
        unwrapped.save_pretrained(out, copy_llm=copy_llm, state_dict=gathered)
        plot_loss(history["loss"], out / LOSS_PLOT_FILE, f"{Path(cfg.output_dir).name} / {name}")
        write_history(history["loss"], history["lr"], history["seconds"], out / HISTORY_FILE)
        logger.info("%s: done (%d steps, %.0f s); model saved in %s", name, total, history["seconds"], out)
    accelerator.wait_for_everyone()
    return out


def _stage_data(
    cfg: TrainConfig, name: str, accelerator: Accelerator, model: MultimodalLM, accumulation: int
) -> tuple[LengthGroupedBatchSampler, DataLoader]:
    """The stage's sampler and loader; frozen encoders read from the feature cache when one is set (the
    main process fills it first)."""
    stage = cfg.stages[name]
    processor, feature_modalities = model.processor, []
    if stage.feature_cache is not None:
        feature_modalities = [m for m in frozen_modalities(model) if stage.only is None or m in stage.only]
        with accelerator.main_process_first():
            cache = cache_features(
                model, stage.data, stage.feature_cache, stage.data_root, feature_modalities
            )
        processor = cached_processor(model, cache, feature_modalities)
    dataset = ConversationDataset(stage.data, processor, data_root=stage.data_root, only=stage.only)
    sampler = LengthGroupedBatchSampler(
        dataset.lengths if stage.group_by_length else [0] * len(dataset),
        stage.micro_batch_size,
        accumulation,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        seed=cfg.seed,
        group_by_length=stage.group_by_length,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collator(processor, feature_modalities),
        num_workers=stage.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # iterators never draw from the global RNG
    )
    return sampler, loader


def _resume_or_start(
    cfg: TrainConfig,
    name: str,
    accelerator: Accelerator,
    model: MultimodalLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Restore the newest checkpoint (weights, optimizer, scheduler, RNG) and return its history, or seed
    a fresh start (deleting old checkpoints when ``resume`` is off)."""
    out, rank = stage_dir(cfg, name), accelerator.process_index
    checkpoints = list_checkpoints(out)
    history: dict[str, Any] = {"step": 0, "loss": [], "lr": [], "tokens": 0, "seconds": 0.0}
    if checkpoints and cfg.resume:
        latest = checkpoints[-1]
        saved = read_trainer_state(latest)
        changed = [k for k in record if k not in RUNTIME_FIELDS and saved["stage"].get(k) != record[k]]
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


def _accumulate_gradients(
    accelerator: Accelerator, model: torch.nn.Module, micro: list[dict[str, Any]], objective: str = "lm"
) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches of one global batch.

    Each micro-batch's summed loss is divided by the count of the whole global batch (supervised tokens
    for ``lm``, samples for ``contrastive``) and scaled by processes x accumulation, which undoes
    accelerate's and DDP's averaging: the gradient is that of the mean over the global batch. Returns
    that mean loss and the global number of (non-padding) tokens."""
    contrastive = objective == "contrastive"
    local = torch.tensor(
        [
            sum(
                b["labels"].shape[0] if contrastive else int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                for b in micro
            ),
            sum(int(b["attention_mask"].sum()) for b in micro),
        ],
        device=accelerator.device,
    )
    units, tokens = (int(v) for v in accelerator.reduce(local, reduction="sum"))
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(units, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro:
        with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-batch
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
