"""A stage's data: its dataset, seeded length-grouped sampler and loader, and the feature cache."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mm_llama.data.dataset import Collator, ConversationDataset, LengthGroupedBatchSampler
from mm_llama.data.feature_cache import cache_features, cached_processor, frozen_modalities
from mm_llama.model import MultimodalLM
from mm_llama.train.config import TrainConfig


def stage_data(
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
