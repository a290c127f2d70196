"""A stage's data: its dataset, seeded length-grouped sampler and loader, and the feature cache.

With the stage's ``on_error: skip``, a record whose media file is missing is left out when the dataset is
built (the sampler never sees it), and a record that fails when it is read (undecodable media, an invalid
conversation) comes back as a :class:`SkippedRecord` that :class:`SkippingCollator` drops; every skip is
counted by reason in the batch (``batch["skipped"]``), which the loop sums, logs and writes to
``train_log.json``. With ``on_error: raise`` the error names the record (``file:id``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from mm_llama.data.dataset import Collator, ConversationDataset, LengthGroupedBatchSampler
from mm_llama.data.feature_cache import (
    cache_features,
    cached_processor,
    frozen_modalities,
    memoized_processor,
)
from mm_llama.errors import ConversationError, MMInputError, name_error
from mm_llama.model import MultimodalLM
from mm_llama.train.config import TrainConfig

logger = logging.getLogger(__name__)

SKIP_ERRORS = (MMInputError, FileNotFoundError, ValueError)
"""What a record may raise that ``on_error: skip`` skips (anything else is a bug and propagates)."""
SKIPPED_KEY = "skipped"
"""The batch key (and ``train_log.json`` key) of the skip counts by reason."""
SKIPPED_WHERE_KEY = "skipped_records"
"""The batch key of the skipped records, ``(file:id, reason, message)`` each, for the log."""


def skip_reason(error: BaseException) -> str:
    """The reason a skipped record is counted under."""
    if isinstance(error, FileNotFoundError):
        return "missing_file"
    if isinstance(error, ConversationError):
        return "invalid_record"
    if isinstance(error, MMInputError):
        return "bad_input"
    return "invalid_record"


@dataclass
class SkippedRecord:
    """What :class:`StageDataset` returns in place of a record it could not read (``on_error: skip``)."""

    where: str
    reason: str
    message: str


class StageDataset(Dataset):
    """The stage's records (``base``, minus those with missing media under ``skip``), each repeated as its
    modality weight says (``weights``; see ``StageConfig.modality_weights``, drawn with ``seed``), read
    with the stage's ``on_error`` policy."""

    def __init__(
        self,
        base: ConversationDataset,
        on_error: str,
        weights: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.base = base
        self.on_error = on_error
        self.indices = list(range(len(base)))
        self.missing: list[SkippedRecord] = []
        if on_error == "skip":
            unusable = {}
            for index, error in base.media_errors():
                unusable[index] = error
                self.missing.append(SkippedRecord(base.where(index), skip_reason(error), str(error)))
            if unusable:
                self.indices = [i for i in self.indices if i not in unusable]
            if not self.indices:
                raise MMInputError(
                    f"{', '.join(map(str, base.files))}: every record was skipped (on_error: skip); first: "
                    f"{self.missing[0].where}: {self.missing[0].message}"
                )
        if weights:
            w = base.modality_weights(weights)[self.indices]
            whole = np.floor(w)
            extra = np.random.default_rng(seed).random(len(w)) < w - whole
            self.indices = np.repeat(self.indices, (whole + extra).astype(int)).tolist()
            if not self.indices:
                raise MMInputError(
                    f"{', '.join(map(str, base.files))}: modality_weights {weights} left no record to train on"
                )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> list[int]:
        lengths = self.base.lengths
        return [lengths[i] for i in self.indices]

    def __getitem__(self, index: int) -> Any:
        i = self.indices[index]
        try:
            return self.base[i]
        except SKIP_ERRORS as e:
            where = self.base.where(i)
            if self.on_error == "skip":
                return SkippedRecord(where, skip_reason(e), str(e))
            named = name_error(e, where)
            if named is e:
                raise
            raise named from e


class SkippingCollator:
    """Drops :class:`SkippedRecord` items, collates the rest (``None`` when none is left) and reports the
    skips in ``batch["skipped"]`` / ``batch["skipped_records"]``."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        skipped = [e for e in examples if isinstance(e, SkippedRecord)]
        kept = [e for e in examples if not isinstance(e, SkippedRecord)]
        batch = self.collator(kept) if kept else {"empty": True}
        batch[SKIPPED_KEY] = dict(Counter(s.reason for s in skipped))
        batch[SKIPPED_WHERE_KEY] = [(s.where, s.reason, s.message) for s in skipped]
        return batch


def stage_data(
    cfg: TrainConfig, name: str, accelerator: Accelerator, model: MultimodalLM, accumulation: int
) -> tuple[LengthGroupedBatchSampler, DataLoader]:
    """The stage's sampler and loader; frozen encoders read from the feature cache when one is set (the
    main process fills it first)."""
    stage = cfg.stages[name]
    skip = stage.on_error == "skip"
    processor, feature_modalities = model.processor, []
    if stage.feature_cache is not None:
        feature_modalities = [m for m in frozen_modalities(model) if stage.only is None or m in stage.only]
        with accelerator.main_process_first():
            cache = cache_features(
                model, stage.data, stage.feature_cache, stage.data_root, feature_modalities
            )
        processor = cached_processor(model, cache, feature_modalities)
    if stage.cache_media_mb > 0:
        read = [m for m in processor.handlers if m not in feature_modalities]
        processor = memoized_processor(processor, read, int(stage.cache_media_mb * 2**20))
    with accelerator.main_process_first():  # the main process writes the index cache, the others read it
        base = ConversationDataset(
            stage.data, processor, data_root=stage.data_root, only=stage.only, check_media=not skip
        )
    base.check_labels(skip_unreadable=skip)
    dataset = StageDataset(base, stage.on_error, stage.modality_weights, cfg.seed)
    if dataset.missing and accelerator.is_main_process:
        for s in dataset.missing:
            logger.warning("%s: skipping %s (%s): %s", name, s.where, s.reason, s.message)
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
        collate_fn=SkippingCollator(Collator(processor, feature_modalities)),
        num_workers=stage.num_workers,
        persistent_workers=stage.num_workers > 0,  # workers keep their media memo between epochs
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # iterators never draw from the global RNG
    )
    return sampler, loader
