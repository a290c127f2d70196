"""Low-level readers for benchmark files on local disk: JSON, JSON lines, CSV and lmms-lab parquet.

Every reader raises with the file name and what was expected, so a wrong ``--data`` path or a file in
another layout says what to fix. Parquet files are read with ``datasets`` and image columns are kept
undecoded: an image comes back as its encoded bytes (PNG/JPEG), which the model's image preprocessing
accepts directly, so skipping already-answered questions costs no decoding.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_llama.errors import MissingInputError

if TYPE_CHECKING:
    import datasets


def read_json(path: Path) -> Any:
    """Parse a JSON file; errors name the file."""
    if not path.is_file():
        raise MissingInputError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file (one object per line; blank lines skipped); errors name file and line."""
    if not path.is_file():
        raise MissingInputError(f"no such file: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
    return rows


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """Objects from a file that is either a JSON list or JSON lines (POPE ships both under ``.json``)."""
    if not path.is_file():
        raise MissingInputError(f"no such file: {path}")
    if path.read_text(encoding="utf-8").lstrip().startswith("["):
        records = read_json(path)
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return records
    return read_jsonl(path)


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; checks that the ``required`` columns are there."""
    if not path.is_file():
        raise MissingInputError(f"no such file: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {list(required)}, found {header}")
        return list(reader)


def require_fields(record: dict[str, Any], fields: Sequence[str], where: str) -> None:
    """Raise if a record lacks one of ``fields``; ``where`` names the file and record."""
    missing = [name for name in fields if name not in record]
    if missing:
        raise ValueError(
            f"{where}: missing fields {missing}; expected {list(fields)}, found {sorted(record)}"
        )


def parquet_files(path: Path) -> list[Path]:
    """``path`` itself if it is a ``.parquet`` file, else every ``*.parquet`` below it, sorted."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: expected a .parquet file or a folder of them")
        return [path]
    if not path.is_dir():
        raise MissingInputError(f"no such file or folder: {path}")
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise MissingInputError(f"{path}: no .parquet files in this folder (expected the lmms-lab layout)")
    return files


def read_parquet(files: Sequence[Path], required: Sequence[str]) -> datasets.Dataset:
    """Load parquet files with ``datasets``, image columns undecoded; checks the ``required`` columns."""
    import datasets  # imported here: the task names (``mm-llama eval --help``) need no pyarrow

    dataset = datasets.Dataset.from_parquet([str(f) for f in files])
    assert isinstance(dataset, datasets.Dataset)  # one split, not a dict of splits
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"{names}: missing columns {missing}; expected {list(required)}, found {dataset.column_names}"
        )
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def image_item(value: Any, where: str) -> bytes | str:
    """An undecoded parquet image cell (``{"bytes": ..., "path": ...}``) as bytes, else its path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
    if isinstance(value, bytes):
        return value
    raise ValueError(f"{where}: image cell holds neither bytes nor a path: {type(value).__name__}")


def media_path(root: Path, name: str, what: str, key: str) -> Path:
    """``root / name`` if it stays inside ``root`` (no ``../``, absolute path or symlink leading out: an
    ``MMInputError`` naming ``what`` and ``key``) and is a file (else a ``MissingInputError``)."""
    from mm_llama.data.dataset import inside_root  # the training data's rule; imported here (torch)

    inside_root(root, str(name), what, key)
    return check_file(root / name, f"{what} {key}")


def check_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise naming what it was for."""
    if not path.is_file():
        raise MissingInputError(f"{what}: file not found: {path} (check the data folder or --media-root)")
    return path
