"""The dataset index at LLaVA scale, in small: a mix665k-shaped file of a few hundred records (mixed id
types, text-only records, the marker first or last), read column-wise, cached beside the data file,
reused, rebuilt when the file changes, and giving the same lengths as a per-record Python reference."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.bench_index import synthesize
from mm_llama.data import records
from mm_llama.data.dataset import ConversationDataset
from mm_llama.processor import MultimodalProcessor
from tests.conftest import tiny_config

RECORDS = 300


@pytest.fixture(scope="module")
def processor() -> MultimodalProcessor:
    return MultimodalProcessor.from_config(tiny_config())


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mix665k-shaped file (its images hard-linked to 12 distinct ones), never modified."""
    return synthesize(tmp_path_factory.mktemp("mix"), records=RECORDS, distinct_images=12)


@pytest.fixture
def copy(mix: Path, tmp_path: Path) -> Path:
    """A copy of the file in its own folder (its own index cache); its media stay under ``mix``'s root."""
    shutil.copy(mix, tmp_path / "mix.json")
    return tmp_path / "mix.json"


def per_image(processor: MultimodalProcessor, root: Path) -> int:
    image = next(p for p in (root / "coco" / "train2017").iterdir())
    return processor.handlers["image"](str(image))[1]


def reference_lengths(path: Path, tokens_per_image: int) -> list[int]:
    """Per record, in Python: words of every turn x 1.3, rounded up, plus the image placeholders."""
    out = []
    for rec in json.loads(path.read_text()):
        words = sum(len(turn["value"].split()) for turn in rec["conversations"])
        images = rec.get("image")
        count = 0 if images is None else 1 if isinstance(images, str) else len(images)
        out.append(math.ceil(words * records.TOKENS_PER_WORD) + count * tokens_per_image)
    return out


def test_mix_shaped_records_ids_text_only_and_lengths(mix: Path, processor: MultimodalProcessor) -> None:
    raw = json.loads(mix.read_text())
    assert {type(r["id"]) for r in raw} == {int, str}  # the shapes the file must have
    text_only = [i for i, r in enumerate(raw) if "image" not in r]
    first_human = [r["conversations"][0]["value"] for r in raw if "image" in r]
    assert text_only and any(v.startswith("<image>") for v in first_human)
    assert any(v.endswith("<image>") for v in first_human)
    assert any(len(r["conversations"]) > 2 for r in raw)

    dataset = ConversationDataset(mix, processor)
    assert len(dataset) == RECORDS
    assert [dataset.record(i)["id"] for i in range(0, RECORDS, 7)] == [
        str(raw[i]["id"]) for i in range(0, RECORDS, 7)
    ]
    assert dataset.where(text_only[0]) == f"{mix}:{raw[text_only[0]]['id']}"
    assert dataset.media(text_only[0]) == {} and not dataset[text_only[0]].media
    with_image = next(i for i, r in enumerate(raw) if isinstance(r["id"], int) and "image" in r)
    assert dataset.media(with_image) == {"image": [str((mix.parent / raw[with_image]["image"]).resolve())]}
    assert len(dataset[with_image].media["image"]) == 1

    want = reference_lengths(mix, per_image(processor, mix.parent))
    assert dataset.lengths == want
    assert ConversationDataset(mix, processor, index_cache=False).lengths == want


def test_second_build_reads_the_cache(
    copy: Path, mix: Path, processor: MultimodalProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ConversationDataset(copy, processor, data_root=mix.parent)
    assert not first.index_from_cache and (copy.parent / "mix.json.mm_llama" / "index.json").is_file()

    def slow_path(*args: Any) -> None:
        raise AssertionError("the cached index was not used")

    monkeypatch.setattr(records, "read_table", slow_path)
    monkeypatch.setattr(records, "build_index", slow_path)
    second = ConversationDataset(copy, processor, data_root=mix.parent)
    assert second.index_from_cache
    assert second.lengths == first.lengths
    assert [second.record(i) for i in (0, 150, 299)] == [first.record(i) for i in (0, 150, 299)]
    assert second[5].input_ids == first[5].input_ids
    with pytest.raises(AssertionError, match="not used"):  # another data root is another index
        ConversationDataset(copy, processor, data_root=mix.parent / "coco")


def test_a_changed_file_is_indexed_again(copy: Path, mix: Path, processor: MultimodalProcessor) -> None:
    ConversationDataset(copy, processor, data_root=mix.parent)
    rows = json.loads(copy.read_text())[:-1]
    rows[0] = {**rows[0], "id": 12345, "conversations": [*rows[0]["conversations"]] * 2}
    copy.write_text(json.dumps(rows))
    dataset = ConversationDataset(copy, processor, data_root=mix.parent)
    assert not dataset.index_from_cache and len(dataset) == RECORDS - 1
    assert dataset.record(0)["id"] == "12345"
    assert dataset.lengths == reference_lengths(copy, per_image(processor, mix.parent))


def test_missing_media_found_and_checked_again_from_the_cache(
    copy: Path, mix: Path, processor: MultimodalProcessor
) -> None:
    rows = json.loads(copy.read_text())
    bad = next(i for i, r in enumerate(rows) if "image" in r)
    rows[bad]["image"] = "coco/train2017/added_later.jpg"
    copy.write_text(json.dumps(rows))
    with pytest.raises(
        FileNotFoundError, match=rf"record '{rows[bad]['id']}': image file not found: .*added_later"
    ):
        ConversationDataset(copy, processor, data_root=mix.parent)
    skipping = ConversationDataset(copy, processor, data_root=mix.parent, check_media=False)
    assert [index for index, _ in skipping.media_errors()] == [bad]
    added = mix.parent / "coco" / "train2017" / "added_later.jpg"
    os.link(next((mix.parent / ".distinct").iterdir()), added)
    try:
        dataset = ConversationDataset(copy, processor, data_root=mix.parent)  # the cached suspect passes now
        assert dataset.index_from_cache and not list(dataset.media_errors())
    finally:
        added.unlink()


def test_jsonl_and_parquet_ids_become_strings(tmp_path: Path, processor: MultimodalProcessor) -> None:
    turns = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "hello"}]
    rows = [{"id": 7, "conversations": turns}, {"id": "b", "conversations": turns}, {"conversations": turns}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = ConversationDataset(tmp_path / "d.jsonl", processor)
    assert [dataset.record(i)["id"] for i in range(3)] == ["7", "b", None]
    assert dataset.where(2).endswith("d.jsonl:#2")
    pq.write_table(pa.Table.from_pylist([{"id": 7, "conversations": turns}]), tmp_path / "d.parquet")
    assert ConversationDataset(tmp_path / "d.parquet", processor).record(0)["id"] == "7"

    rows[1]["score"], rows[2]["score"] = 1, "high"
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"bad\.json: its records do not make one table"):
        ConversationDataset(tmp_path / "bad.json", processor)


def test_word_counts_match_str_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "WORD_COUNT_BYTES", 7)  # many spans
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\x0b", "\x1f", "\u00a0", "\u3000", "\u2028", "é", "\u200b"]
    texts = [" a  b\tc ", "", None, "  ", "x" * 30 + " y", "a\u00a0b\x85c"]
    texts += ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(400)]
    array = pa.array(texts)
    for part in (array, array.slice(3, 200)):
        want = [len(s.split()) if s is not None else 0 for s in part.to_pylist()]
        assert records.word_counts(part).tolist() == want


def test_stage_data_builds_the_dataset_on_the_main_process_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main process builds (and caches) the index before the other processes build theirs."""
    from mm_llama.model import MultimodalLM
    from mm_llama.train import data as train_data
    from tests.train.conftest import instruct_stage, tiny_train_config, write_colour_world

    events: list[str] = []

    class Recorded(ConversationDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            events.append("build")
            super().__init__(*args, **kwargs)

    class OneProcess:
        num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

        @contextlib.contextmanager
        def main_process_first(self) -> Iterator[None]:
            events.append("main first")
            yield
            events.append("others")

    monkeypatch.setattr(train_data, "ConversationDataset", Recorded)
    cfg = tiny_train_config(
        tmp_path / "run", {"instruct": instruct_stage(write_colour_world(tmp_path / "w"))}
    )
    model = MultimodalLM(cfg.model)
    train_data.stage_data(cfg, "instruct", OneProcess(), model, accumulation=1)  # type: ignore[arg-type]
    assert events == ["main first", "build", "others"]


def test_a_pickled_dataset_maps_the_cached_table_again(
    copy: Path, mix: Path, processor: MultimodalProcessor
) -> None:
    """A spawned DataLoader worker gets the records file's path, not a copy of the table."""
    dataset = ConversationDataset(copy, processor, data_root=mix.parent)
    assert dataset.__getstate__()["_tables"] == [str(copy.parent / "mix.json.mm_llama" / "records.arrow")]
    again = pickle.loads(pickle.dumps(dataset))
    assert again.record(17) == dataset.record(17) and again[17].input_ids == dataset[17].input_ids
    in_memory = ConversationDataset(copy, processor, data_root=mix.parent, index_cache=False)
    assert isinstance(in_memory.__getstate__()["_tables"][0], pa.Table)
