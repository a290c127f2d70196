"""Training configuration: one ``TrainConfig`` holds the model and its named stages.

A run is ``model`` + ``stages`` (in order, e.g. ``align`` then ``instruct``) + where to write. Each stage
says which data it reads, which template renders it, what trains (projectors, encoders, the LLM as
frozen / full / LoRA / QLoRA) and the optimisation hyperparameters. YAML layout::

    output_dir: runs/llava15
    seed: 42
    model: {llm: {...}, modalities: {image: {encoder: {...}, projector: {...}}}}
    stages:
      pretrain: {data: [...], objective: contrastive, contrastive: {temperature: 0.07},
                 loss_terms: {word_match: 0.5}, train_encoders: all, ...}
      align:    {data: [...], template: plain, llm: frozen, lr: 1.0e-3, batch_size: 256, ...}
      instruct: {data: [...], template: chat,  llm: qlora, lr: 2.0e-4, projector_lr: 2.0e-5,
                 init_from: align, lora: {r: 128, alpha: 256}, ...}

Loading is strict (unknown fields, wrong types and values outside a ``Literal`` raise ``ValueError``
naming the file and the dotted field); :func:`validate_train_config` also checks cross-field rules,
that every encoder / projector type is registered with valid options, and each stage's ``loss_terms``
(names the objective or the model's projectors know, weights >= 0), before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mm_llama.config import ModelConfig, Template, build_options, from_dict, read_mapping
from mm_llama.errors import MMInputError

LLMMode = Literal["frozen", "full", "lora", "qlora"]
EncoderMode = Literal["auto", "none", "all"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
LRSchedule = Literal["cosine", "linear", "constant"]
Objective = Literal["lm", "contrastive"]
OnError = Literal["raise", "skip"]


@dataclass
class LoraSettings:
    """LoRA adapter settings (used when a stage's ``llm`` is ``lora`` or ``qlora``)."""

    r: int = 64
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """``all-linear``: every linear layer of the LLM except the output head (QLoRA's choice), or a list
    of module-name suffixes such as ``[q_proj, v_proj]``."""


@dataclass
class ContrastiveOptions:
    """Settings of the ``contrastive`` objective."""

    temperature: float = 0.07
    """Softmax temperature of its InfoNCE and caption-word pieces."""
    weighting: Literal["idf", "uniform"] = "idf"
    """How a caption's word embeddings are pooled: ``idf`` weighs each word by its inverse document
    frequency in the micro-batch (words all captions share count for nothing), ``uniform`` is the plain
    mean."""


@dataclass
class StageConfig:
    """One training stage: its data, what trains, and how."""

    data: list[str]
    """Conversation files (LLaVA JSON, JSON lines or parquet), relative to the working directory."""
    objective: Objective = "lm"
    """``lm``: next-token loss on the assistant replies (LLaVA's stages). ``contrastive``: ImageBind-style
    alignment of each record's media (its projected tokens) to its caption (the frozen LLM's input
    embeddings of it), with no LLM forward pass; needs ``llm: frozen`` (see
    ``mm_llama.train.contrastive``)."""
    contrastive: ContrastiveOptions = field(default_factory=ContrastiveOptions)
    """Settings of the ``contrastive`` objective (its term weights are in ``loss_terms``)."""
    loss_terms: dict[str, float] = field(default_factory=dict)
    """Weights of named loss terms, over the defaults (a term of weight 0 is not computed): for
    ``contrastive``, its pieces ``infonce`` (1), ``caption_words`` (1), ``word_match`` (0),
    ``token_scale`` (1) and any registered in ``mm_llama.train.losses.CONTRASTIVE_TERMS``; for either
    objective, the terms the model's projectors declare (``Projector.LOSS_TERMS``, e.g. ``word_count``
    of ``word_mix``; default 0), each applied to every projector that declares it. E.g.
    ``{word_count: 3.0}``."""
    only: list[str] | None = None
    """Train on the records whose media are all of these modalities (``None``: every record), e.g. a
    stage that pretrains one encoder on its captions out of a mixed caption file."""
    modality_weights: dict[str, float] = field(default_factory=dict)
    """How often a record is seen relative to the others, by modality (a mixture ratio): a record is
    repeated ``floor(w)`` times, and once more with probability ``w - floor(w)`` (seeded, fixed for the
    stage), ``w`` the largest weight among its media's modalities (1 for modalities not listed). E.g.
    ``{image: 4}`` in a mixed instruction stage gives the image conversations four times their share.
    Epochs count over the weighted records."""
    data_root: str | None = None
    """Folder that media paths in the records are relative to; ``None``: each data file's folder."""
    template: Template = "chat"
    """``plain`` (LLaVA stage 1: media then caption, nothing else) or ``chat`` (the tokenizer's template)."""
    max_length: int | None = None
    """Longest token sequence; ``None`` keeps ``model.max_length``."""
    init_from: str | None = None
    """Start from a saved model folder: the name of an earlier stage of this config (its output folder)
    or a path. Its projectors and trained encoders are loaded (and a LoRA adapter, for LoRA stages); when
    it holds ``llm/`` (a ``full`` fine-tune), the stage's LLM is that one instead of ``model.llm``."""

    train_projectors: bool = True
    """Train the projectors (the point of stage 1)."""
    train_encoders: EncoderMode = "auto"
    """``auto``: as each encoder's ``freeze`` field says (encoders built from scratch train, pretrained ones
    stay frozen); ``none``: all frozen; ``all``: all trainable."""
    llm: LLMMode = "frozen"
    """``frozen``; ``full`` fine-tuning; ``lora`` adapters; ``qlora``: the LLM loads in 4-bit NF4 with
    double quantization and LoRA adapters train on top."""
    lora: LoraSettings = field(default_factory=LoraSettings)

    lr: float = 2e-4
    """Peak learning rate of the LLM (full or LoRA) and, unless set below, of projectors and encoders."""
    projector_lr: float | None = None
    """Peak learning rate of the projectors; ``None``: ``lr``."""
    encoder_lr: float | None = None
    """Peak learning rate of trainable encoders; ``None``: the projector learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to biases and norms)."""
    lr_schedule: LRSchedule = "cosine"
    """Decay after the linear warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    epochs: float = 1.0
    """Passes over the data (fractions allowed); ignored when ``max_steps`` is set."""
    max_steps: int | None = None
    """Number of optimizer steps; overrides ``epochs``."""
    batch_size: int = 32
    """Global batch: samples per optimizer step, over all processes and accumulation steps."""
    micro_batch_size: int = 8
    """Samples per forward pass on one process. Gradient accumulation steps =
    ``batch_size / (micro_batch_size * num_processes)``, which must be a whole number."""
    group_by_length: bool = True
    """Batch samples of similar length together (less padding); the order stays seeded."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""

    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in the backward pass (less memory, ~30% slower)."""
    mixed_precision: MixedPrecision = "auto"
    """Autocast: ``auto`` is bf16 on GPUs that support it, else fp16 on GPU, and fp32 on the CPU."""
    feature_cache: str | None = None
    """Folder of precomputed features of frozen encoders (built on first use; see
    ``mm_llama.data.feature_cache``). Trainable encoders always run."""
    cache_media_mb: float = 0.0
    """Keep up to this many MB of preprocessed media (decoded, resampled, normalized tensors) in memory,
    by media path, so later epochs skip decoding and preprocessing; for multi-epoch stages whose encoders
    train (frozen ones read the ``feature_cache``). Per process and DataLoader worker; 0: off."""

    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only at the end or on a crash)."""
    save_every_minutes: float = 30.0
    """Also write a resumable checkpoint once N minutes of training have passed since the last one, so a
    preempted run (killed without warning) loses at most that much; 0 disables. (SIGTERM and Ctrl-C
    checkpoint at the last step boundary anyway.)"""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 10
    """Average the loss over N steps for TensorBoard and the progress bar."""
    on_error: OnError = "raise"
    """A training record whose media cannot be read or whose conversation is invalid: ``raise`` (the error
    names the record, ``file:id``) or ``skip`` it; skipped records are counted by reason, logged, and
    listed in ``train_log.json`` (``skipped``). A micro-batch whose records all fail is skipped too (one
    process only; under DDP that is an error)."""


@dataclass
class TrainConfig:
    """A training run: the model, its stages in order, and where the results go."""

    model: ModelConfig
    stages: dict[str, StageConfig]
    """Stage name -> settings, run in the order written (e.g. ``align`` then ``instruct``)."""
    output_dir: str = "runs/mm_llama"
    """Run folder: ``<output_dir>/<stage>/`` receives each stage's model, checkpoints and logs."""
    seed: int = 0
    """Seeds model initialisation, data order and dropout."""
    resume: bool = True
    """Continue each stage from its newest checkpoint when one exists (a finished stage resumes at its
    end, so it is only re-saved)."""


RUNTIME_FIELDS: frozenset[str] = frozenset(
    {"save_every", "save_every_minutes", "keep_checkpoints", "log_every", "num_workers", "cache_media_mb"}
)
"""Stage fields that may change between a checkpoint and its resumption without changing the result."""


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML/JSON file (errors name the file and the field)."""
    try:
        cfg = from_dict(TrainConfig, read_mapping(path))
        validate_train_config(cfg)
    except ValueError as e:
        raise MMInputError(f"{path}: {e}") from e
    return cfg


def validate_train_config(cfg: TrainConfig) -> None:
    """Cross-field checks, and encoder / projector types and options against the registries."""
    from mm_llama.encoders import ENCODERS
    from mm_llama.projectors import PROJECTORS
    from mm_llama.train.losses import loss_weights

    if not cfg.stages:
        raise MMInputError("stages: expected at least one stage (e.g. align, instruct), got none")
    for name, spec in cfg.model.modalities.items():
        encoder_cls = ENCODERS.get(spec.encoder.type)
        build_options(encoder_cls.Options, spec.encoder.options, f"model.modalities.{name}.encoder.options")
        projector_cls = PROJECTORS.get(spec.projector.type)
        build_options(
            projector_cls.Options, spec.projector.options, f"model.modalities.{name}.projector.options"
        )
    projector_terms = [
        t for spec in cfg.model.modalities.values() for t in PROJECTORS.get(spec.projector.type).LOSS_TERMS
    ]
    names = list(cfg.stages)
    for i, (name, stage) in enumerate(cfg.stages.items()):
        where = f"stages.{name}"
        if not stage.data:
            raise MMInputError(f"{where}.data: expected at least one data file, got an empty list")
        for key in ("batch_size", "micro_batch_size", "keep_checkpoints", "log_every"):
            if getattr(stage, key) < 1:
                raise MMInputError(f"{where}.{key}: expected a positive integer, got {getattr(stage, key)}")
        if stage.batch_size % stage.micro_batch_size:
            raise MMInputError(
                f"{where}: batch_size ({stage.batch_size}) must be a multiple of micro_batch_size "
                f"({stage.micro_batch_size})"
            )
        if stage.save_every < 0 or stage.save_every_minutes < 0:
            raise MMInputError(
                f"{where}: save_every and save_every_minutes must be >= 0 (0 disables), got "
                f"{stage.save_every} and {stage.save_every_minutes}"
            )
        for modality, weight in stage.modality_weights.items():
            if modality not in cfg.model.modalities:
                raise MMInputError(
                    f"{where}.modality_weights: unknown modality {modality!r}; the model has: "
                    f"{', '.join(cfg.model.modalities)}"
                )
            if not weight > 0:
                raise MMInputError(
                    f"{where}.modality_weights.{modality}: expected > 0 (to leave a modality out, use "
                    f"`only`), got {weight}"
                )
        if stage.cache_media_mb < 0:
            raise MMInputError(
                f"{where}.cache_media_mb: expected >= 0 (0 disables), got {stage.cache_media_mb}"
            )
        if stage.max_steps is None and stage.epochs <= 0:
            raise MMInputError(f"{where}.epochs: expected > 0 (or set max_steps), got {stage.epochs}")
        if stage.max_steps is not None and stage.max_steps < 1:
            raise MMInputError(f"{where}.max_steps: expected >= 1, got {stage.max_steps}")
        if not 0.0 <= stage.warmup_ratio < 1.0:
            raise MMInputError(f"{where}.warmup_ratio: expected a value in [0, 1), got {stage.warmup_ratio}")
        if stage.llm == "full" and cfg.model.llm.quantization != "none":
            raise MMInputError(
                f"{where}.llm: full fine-tuning needs an unquantized LLM, but model.llm.quantization is "
                f"{cfg.model.llm.quantization!r}; use llm: qlora, or quantization: none"
            )
        if stage.objective == "contrastive" and stage.llm != "frozen":
            raise MMInputError(
                f"{where}.llm: the contrastive objective uses the frozen LLM as its text tower; set llm: frozen"
            )
        unknown = [m for m in stage.only or [] if m not in cfg.model.modalities]
        if stage.only is not None and (unknown or not stage.only):
            raise MMInputError(
                f"{where}.only: expected modalities of the model ({', '.join(cfg.model.modalities)}), "
                f"got {stage.only}"
            )
        if stage.contrastive.temperature <= 0:
            raise MMInputError(
                f"{where}.contrastive.temperature: expected > 0, got {stage.contrastive.temperature}"
            )
        loss_weights(stage.objective, stage.loss_terms, projector_terms, f"{where}.loss_terms")
        if stage.init_from in names and names.index(stage.init_from) >= i:
            raise MMInputError(
                f"{where}.init_from: stage {stage.init_from!r} does not run before {name!r}; "
                f"stage order: {', '.join(names)}"
            )


def stage_grad_accumulation(stage: StageConfig, num_processes: int, where: str) -> int:
    """Micro-batches per process per optimizer step, so that the global batch is ``stage.batch_size``."""
    per_step = stage.micro_batch_size * num_processes
    if stage.batch_size % per_step:
        raise MMInputError(
            f"{where}: batch_size ({stage.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({stage.micro_batch_size} x {num_processes} = {per_step})"
        )
    return stage.batch_size // per_step
