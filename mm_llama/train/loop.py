"""The training loop, on Hugging Face accelerate: ``train(cfg)`` runs a config's stages in order.

The same code runs on one process and under ``accelerate launch`` (DDP, or FSDP from the accelerate
config: accelerate's FSDP2, whose shards the checkpoints gather; DeepSpeed is refused, see
:func:`mm_llama.train.accel.check_distributed`). Per optimizer step, every process draws its
micro-batches of one global batch (:mod:`mm_llama.train.data`), so the global batch does not depend on
the number of processes; :mod:`mm_llama.train.step` accumulates their gradients into those of one big
batch, and AdamW steps with separate learning rates for projectors, encoders and the LLM under a warmup
+ cosine (or linear / constant) schedule, with gradient clipping and autocast where
``mixed_precision`` asks. What each micro-batch's loss is comes from the stage's objective
(:mod:`mm_llama.train.objectives`).

Each stage writes ``<output_dir>/<stage>/``: the model (``MultimodalLM.save_pretrained``), resumable
``checkpoints/`` every ``save_every`` steps (and on a crash or Ctrl-C, before the error propagates;
:mod:`mm_llama.train.resume`), ``tensorboard/``, ``loss.png`` and ``train_log.json``. Rerunning
resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mm_llama.config import save_config, to_dict
from mm_llama.model import MultimodalLM
from mm_llama.train.accel import stage_accelerator
from mm_llama.train.checkpoint import RNGState, full_state, is_sharded
from mm_llama.train.config import (
    StageConfig,
    TrainConfig,
    load_train_config,
    stage_grad_accumulation,
    validate_train_config,
)
from mm_llama.train.data import stage_data
from mm_llama.train.freeze import set_train_modes
from mm_llama.train.objectives import build_objective
from mm_llama.train.report import HISTORY_FILE, LOSS_PLOT_FILE, Reporter, plot_loss, write_history
from mm_llama.train.resume import CheckpointWriter, resume_or_start
from mm_llama.train.stage import build_stage_model, stage_dir, stage_model_config
from mm_llama.train.step import accumulate_gradients, apply_update, make_optimizer, make_scheduler

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "train_config.yaml"


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


def train_stage(cfg: TrainConfig, name: str, on_step: StepCallback | None = None) -> Path:
    """Train one stage (resuming from its newest checkpoint when ``cfg.resume``); returns its folder."""
    stage = cfg.stages[name]
    out = stage_dir(cfg, name)
    accelerator = stage_accelerator(stage)
    accumulation = stage_grad_accumulation(stage, accelerator.num_processes, f"stages.{name}")
    accelerator.gradient_accumulation_steps = accumulation
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / RUN_CONFIG_FILE)
    model = build_stage_model(cfg, name)
    optimizer = make_optimizer(model, stage)
    trainee = build_objective(model, stage, f"stages.{name}.loss_terms")
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    unwrapped: MultimodalLM = model
    sharded = is_sharded(unwrapped)  # FSDP: saving gathers the shards, on every process
    sampler, loader = stage_data(cfg, name, accelerator, unwrapped, accumulation)
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
    scheduler = make_scheduler(optimizer, stage, total)
    record = to_dict(stage) | {"model": to_dict(stage_model_config(cfg, name)), "seed": cfg.seed}
    history = resume_or_start(cfg, name, accelerator, unwrapped, optimizer, scheduler, record)
    writer = CheckpointWriter(
        out, accelerator, unwrapped, optimizer, scheduler, record, per_epoch, stage.keep_checkpoints
    )
    reporter = Reporter(out, name, total, history["step"], stage.log_every, main)
    saved_step = history["step"]
    boundary_rng = RNGState.capture()  # the RNG at the last step boundary: what a crash checkpoint holds
    updating = False  # between optimizer.step() and the end of the step's bookkeeping

    params = [p for p in trainee.parameters() if p.requires_grad]
    try:
        while history["step"] < total:
            epoch, position = divmod(history["step"], per_epoch)
            sampler.set_epoch(epoch, position)
            batches = iter(loader)
            for _ in range(position, min(per_epoch, position + total - history["step"])):
                started = time.perf_counter()
                micro = [next(batches) for _ in range(accumulation)]
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
                loss, tokens = accumulate_gradients(accelerator, trainee, micro, stage.objective)
                updating = True
                grad_norm = apply_update(accelerator, optimizer, scheduler, params, stage.max_grad_norm)
                history["step"] += 1
                history["loss"].append(loss)
                history["lr"].append(next(iter(lrs.values())))
                history["tokens"] += tokens
                history["seconds"] += time.perf_counter() - started
                boundary_rng = RNGState.capture()
                updating = False
                tokens_per_s = reporter.step(history["step"], loss, lrs, grad_norm, tokens)
                if stage.save_every and history["step"] % stage.save_every == 0:
                    writer.save(history, boundary_rng)
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
            writer.save(history, boundary_rng, crash=True)
        raise
    finally:
        reporter.close()

    if history["step"] > saved_step:
        writer.save(history, boundary_rng)
    _save_stage_model(cfg, name, stage, accelerator, unwrapped, history, total, sharded)
    return out


def _save_stage_model(
    cfg: TrainConfig,
    name: str,
    stage: StageConfig,
    accelerator: Accelerator,
    model: MultimodalLM,
    history: dict[str, Any],
    total: int,
    sharded: bool,
) -> None:
    """Write the trained model, its loss plot and history into the stage's folder (shards gathered on
    every process, files written by the main one)."""
    out, main = stage_dir(cfg, name), accelerator.is_main_process
    copy_llm = stage.llm == "full"
    gathered = full_state(model, with_frozen_llm=copy_llm, keep=main) if sharded else None
    if main:
        model.save_pretrained(out, copy_llm=copy_llm, state_dict=gathered)
        plot_loss(history["loss"], out / LOSS_PLOT_FILE, f"{Path(cfg.output_dir).name} / {name}")
        write_history(history["loss"], history["lr"], history["seconds"], out / HISTORY_FILE)
        logger.info("%s: done (%d steps, %.0f s); model saved in %s", name, total, history["seconds"], out)
    accelerator.wait_for_everyone()
