"""Conversation files as Arrow tables, and their index, cached beside the data file.

At LLaVA scale (``llava_v1_5_mix665k.json``: 665k records, about 1 GB of JSON, some 380k images) what
a dataset does at start costs minutes when done row by row in Python, in every process of a run. Here
a file is parsed once, normalised (record ids become strings: LLaVA's files mix ints and strings, which
Arrow cannot hold in one column; a single media path becomes a one-item list), and made an Arrow table;
its index is computed column by column:

- ``text_tokens``: each record's text length estimate, ``ceil(words * TOKENS_PER_WORD)`` over all its
  turns, words split as ``str.split()`` does (numpy over the UTF-8 bytes of ASCII text, Arrow's
  Unicode-aware split for the rest);
- ``items``: the number of media items of each modality in each record (what the processor's per-item
  token counts multiply, when the dataset composes lengths; they are not part of the index, so one
  index serves every processor);
- ``suspects``: the records whose media failed a fast check of each distinct path once (inside the
  data root, a regular file). They are checked again, exactly, whenever a dataset is built, so a file
  added since is found and the error names the record as it always did.

Table and index are written to ``<data file>.mm_llama/`` beside the data file (the table takes about
as much disk as the JSON), keyed by the file's size, modification time and inode, the resolved data
root and the modality names; the next build, and every other process of a distributed run (the main
process builds first), reads them back, the table memory-mapped. A media file deleted after the index
was built is found when its record is read. A folder where the cache cannot be written (read-only
data) means a warning and a full build each time.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mm_llama.errors import MissingInputError

logger = logging.getLogger(__name__)

CONVERSATIONS_KEY = "conversations"
ID_KEY = "id"
SUFFIXES = (".json", ".jsonl", ".parquet")
TOKENS_PER_WORD = 1.3
"""Text length estimate for length grouping (exact tokenization of every record would cost minutes at
LLaVA scale; grouping only needs lengths that sort like the real ones)."""
CACHE_SUFFIX = ".mm_llama"
"""The cache folder of ``data.json`` is ``data.json.mm_llama/``, beside it."""
INDEX_VERSION = 1
RECORDS_FILE = "records.arrow"
ARRAYS_FILE = "index.npz"
INDEX_FILE = "index.json"
"""Written last: a reader trusts the folder only when this file's key matches."""


@dataclass
class FileIndex:
    """What a dataset needs of one data file at start (see the module docstring)."""

    text_tokens: np.ndarray
    """(rows,) int64."""
    items: dict[str, np.ndarray] = field(default_factory=dict)
    """Media column -> (rows,) int64 items per record."""
    suspects: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Sorted rows whose media failed the fast check (checked again exactly by the dataset)."""
    invalid: dict[int, str] = field(default_factory=dict)
    """Row -> why its media value is neither a path nor a list of paths (the value reads as absent)."""
    distinct_media: int = 0
    """Distinct media paths the check looked at."""
    from_cache: bool = False
    records_file: str | None = None
    """The Arrow file the table is memory-mapped from (``None``: held in memory); a pickled dataset
    (a spawned DataLoader worker) maps it again instead of carrying the table."""


def file_key(path: Path, root: Path, modalities: Iterable[str]) -> dict[str, Any]:
    """What a cached index depends on: the file's contents (size, mtime, inode), the data root, the
    modalities."""
    st = path.stat()
    return {
        "version": INDEX_VERSION,
        "file": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,  # a file replaced whole within one clock tick still differs
        "data_root": str(root.resolve()),
        "modalities": sorted(modalities),
        "tokens_per_word": TOKENS_PER_WORD,
    }


def cache_dir(path: Path) -> Path:
    return path.parent / f"{path.name}{CACHE_SUFFIX}"


def load_indexed(
    path: str | Path, root: str | Path, modalities: Iterable[str], cache: bool = True
) -> tuple[pa.Table, FileIndex]:
    """The records of one conversation file and its index, from the cache beside it when that is
    current; otherwise read, indexed and (with ``cache``) written there for the next build."""
    path, root, modalities = Path(path), Path(root), sorted(modalities)
    if not path.is_file():
        raise MissingInputError(f"data file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(
            f"{path}: unsupported data file type {path.suffix!r}; expected one of {sorted(SUFFIXES)}"
        )
    key = file_key(path, root, modalities)
    if cache:
        cached = read_cache(path, key)
        if cached is not None:
            return cached
    table, invalid = read_table(path, set(modalities))
    index = build_index(table, root, set(modalities), invalid)
    if cache:
        try:
            write_cache(path, key, table, index)
        except OSError as e:  # a read-only data folder: every build indexes again
            logger.warning(
                "%s: cannot write the dataset index beside it (%s); it is rebuilt each time", path, e
            )
        else:  # map the written table: its memory is then the page cache's, shared by every process
            index.records_file = str(cache_dir(path) / RECORDS_FILE)
            table = open_records(index.records_file)
    return table, index


def open_records(path: str) -> pa.Table:
    """A cached records file, memory-mapped."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def read_table(path: Path, modalities: set[str]) -> tuple[pa.Table, dict[int, str]]:
    """One file's records as a normalised Arrow table, and the rows whose media values are invalid."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        table, invalid = _normalise_columns(pq.read_table(path), modalities, path), {}
    else:
        rows = _parse_json(path, suffix == ".jsonl")
        invalid = _normalise_rows(rows, modalities, path)
        try:
            table = pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})  # keys of all rows
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(
                f"{path}: its records do not make one table: {e} (a field other than {ID_KEY!r} and the "
                "media paths holds values of different types in different records)"
            ) from e
        del rows
    if CONVERSATIONS_KEY not in table.column_names:
        raise ValueError(
            f"{path}: records need a {CONVERSATIONS_KEY!r} field (LLaVA format); found fields {table.column_names}"
        )
    return table, invalid


def _parse_json(path: Path, lines: bool) -> list[Any]:
    raw = path.read_bytes()
    if lines:
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(orjson.loads(line))
                except orjson.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: cannot read it as JSON: {e}") from e
        return rows
    try:
        rows = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{path}: cannot read it as JSON: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records, found a {type(rows).__name__}")
    return rows


def _normalise_rows(rows: list[Any], modalities: set[str], path: Path) -> dict[int, str]:
    """In place: ids to strings, a media path to a one-item list; invalid media values to ``None``
    (returned by row, with why)."""
    invalid: dict[int, str] = {}
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}: record #{n} is a {type(row).__name__}, expected an object with {CONVERSATIONS_KEY!r}"
            )
        rid = row.get(ID_KEY)
        if rid is not None and not isinstance(rid, str):
            row[ID_KEY] = str(rid)
        for key in modalities & row.keys():
            value = row[key]
            if isinstance(value, str):
                row[key] = [value]
            elif value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                invalid[n] = f"{key!r} must be a path or a list of paths, got {value!r}"
                row[key] = None
    return invalid


def _normalise_columns(table: pa.Table, modalities: set[str], path: Path) -> pa.Table:
    """A parquet table's ids as strings and single media paths as one-item lists."""
    for name in table.column_names:
        column = table.column(name)
        if name == ID_KEY and not pa.types.is_string(column.type):
            column = pc.cast(column, pa.string())
        elif name in modalities:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                flat = pc.cast(column.combine_chunks(), pa.string())
                offsets = pa.array(np.arange(len(flat) + 1, dtype=np.int32))
                column = pa.ListArray.from_arrays(offsets, flat, mask=pc.is_null(flat))
            elif not (pa.types.is_list(column.type) and pa.types.is_string(column.type.value_type)):
                raise ValueError(
                    f"{path}: column {name!r} must hold paths or lists of paths, found {column.type}"
                )
        else:
            continue
        table = table.set_column(table.column_names.index(name), name, column)
    return table


def build_index(table: pa.Table, root: Path, modalities: set[str], invalid: dict[int, str]) -> FileIndex:
    """The index of one normalised table (column-wise; each distinct media path is checked once)."""
    keys = [c for c in table.column_names if c in modalities]
    items = {
        k: pc.fill_null(pc.list_value_length(table.column(k)), 0).to_numpy().astype(np.int64) for k in keys
    }
    suspects, distinct = _check_media(table, keys, root)
    return FileIndex(
        text_tokens=text_tokens(table.column(CONVERSATIONS_KEY)),
        items=items,
        suspects=suspects,
        invalid=invalid,
        distinct_media=distinct,
    )


def text_tokens(conversations: pa.ChunkedArray) -> np.ndarray:
    """``ceil(words * TOKENS_PER_WORD)`` per record, words of every turn's ``value`` (or ``content``)."""
    words = []
    for chunk in conversations.chunks:
        if not (pa.types.is_list(chunk.type) and pa.types.is_struct(chunk.type.value_type)):
            raise ValueError(f"{CONVERSATIONS_KEY!r} must be a list of turns (objects), found {chunk.type}")
        turns = pc.list_flatten(chunk)
        names = [n for n in ("value", "content") if chunk.type.value_type.get_field_index(n) >= 0]
        counts = np.zeros(len(turns), dtype=np.int64)
        if names:
            fields = [pc.cast(pc.struct_field(turns, n), pa.string()) for n in names]
            counts = word_counts(pc.coalesce(*fields) if len(fields) > 1 else fields[0])
        parents = pc.list_parent_indices(chunk).to_numpy()
        words.append(np.bincount(parents, weights=counts, minlength=len(chunk)))
    total = np.concatenate(words) if words else np.zeros(0)
    return np.ceil(total * TOKENS_PER_WORD).astype(np.int64)


ASCII_SPACE = np.zeros(256, dtype=bool)
ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
"""The bytes ``str.split()`` splits on that are single UTF-8 bytes (tab to CR, FS to US, space)."""
WORD_COUNT_BYTES = 1 << 26
"""Strings are counted in spans of about this many bytes (bounds the temporary arrays)."""


def word_counts(texts: pa.Array) -> np.ndarray:
    """``len(s.split())`` of each string (0 for null). Pure-ASCII strings are counted with numpy on the
    UTF-8 bytes (a word starts at a non-space byte after a space or at the string's start); the others,
    which may hold Unicode spaces, with Arrow's Unicode-aware ``utf8_split_whitespace``."""
    texts = pc.cast(texts, pa.string())
    n = len(texts)
    counts = np.zeros(n, dtype=np.int64)
    if n == 0:
        return counts
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32)[texts.offset : texts.offset + n + 1]
    data = texts.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    unicode: list[np.ndarray] = []
    first = 0
    while first < n:
        last = int(np.searchsorted(offsets, offsets[first] + WORD_COUNT_BYTES, side="right")) - 1
        last = min(max(last, first + 1), n)  # strings [first, last)
        lo = int(offsets[first])
        starts = offsets[first:last] - lo
        nonempty = np.flatnonzero(offsets[first + 1 : last + 1] > offsets[first:last])
        if len(nonempty):
            chunk = data[lo : int(offsets[last])]
            space = ASCII_SPACE[chunk]
            word_start = ~space
            word_start[1:] &= space[:-1]
            at = starts[nonempty]
            word_start[at] = ~space[at]
            counts[first + nonempty] = np.add.reduceat(word_start, at, dtype=np.int64)
            high = np.add.reduceat(chunk >= 0x80, at, dtype=np.int64) > 0
            unicode.append(first + nonempty[high])
        first = last
    others = np.concatenate(unicode) if unicode else np.zeros(0, dtype=np.int64)
    if len(others):
        subset = pc.utf8_trim_whitespace(texts.take(pa.array(others)))
        words = pc.list_value_length(pc.utf8_split_whitespace(subset))
        counts[others] = pc.if_else(pc.equal(pc.utf8_length(subset), 0), 0, words).to_numpy()
    if texts.null_count:
        counts[pc.is_null(texts).to_numpy(zero_copy_only=False)] = 0
    return counts


def _check_media(table: pa.Table, keys: list[str], root: Path) -> tuple[np.ndarray, int]:
    """Rows whose media failed the fast check, and how many distinct paths were checked."""
    base = os.path.realpath(root)
    folders: dict[str, str] = {}
    verdicts: dict[str, bool] = {}
    bad_rows = []
    for key in keys:
        column = table.column(key).combine_chunks()
        if len(column) == 0:
            continue
        encoded = pc.dictionary_encode(pc.list_flatten(column))
        names = encoded.dictionary.to_pylist()
        ok = np.array([_verdict(base, p, folders, verdicts) for p in names], dtype=bool)
        failed = ~ok[encoded.indices.to_numpy(zero_copy_only=False)]
        if failed.any():
            parents = pc.list_parent_indices(column).to_numpy()
            bad_rows.append(parents[failed])
    suspects = np.unique(np.concatenate(bad_rows)) if bad_rows else np.zeros(0, dtype=np.int64)
    return suspects.astype(np.int64), len(verdicts)


def _verdict(base: str, rel: str, folders: dict[str, str], verdicts: dict[str, bool]) -> bool:
    if rel not in verdicts:
        verdicts[rel] = media_file_ok(base, rel, folders)
    return verdicts[rel]


def media_file_ok(base: str, rel: str, folders: dict[str, str]) -> bool:
    """Whether ``rel`` names a regular file inside the resolved data root ``base``, following symlinks
    (the same verdict as ``inside_root`` + ``is_file``). Each folder is resolved once (``folders``);
    paths with ``..`` or absolute paths, and symlinks, take the exact, slower way."""
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        return _exact_ok(base, rel)
    parent, name = os.path.split(os.path.join(base, rel))
    real = folders.get(parent)
    if real is None:
        real = folders[parent] = os.path.realpath(parent)
    if not _inside(base, real):
        return False
    try:
        mode = os.lstat(os.path.join(real, name)).st_mode
    except OSError:
        return False
    if stat.S_ISLNK(mode):
        return _exact_ok(base, rel)
    return stat.S_ISREG(mode)


def _inside(base: str, path: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _exact_ok(base: str, rel: str) -> bool:
    resolved = os.path.realpath(os.path.join(base, rel))
    return _inside(base, resolved) and os.path.isfile(resolved)


def read_cache(path: Path, key: dict[str, Any]) -> tuple[pa.Table, FileIndex] | None:
    """The cached table (memory-mapped) and index of ``path``, or ``None`` when absent or stale."""
    folder = cache_dir(path)
    try:
        meta = json.loads((folder / INDEX_FILE).read_text())
        if meta.get("key") != key:
            return None
        table = open_records(str(folder / RECORDS_FILE))
        with np.load(folder / ARRAYS_FILE) as arrays:
            items = {k: arrays[f"items/{k}"] for k in meta["items"]}
            index = FileIndex(
                text_tokens=arrays["text_tokens"],
                items=items,
                suspects=arrays["suspects"],
                invalid={int(row): why for row, why in meta["invalid"].items()},
                distinct_media=meta["distinct_media"],
                from_cache=True,
                records_file=str(folder / RECORDS_FILE),
            )
    except (OSError, ValueError, KeyError, pa.ArrowInvalid) as e:
        if (folder / INDEX_FILE).exists():
            logger.warning("%s: unreadable dataset index (%s); building it again", folder, e)
        return None
    if len(index.text_tokens) != table.num_rows:
        return None
    return table, index


def write_cache(path: Path, key: dict[str, Any], table: pa.Table, index: FileIndex) -> None:
    """Write the table and index atomically (each file replaced whole; ``index.json`` last)."""
    folder = cache_dir(path)
    folder.mkdir(exist_ok=True)
    tag = f".{os.getpid()}.tmp"
    records = folder / (RECORDS_FILE + tag)
    with pa.OSFile(str(records), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    arrays = folder / (ARRAYS_FILE + tag)
    with open(arrays, "wb") as f:
        np.savez(
            f,
            text_tokens=index.text_tokens,
            suspects=index.suspects,
            **{f"items/{k}": v for k, v in index.items.items()},
        )
    meta = {
        "key": key,
        "items": list(index.items),
        "invalid": {str(row): why for row, why in index.invalid.items()},
        "distinct_media": index.distinct_media,
    }
    meta_tmp = folder / (INDEX_FILE + tag)
    meta_tmp.write_text(json.dumps(meta))
    os.replace(records, folder / RECORDS_FILE)
    os.replace(arrays, folder / ARRAYS_FILE)
    os.replace(meta_tmp, folder / INDEX_FILE)


def record_at(table: pa.Table, row: int) -> dict[str, Any]:
    """One row of a table as a dict (all its fields)."""
    return table.slice(row, 1).to_pylist()[0]
