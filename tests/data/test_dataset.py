"""LLaVA-format conversation data: JSON / JSON lines / parquet, media resolution, the collator and
length-grouped batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama.data.dataset import Collator, ConversationDataset, LengthGroupedBatchSampler
from mm_llama.errors import MMInputError
from mm_llama.model import MultimodalLM
from mm_llama.processor import IGNORE_INDEX
from tests.train.conftest import (
    one_thread,  # noqa: F401  (autouse: tiny models run faster on one thread)
    tiny_model_config,
)

IMAGE_SIZE = 16


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), value, dtype=np.uint8)).save(path)


def records() -> list[dict[str, Any]]:
    """One record with one image, one with two (a list), one without media."""
    return [
        {
            "id": "one",
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "grey"},
            ],
        },
        {
            "id": "two",
            "image": ["img/a.png", "img/b.png"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: same?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "hi"}],
        },
    ]


@pytest.fixture(scope="module")
def model() -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM(tiny_model_config())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_image(tmp_path / "img" / "a.png", 60)
    write_image(tmp_path / "img" / "b.png", 200)
    return tmp_path


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # parquet holds one type per column: single paths become one-item lists
        fixed = [
            {**r, "image": [r["image"]] if isinstance(r.get("image"), str) else r.get("image")} for r in rows
        ]
        datasets.Dataset.from_list(fixed).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_formats_load_the_same_examples(data_dir: Path, model: MultimodalLM, suffix: str) -> None:
    reference = ConversationDataset(write(data_dir / "ref.json", records()), model.processor)
    dataset = ConversationDataset(write(data_dir / f"data{suffix}", records()), model.processor)
    assert len(dataset) == 3
    for i in range(3):
        got, want = dataset[i], reference[i]
        assert got.input_ids == want.input_ids and got.labels == want.labels
        assert got.media.keys() == want.media.keys()
        for name in want.media:
            assert all(torch.equal(a, b) for a, b in zip(got.media[name], want.media[name]))


def test_list_valued_media_and_text_only_records(data_dir: Path, model: MultimodalLM) -> None:
    dataset = ConversationDataset(write(data_dir / "data.json", records()), model.processor)
    assert dataset.media(1) == {"image": [str(data_dir / "img" / "a.png"), str(data_dir / "img" / "b.png")]}
    assert dataset.media(2) == {}
    two = dataset[1]
    assert len(two.media["image"]) == 2
    assert not torch.equal(two.media["image"][0], two.media["image"][1])
    assert dataset.where(1).endswith("data.json:two")

    batch = Collator(model.processor)([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and len(batch["media"]["image"]) == 3
    assert batch["features"] == {}
    lengths = batch["attention_mask"].sum(dim=1)
    assert int(batch["attention_mask"][2, : lengths[2]].sum()) == int(lengths[2])  # right padding
    assert (batch["labels"][2, lengths[2] :] == IGNORE_INDEX).all()
    assert model(**batch).loss.isfinite()


def test_only_keeps_the_records_of_the_named_modalities(data_dir: Path, model: MultimodalLM) -> None:
    sound = {
        "id": "sound",
        "audio": "missing.wav",  # dropped by the filter, so never checked
        "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "beep"}],
    }
    both = {**records()[0], "id": "both", "audio": "missing.wav"}
    path = write(data_dir / "mixed.json", [*records(), sound, both])
    dataset = ConversationDataset(path, model.processor, only=["image"])
    assert [dataset.record(i)["id"] for i in range(len(dataset))] == ["one", "two"]
    reference = ConversationDataset(write(data_dir / "ref.json", records()), model.processor)
    assert dataset[1].input_ids == reference[1].input_ids and dataset.lengths == reference.lengths[:2]
    with pytest.raises(ValueError, match="no record has only video media"):
        ConversationDataset(path, model.processor, only=["video"])


def test_data_root_and_record_ids_in_missing_file_errors(data_dir: Path, model: MultimodalLM) -> None:
    rows = records()
    rows[1]["image"] = ["img/a.png", "img/missing.png"]
    data = write(data_dir / "data.json", rows)
    with pytest.raises(FileNotFoundError, match=r"record 'two': image file not found: .*img/missing\.png"):
        ConversationDataset(data, model.processor)

    moved = data_dir / "elsewhere" / "data.json"
    moved.parent.mkdir()
    write(moved, records())
    with pytest.raises(FileNotFoundError, match=r"record 'one'"):
        ConversationDataset(moved, model.processor)  # default root: the file's own folder
    assert len(ConversationDataset(moved, model.processor, data_root=data_dir)) == 3


def test_bad_files_are_named(data_dir: Path, model: MultimodalLM) -> None:
    (data_dir / "no_conversations.json").write_text(json.dumps([{"id": "x", "text": "hi"}]))
    with pytest.raises(ValueError, match=r"no_conversations\.json: records need a 'conversations' field"):
        ConversationDataset(data_dir / "no_conversations.json", model.processor)
    (data_dir / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported data file type '\.csv'"):
        ConversationDataset(data_dir / "data.csv", model.processor)


def test_lengths_count_media_tokens(data_dir: Path, model: MultimodalLM) -> None:
    dataset = ConversationDataset(write(data_dir / "data.json", records()), model.processor)
    per_image = len(dataset[0].input_ids) - len(dataset[2].input_ids)
    one, two, text = dataset.lengths
    assert text < one < two
    assert two - one >= per_image // 2  # the second image adds a whole image's placeholders


LENGTHS = np.random.default_rng(0).integers(5, 500, size=103).tolist()


def epoch_micro_batches(sampler: LengthGroupedBatchSampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_sampler_is_seeded_deterministic_and_covers_every_sample() -> None:
    sampler = LengthGroupedBatchSampler(LENGTHS, micro_batch_size=4, accumulation=2, seed=3)
    assert sampler.steps_per_epoch == 13  # ceil(103 / 8): the last batch wraps around
    first = epoch_micro_batches(sampler, 0)
    assert first == epoch_micro_batches(LengthGroupedBatchSampler(LENGTHS, 4, 2, seed=3), 0)
    assert first != epoch_micro_batches(sampler, 1)
    assert first != epoch_micro_batches(LengthGroupedBatchSampler(LENGTHS, 4, 2, seed=4), 0)
    flat = [i for batch in first for i in batch]
    assert len(flat) == 13 * 8 and set(flat) == set(range(len(LENGTHS)))
    assert len(first) == len(sampler.__class__(LENGTHS, 4, 2, seed=3))


def test_sampler_resumes_mid_epoch() -> None:
    sampler = LengthGroupedBatchSampler(LENGTHS, micro_batch_size=4, accumulation=2, seed=3)
    full = epoch_micro_batches(sampler, 2)
    assert epoch_micro_batches(sampler, 2, start=5) == full[5 * 2 :]
    assert len(sampler) == (13 - 5) * 2


def test_global_batches_do_not_depend_on_the_number_of_processes() -> None:
    single = LengthGroupedBatchSampler(LENGTHS, micro_batch_size=2, accumulation=4, seed=1)
    ranks = [
        LengthGroupedBatchSampler(
            LENGTHS, micro_batch_size=2, accumulation=2, num_processes=2, process_index=r, seed=1
        )
        for r in range(2)
    ]
    one = epoch_micro_batches(single, 0)
    per_rank = [epoch_micro_batches(r, 0) for r in ranks]
    for step in range(single.steps_per_epoch):
        want = sorted(i for b in one[step * 4 : step * 4 + 4] for i in b)
        got = sorted(i for r in per_rank for b in r[step * 2 : step * 2 + 2] for i in b)
        assert got == want


def test_length_grouping_reduces_padding() -> None:
    def padding(group: bool) -> int:
        sampler = LengthGroupedBatchSampler(LENGTHS, micro_batch_size=4, seed=0, group_by_length=group)
        batches = epoch_micro_batches(sampler, 0)
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)

    assert padding(True) < padding(False) / 4


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE", "img/link.png"])
def test_media_paths_cannot_leave_the_data_root(tmp_path: Path, model: MultimodalLM, escape: str) -> None:
    root = tmp_path / "root"
    write_image(root / "img" / "a.png", 60)
    write_image(tmp_path / "outside.png", 90)
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    path = str(tmp_path / "outside.png") if escape == "ABSOLUTE" else escape
    rows = [{**records()[0], "image": path}]
    with pytest.raises(MMInputError, match="outside the data root"):
        ConversationDataset(write(root / "data.json", rows), model.processor)
    dataset = ConversationDataset(write(root / "data.json", rows), model.processor, check_media=False)
    with pytest.raises(MMInputError, match=r"data\.json:one.*outside the data root"):
        dataset[0]


def test_media_paths_are_resolved_once_per_dataset(
    data_dir: Path, model: MultimodalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mm_llama.data.dataset as module

    resolved: list[str] = []
    real = module.inside_root
    monkeypatch.setattr(
        module, "inside_root", lambda root, path, *a: resolved.append(path) or real(root, path, *a)
    )
    dataset = ConversationDataset(
        write(data_dir / "data.json", records()), model.processor, check_media=False
    )
    first = [dataset.media(i) for i in range(len(dataset))]
    count = len(resolved)
    assert count > 0 and [dataset.media(i) for i in range(len(dataset))] == first and len(resolved) == count
    assert all(Path(p).is_absolute() for m in first for paths in m.values() for p in paths)


def test_modality_weights_repeat_the_records_of_a_modality(data_dir: Path, model: MultimodalLM) -> None:
    from mm_llama.train.data import StageDataset

    sound = {
        "id": "sound",
        "audio": "missing.wav",
        "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "beep"}],
    }
    both = {**records()[0], "id": "both", "audio": "missing.wav"}
    dataset = ConversationDataset(
        write(data_dir / "mixed.json", [*records(), sound, both]), model.processor, check_media=False
    )
    # one, two: image; text: no media (1); sound: audio (not listed: 1); both: the larger of image and audio
    weights = dataset.modality_weights({"image": 3.0, "audio": 0.5})
    assert weights.tolist() == [3.0, 3.0, 1.0, 0.5, 3.0]

    stage = StageDataset(dataset, "raise", {"image": 3.0})
    assert stage.indices == [0, 0, 0, 1, 1, 1, 2, 3, 4, 4, 4]
    assert len(stage.lengths) == len(stage) == 11
    # fractional weights: each record kept once more with probability w - floor(w), seeded
    draws = [StageDataset(dataset, "raise", {"image": 1.5}, seed=s).indices for s in range(40)]
    assert draws[0] == StageDataset(dataset, "raise", {"image": 1.5}, seed=0).indices
    extra_images = [d.count(0) - 1 for d in draws] + [d.count(1) - 1 for d in draws]
    assert set(extra_images) == {0, 1} and 0.3 < np.mean(extra_images) < 0.7
    assert all(d.count(2) == d.count(3) == 1 for d in draws)  # unlisted modalities: exactly once
