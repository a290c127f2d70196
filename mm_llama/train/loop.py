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
``checkpoints/`` every ``save_every`` steps and every ``save_every_minutes`` (and on a crash, Ctrl-C or
SIGTERM, before the error propagates; :mod:`mm_llama.train.resume`), ``tensorboard/``, ``loss.png`` and
``train_log.json`` (with the records ``on_error: skip`` skipped, by reason). Rerunning resumes from the
newest checkpoint. ``<output_dir>/train_config.yaml`` is (re)written only once a stage is accepted (its
resume check passed, its model built), atomically.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from mm_llama.config import save_config, to_dict
from mm_llama.llm import DTYPES
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
from mm_llama.train.data import SKIPPED_KEY, SKIPPED_WHERE_KEY, stage_data
from mm_llama.train.freeze import set_train_modes
from mm_llama.train.objectives import build_objective
from mm_llama.train.report import HISTORY_FILE, LOSS_PLOT_FILE, Reporter, plot_loss, write_history
from mm_llama.train.resume import CheckpointWriter, resume_or_start
from mm_llama.train.stage import build_stage_model, fp32_master, stage_dir, stage_model_config
from mm_llama.train.step import accumulate_gradients, apply_update, make_optimizer, make_scheduler

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "train_config.yaml"
MAX_SKIPS_LOGGED = 20
"""Skipped records named one by one in the log per stage (then only counted)."""
_clock = time.monotonic
"""The clock of ``save_every_minutes`` (a module attribute, so tests can move it)."""


class TrainingTerminated(KeyboardInterrupt):
    """SIGTERM arrived during a stage (a preemption, a job scheduler's stop): handled as Ctrl-C is, the
    crash handler checkpoints at the last step boundary and the run exits non-zero."""


class _SigtermAsInterrupt:
    """While active, SIGTERM raises :class:`TrainingTerminated` in the main thread; the previous handler
    is restored on exit. (Signal handlers can only be set from the main thread; elsewhere this does
    nothing.)"""

    def __enter__(self) -> _SigtermAsInterrupt:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    @staticmethod
    def _handle(signum: int, frame: Any) -> None:
        raise TrainingTerminated(f"received signal {signal.Signals(signum).name}")

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def write_run_config(cfg: TrainConfig, path: Path) -> None:
    """Write the run's config to ``path`` atomically (a temp file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_config(cfg, tmp)
    os.replace(tmp, path)


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


def release_memory() -> None:
    """Free what the last stage left and hand the allocator's free pages back to the OS.

    A stage's model, optimizer and accelerator reference each other, so only the cycle collector frees
    them; and the allocator keeps freed activations as free pages of its own (tcmalloc, which `make
    quickstart` preloads, and glibc's malloc alike), so the next model's build would stack on top of them
    in resident memory (the quickstart peaked at 2.87 GB without this, 2.48 GB with it)."""
    gc.collect()
    process = ctypes.CDLL(None)  # the allocator actually loaded: tcmalloc when preloaded
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release()
    trim = getattr(process, "malloc_trim", None)
    if trim is not None:  # glibc's (a no-op for tcmalloc's pages)
        trim(0)


def train_stage(cfg: TrainConfig, name: str, on_step: StepCallback | None = None) -> Path:
    """Train one stage (resuming from its newest checkpoint when ``cfg.resume``); returns its folder.
    SIGTERM during the stage is handled as Ctrl-C is (:class:`TrainingTerminated`)."""
    with _SigtermAsInterrupt():
        try:
            return _train_stage(cfg, name, on_step)
        finally:
            release_memory()  # before the next stage (or an evaluation) builds its own model


def _train_stage(cfg: TrainConfig, name: str, on_step: StepCallback | None) -> Path:
    stage = cfg.stages[name]
    out = stage_dir(cfg, name)
    accelerator = stage_accelerator(stage, fp32_master(cfg, name))
    accumulation = stage_grad_accumulation(stage, accelerator.num_processes, f"stages.{name}")
    accelerator.gradient_accumulation_steps = accumulation
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
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
    if main:  # accepted: the config validated, the resume check passed, the model built
        write_run_config(cfg, Path(cfg.output_dir) / RUN_CONFIG_FILE)
    skipped = Counter(history.get(SKIPPED_KEY, {}))
    if history["step"] == 0:  # records left out up front (missing media): counted once per stage
        skipped.update(s.reason for s in loader.dataset.missing)
    skips_logged = 0
    writer = CheckpointWriter(
        out, accelerator, unwrapped, optimizer, scheduler, record, per_epoch, stage.keep_checkpoints
    )
    reporter = Reporter(out, name, total, history["step"], stage.log_every, main)
    saved_step = history["step"]
    boundary_rng = RNGState.capture()  # the RNG at the last step boundary: what a crash checkpoint holds
    updating = False  # between optimizer.step() and the end of the step's bookkeeping
    saved_at = _clock()  # when the last checkpoint was written (or training started)
    every_s = stage.save_every_minutes * 60

    params = [p for p in trainee.parameters() if p.requires_grad]
    try:
        while history["step"] < total:
            epoch, position = divmod(history["step"], per_epoch)
            sampler.set_epoch(epoch, position)
            batches = iter(loader)
            for _ in range(position, min(per_epoch, position + total - history["step"])):
                started = time.perf_counter()
                micro = [next(batches) for _ in range(accumulation)]
                for batch in micro:
                    skipped.update(batch.pop(SKIPPED_KEY))
                    for where, reason, message in batch.pop(SKIPPED_WHERE_KEY):
                        if skips_logged < MAX_SKIPS_LOGGED:
                            logger.warning("%s: skipping %s (%s): %s", name, where, reason, message)
                        skips_logged += 1
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
                loss, tokens = accumulate_gradients(accelerator, trainee, micro, stage.objective)
                updating = True
                grad_norm = apply_update(accelerator, optimizer, scheduler, params, stage.max_grad_norm)
                history["step"] += 1
                history["loss"].append(loss)
                history["lr"].append(next(iter(lrs.values())))
                history["tokens"] += tokens
                history["seconds"] += time.perf_counter() - started
                history[SKIPPED_KEY] = dict(skipped)
                boundary_rng = RNGState.capture()
                updating = False
                tokens_per_s = reporter.step(history["step"], loss, lrs, grad_norm, tokens)
                due = bool(stage.save_every) and history["step"] % stage.save_every == 0
                if every_s > 0 and not due:
                    due = _all_agree(accelerator, _clock() - saved_at >= every_s)
                if due:
                    writer.save(history, boundary_rng)
                    saved_step, saved_at = history["step"], _clock()
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
    history[SKIPPED_KEY] = _total_skips(accelerator, skipped)
    if main and history[SKIPPED_KEY]:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(history[SKIPPED_KEY].items()))
        logger.warning("%s: skipped training records (on_error: skip): %s", name, counts)
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
    half = fp32_master(cfg, name)
    if half is not None:  # the float32 master copy is saved in the configured dtype
        if gathered is not None:
            gathered = {
                k: v.to(DTYPES[half]) if k.startswith("llm.") and v.is_floating_point() else v
                for k, v in gathered.items()
            }
        elif not sharded:
            model.llm.to(DTYPES[half])
    if main:
        model.save_pretrained(out, copy_llm=copy_llm, state_dict=gathered)
        plot_loss(history["loss"], out / LOSS_PLOT_FILE, f"{Path(cfg.output_dir).name} / {name}")
        write_history(
            history["loss"], history["lr"], history["seconds"], out / HISTORY_FILE, history.get(SKIPPED_KEY)
        )
        logger.info("%s: done (%d steps, %.0f s); model saved in %s", name, total, history["seconds"], out)
    accelerator.wait_for_everyone()


def _all_agree(accelerator: Accelerator, flag: bool) -> bool:
    """The main process's ``flag`` on every process (clocks differ: all must save together)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag) if accelerator.is_main_process else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item())


def _total_skips(accelerator: Accelerator, skipped: Counter[str]) -> dict[str, int]:
    """The skip counts of all processes, summed (each process read its own records)."""
    if accelerator.num_processes == 1:
        return dict(skipped)
    total: Counter[str] = Counter()
    for counts in gather_object([dict(skipped)]):
        total.update(counts)
    return dict(total)
