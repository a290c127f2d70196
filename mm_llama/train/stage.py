"""Build the model a stage trains: its config, its starting weights, adapters and freezing.

The model is rebuilt for every stage from ``TrainConfig.model`` with the stage's template and maximum
length (and the LLM in 4 bits for ``qlora``), seeded so that the same config always builds the same
weights. ``init_from`` then loads a saved model's projectors and trained encoders (stage 2 starts from
stage 1's projectors) and, from a full fine-tune's folder, its ``llm/`` in place of ``model.llm``; a full
fine-tune of a half-precision LLM trains a float32 master copy (:func:`fp32_master`). Every projector's ``prepare`` hook runs (e.g. ``word_mix`` takes its vocabulary
from the stage's captions), LoRA adapters are added, and :func:`~mm_llama.train.freeze.freeze_for_stage`
decides what trains.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

from accelerate.utils import set_seed
from peft import PeftModel

from mm_llama.config import ModelConfig
from mm_llama.data.dataset import CONVERSATIONS_KEY, ConversationDataset
from mm_llama.errors import MissingInputError
from mm_llama.llm import load_tokenizer
from mm_llama.model import MultimodalLM
from mm_llama.model_io import ADAPTER_DIR, ENCODERS_DIR, LLM_DIR, PROJECTORS_FILE
from mm_llama.processor import normalize_messages
from mm_llama.projectors.base import ProjectorContext
from mm_llama.train.config import StageConfig, TrainConfig
from mm_llama.train.freeze import freeze_for_stage
from mm_llama.train.lora import add_lora, enable_gradient_checkpointing

logger = logging.getLogger(__name__)

HALF_DTYPES = ("bfloat16", "float16")


def stage_model_config(cfg: TrainConfig, name: str) -> ModelConfig:
    """``cfg.model`` with the stage's template and max length, and 4-bit NF4 loading for ``qlora``."""
    stage = cfg.stages[name]
    llm = replace(cfg.model.llm, quantization="nf4") if stage.llm == "qlora" else cfg.model.llm
    max_length = stage.max_length if stage.max_length is not None else cfg.model.max_length
    return replace(cfg.model, llm=llm, template=stage.template, max_length=max_length)


def stage_dir(cfg: TrainConfig, name: str) -> Path:
    """Where a stage writes its model, checkpoints and logs: ``<output_dir>/<stage>``."""
    return Path(cfg.output_dir) / name


def resolve_init_from(cfg: TrainConfig, name: str) -> Path | None:
    """The folder a stage starts from: an earlier stage's output folder (by stage name) or a path."""
    init = cfg.stages[name].init_from
    if init is None:
        return None
    path = stage_dir(cfg, init) if init in cfg.stages else Path(init)
    if not (path / PROJECTORS_FILE).is_file():
        raise MissingInputError(
            f"stages.{name}.init_from: {path} is not a saved model ({PROJECTORS_FILE} not found); "
            "train the earlier stage first or fix the path"
        )
    return path


def load_saved_parts(model: MultimodalLM, path: Path) -> None:
    """Load the projectors and encoder weights that ``save_pretrained`` wrote into ``path``. A modality
    that the saved model lacks keeps its fresh projector (a warning says so)."""
    model.load_trained_parts(path, missing_projectors_ok=True)
    logger.info(
        "initialised projectors%s from %s", " and encoders" if (path / ENCODERS_DIR).is_dir() else "", path
    )


def stage_replies(model: MultimodalLM, stage: StageConfig, modality: str) -> Iterator[list[str]]:
    """The assistant replies of each record of the stage's data that holds ``modality`` media, one list
    per record in data order (every record of the data files, whatever the stage's ``only``)."""
    dataset = ConversationDataset(stage.data, model.processor, data_root=stage.data_root, check_media=False)
    for i in range(len(dataset)):
        if modality not in dataset.media(i):
            continue
        messages = normalize_messages(dataset.record(i)[CONVERSATIONS_KEY], dataset.where(i))
        yield [m["content"] for m in messages if m["role"] == "assistant"]


def prepare_projectors(model: MultimodalLM, stage: StageConfig, name: str) -> None:
    """Call every projector's ``prepare`` hook with the stage's context (the data is read only if a hook
    iterates ``context.replies()``)."""
    embeddings = model.llm.get_input_embeddings()
    for modality, projector in model.projectors.items():
        context = ProjectorContext(
            modality=modality,
            stage=name,
            tokenizer=model.tokenizer,
            input_embeddings=embeddings,
            read_replies=partial(stage_replies, model, stage, modality),
            log=partial(_log_for_stage, name),
        )
        projector.prepare(context)


def _log_for_stage(name: str, message: str) -> None:
    logger.info("stages.%s: %s", name, message)


def fp32_master(cfg: TrainConfig, name: str) -> str | None:
    """The half dtype (``bfloat16`` / ``float16``) that a stage fine-tuning the LLM fully was configured
    with, or ``None``. Such a stage keeps the LLM's weights (and so AdamW's state) in float32 and
    autocasts its forward pass to that dtype: AdamW on half-precision weights would round small updates
    away. The saved ``llm/`` is cast back to the configured dtype."""
    dtype = cfg.model.llm.dtype
    return dtype if cfg.stages[name].llm == "full" and dtype in HALF_DTYPES else None


def build_stage_model(cfg: TrainConfig, name: str) -> MultimodalLM:
    """The model of stage ``name``, initialised, adapted and frozen for training. When ``init_from`` is a
    full fine-tune (its folder holds ``llm/``), the stage's LLM is that one, not ``model.llm`` (in 4 bits
    for ``qlora``)."""
    stage = cfg.stages[name]
    set_seed(cfg.seed)
    config = stage_model_config(cfg, name)
    init = resolve_init_from(cfg, name)
    tokenizer = None
    if init is not None and (init / LLM_DIR).is_dir():
        tokenizer = load_tokenizer(config.llm)  # the run's tokenizer, as the earlier stage had it
        llm = replace(config.llm, name_or_path=str((init / LLM_DIR).resolve()), from_config=None)
        config = replace(config, llm=llm)
        logger.info("stages.%s: the LLM starts from %s's fine-tuned copy, %s", name, init, llm.name_or_path)
    if fp32_master(cfg, name):
        model = MultimodalLM(replace(config, llm=replace(config.llm, dtype="float32")), tokenizer=tokenizer)
        model.config = config  # what the saved llm/ is cast back to
    else:
        model = MultimodalLM(config, tokenizer=tokenizer)
    adapter = init / ADAPTER_DIR if init is not None and (init / ADAPTER_DIR).is_dir() else None
    if init is not None:
        load_saved_parts(model, init)
    prepare_projectors(model, stage, name)
    if stage.gradient_checkpointing and stage.llm != "qlora":
        enable_gradient_checkpointing(model)
    if stage.llm in ("lora", "qlora"):
        add_lora(model, stage, adapter)
    elif adapter is not None:
        if stage.llm == "full":
            raise ValueError(
                f"stages.{name}: init_from {init} holds a LoRA adapter, which full fine-tuning cannot "
                "continue; export a merged model first and point model.llm at it"
            )
        model.llm = PeftModel.from_pretrained(model.llm, adapter)
    freeze_for_stage(model, stage)
    return model
