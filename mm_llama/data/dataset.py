"""Conversation datasets in the LLaVA format, their collator, and length-grouped batching.

A record (one row of a ``.json`` list, a ``.jsonl`` line or a ``.parquet`` row)::

    {"id": "000123",
     "image": "coco/000123.jpg",                 # or a list of paths, one per <image> marker
     "audio": ["a.wav", "b.wav"],                # any registered modality name works as a key
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Files load with Hugging Face ``datasets`` (memory-mapped Arrow, so LLaVA's 665k records are cheap).
Media paths are resolved under a data root (default: the data file's folder); a missing file raises
an error naming the file, the record id and the path. Each item becomes a processor ``Example``; the
:class:`Collator` pads on the right; :class:`LengthGroupedBatchSampler` yields one process's
micro-batches so that each optimizer step sees the same global batch whatever the number of processes.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from torch.utils.data import Dataset, Sampler

from mm_llama.errors import MissingInputError, MMInputError
from mm_llama.modality import modalities
from mm_llama.processor import Example, MultimodalProcessor, check_labels

logger = logging.getLogger(__name__)

CONVERSATIONS_KEY = "conversations"
ID_KEY = "id"
LOADERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""File suffix -> ``datasets`` builder."""
LABEL_CHECK_RECORDS = 8
"""How many records a training stage decodes at start to check its label mask."""
TOKENS_PER_WORD = 1.3
"""Text length estimate for length grouping (exact tokenization of every record would cost minutes at
LLaVA scale; grouping only needs lengths that sort like the real ones)."""
MEGABATCH_STEPS = 50
"""Length grouping sorts the samples of this many global batches at a time (as transformers'
``LengthGroupedSampler`` does), so batches are homogeneous while their order stays random."""


def load_records(path: str | Path) -> datasets.Dataset:
    """One conversation file as a ``datasets.Dataset``; checks that it has a ``conversations`` column."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"data file not found: {path}")
    builder = LOADERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{path}: unsupported data file type {path.suffix!r}; expected one of {sorted(LOADERS)}"
        )
    try:
        records = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise ValueError(f"{path}: cannot read it as {builder}: {e}") from e
    if CONVERSATIONS_KEY not in records.column_names:
        raise ValueError(
            f"{path}: records need a {CONVERSATIONS_KEY!r} field (LLaVA format); found fields "
            f"{records.column_names}"
        )
    return records


def media_paths(value: Any, where: str, key: str) -> list[str]:
    """A record's media value (absent, one path or a list of paths) as a list of path strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{where}: {key!r} must be a path or a list of paths, got {value!r}")
    return list(items)


def inside_root(root: Path, path: str, where: str, key: str) -> Path:
    """``root / path`` resolved (symlinks followed), refused unless it lies inside ``root``: a record's
    media path cannot reach ``../`` or absolute paths elsewhere, or follow a link out of the data root."""
    base = root.resolve()
    resolved = (base / path).resolve()
    if not resolved.is_relative_to(base):
        raise MMInputError(
            f"{where}: {key} path {path!r} resolves to {resolved}, outside the data root {base}; media "
            "paths must stay inside it (set data_root to a folder that holds them)"
        )
    return resolved


class ConversationDataset(Dataset[Example]):
    """LLaVA-format records from one or more files, tokenized on access by a ``MultimodalProcessor``.

    ``data_root`` resolves relative media paths (default: each file's own folder). ``only`` keeps the
    records whose media are all of these modalities (e.g. one modality's captions out of a mixed file).
    With ``check_media`` (default) every referenced media file is checked once up front, so a missing
    file fails at startup rather than hours into training."""

    def __init__(
        self,
        files: str | Path | Sequence[str | Path],
        processor: MultimodalProcessor,
        data_root: str | Path | None = None,
        check_media: bool = True,
        only: Sequence[str] | None = None,
    ) -> None:
        self.files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not self.files:
            raise ValueError("ConversationDataset: expected at least one data file, got none")
        self.processor = processor
        self._tables = [load_records(f) for f in self.files]
        self._roots = [Path(data_root) if data_root is not None else f.parent for f in self.files]
        known = set(modalities())
        self._media_keys = [[c for c in t.column_names if c in known] for t in self._tables]
        if only is not None:
            self._tables = [
                self._keep_only(t, keys, set(only), str(f))
                for t, keys, f in zip(self._tables, self._media_keys, self.files)
            ]
            if not any(len(t) for t in self._tables):
                raise ValueError(
                    f"{', '.join(map(str, self.files))}: no record has only {', '.join(only)} media "
                    "(the stage's `only` filter)"
                )
        self._offsets = np.cumsum([0] + [len(t) for t in self._tables]).tolist()
        self._lengths: list[int] | None = None
        if check_media:
            self.check_media()

    def __len__(self) -> int:
        return self._offsets[-1]

    @staticmethod
    def _keep_only(
        table: datasets.Dataset, keys: list[str], wanted: set[str], where: str
    ) -> datasets.Dataset:
        """The rows of ``table`` with at least one media item, every one of a ``wanted`` modality."""
        columns = {k: list(table[k]) for k in keys}
        rows = []
        for row in range(len(table)):
            present = {k for k in keys if media_paths(columns[k][row], where, k)}
            if present and present <= wanted:
                rows.append(row)
        return table.select(rows)

    def _row(self, index: int) -> tuple[int, int, dict[str, Any]]:
        """(file number, row in that file, the record) of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} records")
        f = bisect.bisect_right(self._offsets, index) - 1
        row = index - self._offsets[f]
        return f, row, self._tables[f][row]

    def _where(self, f: int, row: int, rec: dict[str, Any]) -> str:
        rid = rec.get(ID_KEY)
        return f"{self.files[f]}:{rid if rid is not None else f'#{row}'}"

    def record(self, index: int) -> dict[str, Any]:
        """The raw record (all its fields, e.g. toy world's ``question_type`` and ``answer``)."""
        return self._row(index)[2]

    def where(self, index: int) -> str:
        """``<file>:<record id>`` for error messages (the row number when a record has no id)."""
        return self._where(*self._row(index))

    def media(self, index: int) -> dict[str, list[str]]:
        """Modality -> absolute media paths of one record, in marker order."""
        f, row, rec = self._row(index)
        return self._resolve(f, rec, self._where(f, row, rec))

    def _resolve(self, f: int, rec: dict[str, Any], where: str) -> dict[str, list[str]]:
        out = {}
        for key in self._media_keys[f]:
            paths = media_paths(rec[key], where, key)
            if paths:
                out[key] = [str(inside_root(self._roots[f], p, where, key)) for p in paths]
        return out

    def check_media(self) -> None:
        """Raise ``FileNotFoundError`` naming the record and path of the first missing media file."""
        for f, table in enumerate(self._tables):
            keys = self._media_keys[f]
            if not keys:
                continue
            ids = list(table[ID_KEY]) if ID_KEY in table.column_names else [None] * len(table)
            columns = {k: list(table[k]) for k in keys}
            for row in range(len(table)):
                for key in keys:
                    rid = ids[row] if ids[row] is not None else f"#{row}"
                    where = f"{self.files[f]}: record {rid!r}"
                    for p in media_paths(columns[key][row], where, key):
                        path = inside_root(self._roots[f], p, where, key)
                        if not path.is_file():
                            raise MissingInputError(
                                f"{self.files[f]}: record {rid!r}: {key} file not found: {path} "
                                f"(media paths are relative to the data root {self._roots[f]})"
                            )

    def __getitem__(self, index: int) -> Example:
        f, row, rec = self._row(index)
        where = self._where(f, row, rec)
        return self.processor(rec[CONVERSATIONS_KEY], self._resolve(f, rec, where), where=where)

    def check_labels(self, records: int = LABEL_CHECK_RECORDS, skip_unreadable: bool = False) -> None:
        """Fail fast (:class:`~mm_llama.errors.LabelMaskError`) when the supervised tokens of the first
        ``records`` records are not exactly their assistant replies plus the end-of-turn tokens (see
        :func:`~mm_llama.processor.check_labels`). ``skip_unreadable`` passes over records whose media
        cannot be read (a stage with ``on_error: skip``) instead of raising."""
        checked = 0
        for index in range(len(self)):
            if checked == records:
                break
            try:
                example = self[index]
            except (MMInputError, OSError):
                if skip_unreadable:
                    continue
                raise
            check_labels(self.processor, self.record(index)[CONVERSATIONS_KEY], example, self.where(index))
            checked += 1

    @property
    def lengths(self) -> list[int]:
        """Estimated token count of every record: text words x ``TOKENS_PER_WORD`` plus each media item's
        placeholder count (measured on the first item of each modality; exact for fixed-size media)."""
        if self._lengths is None:
            self._lengths = self._estimate_lengths()
        return self._lengths

    def _estimate_lengths(self) -> list[int]:
        per_item: dict[str, int] = {}
        lengths: list[int] = []
        for f, table in enumerate(self._tables):
            keys = self._media_keys[f]
            columns = {k: list(table[k]) for k in keys}
            for row, conversation in enumerate(table[CONVERSATIONS_KEY]):
                words = sum(
                    len(str(turn.get("value", turn.get("content", ""))).split()) for turn in conversation
                )
                n = math.ceil(words * TOKENS_PER_WORD)
                for key in keys:
                    paths = media_paths(columns[key][row], str(self.files[f]), key)
                    if paths and key not in per_item and key in self.processor.handlers:
                        _, per_item[key] = self.processor.handlers[key](str(self._roots[f] / paths[0]))
                    n += len(paths) * per_item.get(key, 0)
                lengths.append(n)
        return lengths


class Collator:
    """Pads examples on the right (``processor.collate``). Modalities in ``feature_modalities`` carry
    precomputed encoder features (a feature cache): they move from ``media`` to ``features``."""

    def __init__(self, processor: MultimodalProcessor, feature_modalities: Sequence[str] = ()) -> None:
        self.processor = processor
        self.feature_modalities = tuple(feature_modalities)

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = self.processor.collate(examples, padding_side="right")
        batch["features"] = {m: batch["media"].pop(m) for m in self.feature_modalities if m in batch["media"]}
        return batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """One process's micro-batches, in training order, for one epoch at a time.

    Each optimizer step consumes one global batch of ``micro_batch_size * accumulation *
    num_processes`` samples. An epoch is a permutation seeded by ``(seed, epoch)``, wrapped around so
    that it fills whole global batches. With ``group_by_length``, the samples of ``MEGABATCH_STEPS``
    global batches at a time are sorted by length and cut into global batches, whose order is then
    shuffled. Each global batch is sorted by length and cut into micro-batches; micro-batch ``k`` goes
    to process ``k % num_processes`` as its ``k // num_processes``-th accumulation step. The global
    batches therefore do not depend on the number of processes, and a run resumes mid-epoch with
    ``set_epoch(epoch, start_step)``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        accumulation: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
    ) -> None:
        if not lengths:
            raise ValueError("LengthGroupedBatchSampler: the dataset is empty")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        self.lengths = np.asarray(lengths)
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.group_by_length = group_by_length
        self.global_batch_size = micro_batch_size * accumulation * num_processes
        self.steps_per_epoch = math.ceil(len(self.lengths) / self.global_batch_size)
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (its seeded order) and skip its first ``start_step`` optimizer steps."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches, each sorted by decreasing length when grouping."""
        rng = np.random.default_rng([self.seed, epoch])
        n, size = len(self.lengths), self.global_batch_size
        order = rng.permutation(n)
        order = np.resize(order, self.steps_per_epoch * size)  # wrap around to fill the last batch
        if not self.group_by_length:
            return list(order.reshape(self.steps_per_epoch, size))
        mega = size * MEGABATCH_STEPS
        batches = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += list(chunk.reshape(-1, size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def step_micro_batches(self, batch: np.ndarray) -> list[list[int]]:
        """This process's micro-batches of one global batch, in accumulation order."""
        if self.group_by_length:
            batch = batch[np.argsort(-self.lengths[batch], kind="stable")]
        micro = batch.reshape(-1, self.micro_batch_size)  # (accumulation * processes, micro)
        return [micro[k].tolist() for k in range(self.process_index, len(micro), self.num_processes)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch)[self.start_step :]:
            yield from self.step_micro_batches(batch)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation
