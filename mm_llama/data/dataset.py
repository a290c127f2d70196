"""Conversation datasets in the LLaVA format, their collator, and length-grouped batching.

A record (one row of a ``.json`` list, a ``.jsonl`` line or a ``.parquet`` row)::

    {"id": "000123",                             # ints are read as strings ("123")
     "image": "coco/000123.jpg",                 # or a list of paths, one per <image> marker
     "audio": ["a.wav", "b.wav"],                # any registered modality name works as a key
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Files are read into Arrow tables and indexed (text lengths, media items, the media check) once; both are
cached beside the data file and memory-mapped by later builds and the other processes of a run (see
:mod:`mm_llama.data.records`), so LLaVA's 665k records cost seconds, not minutes, at start.
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

import numpy as np
import pyarrow as pa
from torch.utils.data import Dataset, Sampler

from mm_llama.data.records import (
    CONVERSATIONS_KEY,
    ID_KEY,
    FileIndex,
    load_indexed,
    open_records,
    record_at,
)
from mm_llama.errors import MissingInputError, MMInputError, name_error
from mm_llama.modality import modalities
from mm_llama.processor import Example, MultimodalProcessor, check_labels

logger = logging.getLogger(__name__)

LABEL_CHECK_RECORDS = 8
"""How many records a training stage decodes at start to check its label mask."""
MEGABATCH_STEPS = 50
"""Length grouping sorts the samples of this many global batches at a time (as transformers'
``LengthGroupedSampler`` does), so batches are homogeneous while their order stays random."""


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
    With ``check_media`` (default) every referenced media file is checked up front, so a missing file
    fails at startup rather than hours into training. ``index_cache`` reads and writes each file's
    records and index beside it (:mod:`mm_llama.data.records`); a distributed run builds the dataset on
    the main process first so that the others read the cache."""

    def __init__(
        self,
        files: str | Path | Sequence[str | Path],
        processor: MultimodalProcessor,
        data_root: str | Path | None = None,
        check_media: bool = True,
        only: Sequence[str] | None = None,
        index_cache: bool = True,
    ) -> None:
        self.files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not self.files:
            raise ValueError("ConversationDataset: expected at least one data file, got none")
        self.processor = processor
        self._roots = [Path(data_root) if data_root is not None else f.parent for f in self.files]
        self._resolved: dict[tuple[int, str], str] = {}
        """(file, media path) -> the path ``inside_root`` accepted: resolving (following links on disk)
        took about a quarter of a millisecond a path, every epoch."""
        known = modalities()
        loaded = [load_indexed(f, r, known, index_cache) for f, r in zip(self.files, self._roots)]
        self._tables: list[pa.Table] = [t for t, _ in loaded]
        self.indexes: list[FileIndex] = [i for _, i in loaded]
        """Each file's index (``from_cache`` says whether it was read back)."""
        self._media_keys = [list(i.items) for i in self.indexes]
        self._rows = [np.arange(t.num_rows) for t in self._tables]
        """The file rows each file contributes, in order (all of them unless ``only`` filters)."""
        if only is not None:
            self._rows = [self._keep_only(f, set(only)) for f in range(len(self.files))]
            if not any(len(r) for r in self._rows):
                raise ValueError(
                    f"{', '.join(map(str, self.files))}: no record has only {', '.join(only)} media "
                    "(the stage's `only` filter)"
                )
        self._offsets = np.cumsum([0] + [len(r) for r in self._rows]).tolist()
        self._lengths: list[int] | None = None
        if check_media:
            self.check_media()

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        # memory-mapped tables travel as their file's path (a spawned worker maps it again)
        state = self.__dict__.copy()
        state["_tables"] = [i.records_file or t for t, i in zip(self._tables, self.indexes)]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tables = [open_records(t) if isinstance(t, str) else t for t in self._tables]

    @property
    def index_from_cache(self) -> bool:
        """Whether every file's records and index were read from the cache beside it."""
        return all(i.from_cache for i in self.indexes)

    def _keep_only(self, f: int, wanted: set[str]) -> np.ndarray:
        """The rows of file ``f`` with at least one media item, every one of a ``wanted`` modality."""
        index = self.indexes[f]
        if index.invalid:
            row, why = next(iter(sorted(index.invalid.items())))
            raise ValueError(f"{self._where(f, row, self._record(f, row))}: {why}")
        rows = len(index.text_tokens)
        present = np.zeros(rows, dtype=bool)
        unwanted = np.zeros(rows, dtype=bool)
        for key, items in index.items.items():
            present |= items > 0
            if key not in wanted:
                unwanted |= items > 0
        return np.flatnonzero(present & ~unwanted)

    def _record(self, f: int, row: int) -> dict[str, Any]:
        return record_at(self._tables[f], row)

    def _row(self, index: int) -> tuple[int, int, dict[str, Any]]:
        """(file number, row in that file, the record) of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} records")
        f = bisect.bisect_right(self._offsets, index) - 1
        row = int(self._rows[f][index - self._offsets[f]])
        return f, row, self._record(f, row)

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
        return self._resolve(f, row, rec, self._where(f, row, rec))

    def _resolve(self, f: int, row: int, rec: dict[str, Any], where: str) -> dict[str, list[str]]:
        if row in self.indexes[f].invalid:
            raise ValueError(f"{where}: {self.indexes[f].invalid[row]}")
        out = {}
        for key in self._media_keys[f]:
            paths = media_paths(rec[key], where, key)
            if paths:
                out[key] = [self._resolve_path(f, p, where, key) for p in paths]
        return out

    def _resolve_path(self, f: int, path: str, where: str, key: str) -> str:
        resolved = self._resolved.get((f, path))
        if resolved is None:
            resolved = self._resolved[(f, path)] = str(inside_root(self._roots[f], path, where, key))
        return resolved

    def _check_record(self, f: int, row: int) -> None:
        """Raise what is wrong with one record's media: an invalid value (``ValueError``), a path outside
        the data root (``MMInputError``) or a missing file (``MissingInputError``)."""
        rec = self._record(f, row)
        rid = rec.get(ID_KEY) if rec.get(ID_KEY) is not None else f"#{row}"
        where = f"{self.files[f]}: record {rid!r}"
        if row in self.indexes[f].invalid:
            raise ValueError(f"{where}: {self.indexes[f].invalid[row]}")
        for key in self._media_keys[f]:
            for p in media_paths(rec[key], where, key):
                path = inside_root(self._roots[f], p, where, key)
                if not path.is_file():
                    raise MissingInputError(
                        f"{self.files[f]}: record {rid!r}: {key} file not found: {path} "
                        f"(media paths are relative to the data root {self._roots[f]})"
                    )

    def media_errors(self) -> Iterator[tuple[int, Exception]]:
        """(dataset index, error) of each record whose media cannot be used, in order: the records the
        index flagged, checked again now (a file added since the index was built passes)."""
        for f, index in enumerate(self.indexes):
            flagged = np.union1d(index.suspects, np.fromiter(index.invalid, dtype=np.int64))
            kept = self._rows[f]
            positions = np.searchsorted(kept, flagged)
            for position, row in zip(positions, flagged):
                if position < len(kept) and kept[position] == row:
                    try:
                        self._check_record(f, int(row))
                    except (MMInputError, ValueError) as e:  # MissingInputError is an MMInputError
                        yield self._offsets[f] + int(position), e

    def check_media(self) -> None:
        """Raise the error of the first record whose media cannot be used (``FileNotFoundError`` naming
        the record and path of a missing file)."""
        for _, error in self.media_errors():
            raise error

    def __getitem__(self, index: int) -> Example:
        f, row, rec = self._row(index)
        where = self._where(f, row, rec)
        return self.processor(rec[CONVERSATIONS_KEY], self._resolve(f, row, rec, where), where=where)

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
            except (MMInputError, OSError) as e:
                if skip_unreadable:
                    continue
                named = name_error(e, self.where(index))
                if named is e:
                    raise
                raise named from e
            check_labels(self.processor, self.record(index)[CONVERSATIONS_KEY], example, self.where(index))
            checked += 1

    @property
    def lengths(self) -> list[int]:
        """Estimated token count of every record: its text tokens (words x ``TOKENS_PER_WORD``, from the
        index) plus each media item's placeholder count (measured on the first item of each modality;
        exact for fixed-size media)."""
        if self._lengths is None:
            self._lengths = self._estimate_lengths()
        return self._lengths

    def _per_item_tokens(self) -> dict[str, int]:
        """Modality -> placeholder tokens of its first media item in the data (through the processor)."""
        per_item: dict[str, int] = {}
        for f, index in enumerate(self.indexes):
            rows = self._rows[f]
            for key, items in index.items.items():
                if key in per_item or key not in self.processor.handlers:
                    continue
                having = rows[items[rows] > 0]
                if len(having):
                    row = int(having[0])
                    first = media_paths(self._record(f, row)[key], self._where(f, row, {}), key)[0]
                    _, per_item[key] = self.processor.handlers[key](str(self._roots[f] / first))
        return per_item

    def modality_weights(self, weights: dict[str, float]) -> np.ndarray:
        """Each record's weight: the largest of ``weights`` over its media's modalities (1 for a modality
        not in ``weights`` and for a record without media)."""
        parts = []
        for f, index in enumerate(self.indexes):
            rows = self._rows[f]
            weight = np.zeros(len(rows))
            listed = np.zeros(len(rows), dtype=bool)
            for key, items in index.items.items():
                has = items[rows] > 0
                w = weights.get(key, 1.0)
                weight = np.where(has, np.maximum(weight, w), weight)
                listed |= has
            parts.append(np.where(listed, weight, 1.0))
        return np.concatenate(parts)

    def _estimate_lengths(self) -> list[int]:
        per_item = self._per_item_tokens()
        parts = []
        for f, index in enumerate(self.indexes):
            rows = self._rows[f]
            n = index.text_tokens[rows].copy()
            for key, items in index.items.items():
                n += items[rows] * per_item.get(key, 0)
            parts.append(n)
        return np.concatenate(parts).tolist()


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
