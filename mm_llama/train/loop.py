"""The training loop, on Hugging Face accelerate: ``train(cfg)`` runs a config's stages in order.

The same code runs on one process and under ``accelerate launch`` (DDP; FSDP or DeepSpeed come from
the accelerate config). Per optimizer step, every process draws its micro-batches of one global batch
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
from accelerate.utils import DistributedDataParallelKwargs, set_seed
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


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    changed = [k for k in current if k not in RUNTIME_FIELDS and saved.get(k) != current[k]]
    if changed:
        raise ValueError(
            f"{checkpoint} was written with different settings ({', '.join(changed)} changed); resuming "
            "would not continue the same run: use another output_dir, or set resume: false to start over"
        )


def train_stage(cfg: TrainConfig, name: str, on_step: StepCallback | None = None) -> Path:
    """Train one stage (resuming from its newest checkpoint when ``cfg.resume``); returns its folder."""
    stage = cfg.stages[name]
    where = f"stages.{name}"
    out = stage_dir(cfg, name)
    # Some trainable parameters may get no gradient in a step (a modality absent from a batch, the layers
    # after an encoder's select_layer): DDP must look for them. Checkpointing here is non-reentrant,
    # which is compatible with that search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(stage.mixed_precision), kwargs_handlers=[ddp]
    )
    accumulation = stage_grad_accumulation(stage, accelerator.num_processes, where)
    accelerator.gradient_accumulation_steps = accumulation
    main, rank = accelerator.is_main_process, accelerator.process_index
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / RUN_CONFIG_FILE)
    model = build_stage_model(cfg, name)
    optimizer = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: MultimodalLM = accelerator.unwrap_model(model)

    processor, feature_modalities = unwrapped.processor, []
    if stage.feature_cache is not None:
        feature_modalities = frozen_modalities(unwrapped)
        with accelerator.main_process_first():
            cache = cache_features(
                unwrapped, stage.data, stage.feature_cache, stage.data_root, feature_modalities
            )
        processor = cached_processor(unwrapped, cache, feature_modalities)
    dataset = ConversationDataset(stage.data, processor, data_root=stage.data_root)
    sampler = LengthGroupedBatchSampler(
        dataset.lengths if stage.group_by_length else [0] * len(dataset),
        stage.micro_batch_size,
        accumulation,
        num_processes=accelerator.num_processes,
        process_index=rank,
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
    per_epoch = sampler.steps_per_epoch
    total = stage.max_steps if stage.max_steps is not None else math.ceil(stage.epochs * per_epoch)
    if main:
        logger.info(
            "%s: %d records, %d process(es) x %d accumulation x micro-batch %d = global batch %d; "
            "%d steps (%d per epoch), mixed precision %s",
            name, len(dataset), accelerator.num_processes, accumulation, stage.micro_batch_size,
            stage.batch_size, total, per_epoch, accelerator.mixed_precision,
        )  # fmt: skip
    scheduler = SCHEDULES[stage.lr_schedule](
        optimizer, num_warmup_steps=math.ceil(stage.warmup_ratio * total), num_training_steps=total
    )

    stage_record = to_dict(stage) | {"model": to_dict(stage_model_config(cfg, name)), "seed": cfg.seed}
    history: dict[str, Any] = {"step": 0, "loss": [], "lr": [], "tokens": 0, "seconds": 0.0}
    checkpoints = list_checkpoints(out)
    if checkpoints and cfg.resume:
        latest = checkpoints[-1]
        _check_resumable(read_trainer_state(latest)["stage"], stage_record, latest)
        saved, rng = load_checkpoint(latest, unwrapped, optimizer, scheduler, rank)
        history = saved["history"]
        (rng or _seeded_rng(cfg.seed + rank + history["step"])).restore()
        logger.info("%s: resuming from %s (step %d of %d)", name, latest, history["step"], total)
    else:
        if checkpoints and main:
            logger.warning(
                "%s: resume is off: deleting the old checkpoints in %s", name, out / CHECKPOINTS_DIR
            )
            shutil.rmtree(out / CHECKPOINTS_DIR)
        set_seed(cfg.seed + rank)  # dropout differs across processes, as different samples do
    accelerator.wait_for_everyone()

    def save(rng: RNGState, crash: bool = False) -> None:
        directory = out / CHECKPOINTS_DIR / step_dir_name(history["step"])
        save_checkpoint(
            directory,
            unwrapped,
            optimizer,
            scheduler,
            {"history": history, "stage": stage_record, "steps_per_epoch": per_epoch},
            rng,
            rank=rank,
            is_main=main,
            barrier=(lambda: None) if crash else accelerator.wait_for_everyone,
        )
        if main:
            prune_checkpoints(out, stage.keep_checkpoints)

    params = [p for p in model.parameters() if p.requires_grad]
    reporter = Reporter(out, name, total, history["step"], stage.log_every, main)
    saved_step = history["step"]
    boundary_rng = RNGState.capture()  # the RNG at the last step boundary: what a crash checkpoint holds
    try:
        while history["step"] < total:
            epoch, position = divmod(history["step"], per_epoch)
            sampler.set_epoch(epoch, position)
            batches = iter(loader)
            for _ in range(position, per_epoch):
                if history["step"] >= total:
                    break
                started = time.perf_counter()
                micro = [next(batches) for _ in range(accumulation)]
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
                loss, grad_norm, tokens = _optimizer_step(accelerator, model, optimizer, params, micro, stage)
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
                    scheduler.step()
                history["step"] += 1
                history["loss"].append(loss)
                history["lr"].append(next(iter(lrs.values())))
                history["tokens"] += tokens
                history["seconds"] += time.perf_counter() - started
                boundary_rng = RNGState.capture()
                tokens_per_s = reporter.step(history["step"], loss, lrs, grad_norm, tokens)
                if stage.save_every and history["step"] % stage.save_every == 0:
                    save(boundary_rng)
                    saved_step = history["step"]
                if on_step is not None:
                    on_step(
                        StepInfo(
                            name, history["step"], total, loss, history["lr"][-1], tokens_per_s, unwrapped
                        )
                    )
                    set_train_modes(unwrapped)  # the callback may have switched to eval mode
    except BaseException:
        if main and history["step"] > saved_step:
            logger.error("%s: interrupted at step %d: writing a checkpoint first", name, history["step"])
            save(boundary_rng, crash=True)
        raise
    finally:
        reporter.close()

    if history["step"] > saved_step or not list_checkpoints(out):
        save(boundary_rng)
    if main:
        unwrapped.save_pretrained(out, copy_llm=stage.llm == "full")
        plot_loss(history["loss"], out / LOSS_PLOT_FILE, f"{Path(cfg.output_dir).name} / {name}")
        write_history(history["loss"], history["lr"], history["seconds"], out / HISTORY_FILE)
        logger.info("%s: done (%d steps, %.0f s); model saved in %s", name, total, history["seconds"], out)
    accelerator.wait_for_everyone()
    return out


def _seeded_rng(seed: int) -> RNGState:
    set_seed(seed)
    return RNGState.capture()


def _optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    micro: list[dict[str, Any]],
    stage: StageConfig,
) -> tuple[float, float | None, int]:
    """Forward/backward over this process's micro-batches of one global batch, then one optimizer step.

    Each micro-batch's summed token loss is divided by the supervised-token count of the whole global
    batch, and scaled by processes x accumulation to undo accelerate's and DDP's averaging. Returns the
    global mean loss, the gradient norm before clipping, and the global number of tokens."""
    local = torch.tensor(
        [
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
            sum(int(b["attention_mask"].sum()) for b in micro),
        ],
        device=accelerator.device,
    )
    label_tokens, tokens = (int(v) for v in accelerator.reduce(local, reduction="sum"))
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(label_tokens, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for batch in micro:
        with accelerator.accumulate(model):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                media=batch["media"],
                features=batch["features"],
            )
            token_loss = out.loss * out.num_label_tokens  # summed over this micro-batch's tokens
            accelerator.backward(token_loss * scale)
            loss_sum += token_loss.detach().float()
            if accelerator.sync_gradients:
                if stage.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, stage.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    loss = float(accelerator.reduce(loss_sum, reduction="sum")) / max(label_tokens, 1)
    return loss, grad_norm, tokens
