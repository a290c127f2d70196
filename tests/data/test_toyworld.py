"""Toy world: files decode, generation is seeded, answers are balanced, and the media show what the text says."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mm_llama.data import toyworld as tw

SIZE = 64
FG_THRESHOLD = 40  # a pixel whose channels differ from the background by more than this is foreground


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tw.generate_toyworld(tmp_path_factory.mktemp("toyworld"), seed=3, n_train=24, n_val=8, n_test=8)


def _load(paths: dict[str, Path], name: str) -> list[dict] | dict:
    return json.loads(paths[name].read_text())


def _records(paths: dict[str, Path], split: str, modality: str) -> list[tuple[dict, dict, dict]]:
    """(align record, instruct record, attributes) of one modality in one split."""
    align, instruct = _load(paths, f"align_{split}"), _load(paths, f"instruct_{split}")
    attributes = _load(paths, f"attributes_{split}")
    by_id = {r["id"]: r for r in instruct}
    return [(a, by_id[a["id"]], attributes[a["id"]]) for a in align if modality in a]


def _modality(record: dict) -> str:
    return next(m for m in tw.MODALITIES if m in record)


def _foreground(frame: np.ndarray) -> np.ndarray:
    diff = np.abs(frame.astype(int) - np.array(tw.BACKGROUND_RGB)).max(-1)  # (H, W)
    return diff > FG_THRESHOLD


def _nearest_color(rgb: np.ndarray) -> str:
    return min(tw.COLORS, key=lambda c: np.abs(np.array(tw.COLORS[c]) - rgb.astype(int)).sum())


def _decode_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (F, H, W, 3)


def _read_imu(path: Path) -> np.ndarray:
    assert path.read_text().splitlines()[0] == ",".join(tw.IMU_COLUMNS)
    return np.loadtxt(path, delimiter=",", skiprows=1)  # (T, 7)


def test_records_and_files(world: dict[str, Path]) -> None:
    root = world["world"].parent
    for split in tw.SPLITS:
        align, instruct = _load(world, f"align_{split}"), _load(world, f"instruct_{split}")
        assert (
            len(align)
            == len(instruct)
            == len({r["id"] for r in align})
            == 4 * (24 if split == "train" else 8)
        )
        for record in align + instruct:
            modality = _modality(record)
            assert [m for m in tw.MODALITIES if m in record] == [modality]
            rel = record[modality]
            assert not Path(rel).is_absolute() and (root / rel).is_file()
            assert rel.startswith(tw.MEDIA_DIRS[modality] + "/" + split + "/")
            messages = record["conversations"]
            assert [m["from"] for m in messages] == ["human", "gpt"] * (len(messages) // 2)
            assert messages[0]["value"].startswith(f"<{modality}>")
            assert not any(f"<{modality}>" in m["value"] for m in messages[1:])
        for record in align:
            assert len(record["conversations"]) == 2
            assert record["conversations"][0]["value"] == f"<{_modality(record)}>"
        for record in instruct:
            assert record["conversations"][1]["value"] == record["answer"] in record["choices"]
            assert record["choices"] == list(tw.QUESTION_TYPES[record["question_type"]].choices)
            if split != "train":  # one question per record: the unit of evaluation
                assert len(record["conversations"]) == 2 and "turns" not in record
                continue
            turns = record["turns"]  # the first question, then follow-ups of the modality's other types
            types = [t["question_type"] for t in turns]
            assert types[0] == record["question_type"] and len(set(types)) == len(types)
            modality_types = {
                q for q, spec in tw.QUESTION_TYPES.items() if spec.modality == _modality(record)
            }
            assert set(types) <= modality_types
            if _modality(record) == "audio":  # every audio sample answers both of its types
                assert set(types) == modality_types
            assert [m["value"] for m in record["conversations"][1::2]] == [t["answer"] for t in turns]
            for t in turns:
                assert t["answer"] in tw.QUESTION_TYPES[t["question_type"]].choices


def test_media_decode(world: dict[str, Path]) -> None:
    root = world["world"].parent
    (_, _, image), (_, _, audio), (_, _, video), (_, _, imu) = (
        _records(world, "val", m)[0] for m in tw.MODALITIES
    )
    with Image.open(root / image["image"]) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))
    wave, rate = sf.read(root / audio["audio"])
    assert rate == tw.AUDIO_SAMPLE_RATE and wave.shape == (int(tw.AUDIO_SAMPLE_RATE * tw.AUDIO_DURATION_S),)
    assert _decode_video(root / video["video"]).shape == (tw.VIDEO_FRAMES, SIZE, SIZE, 3)
    data = _read_imu(root / imu["imu"])
    assert data.shape == (tw.IMU_SAMPLES, len(tw.IMU_COLUMNS))
    np.testing.assert_allclose(np.diff(data[:, 0]), 1 / tw.IMU_RATE_HZ, atol=1e-6)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"n_train": 4, "n_val": 2, "n_test": 2}
    monkeypatch.setattr(tw, "_CHUNK", 3)  # with workers, each split's samples span several pool tasks
    tw.generate_toyworld(tmp_path / "a", seed=7, **kwargs)
    tw.generate_toyworld(tmp_path / "b", seed=7, **kwargs)
    tw.generate_toyworld(tmp_path / "c", seed=8, **kwargs)
    tw.generate_toyworld(tmp_path / "d", seed=7, workers=2, **kwargs)  # samples made in two processes
    a, b, c, d = (_all_bytes(tmp_path / d) for d in "abcd")
    assert a == b  # every JSON and media file, byte for byte
    assert a == d  # in the same order too, whatever process made each sample
    assert a.keys() == c.keys()
    for name in ("align_train.json", "instruct_train.json", "attributes_test.json"):
        assert a[name] != c[name]
    train, val = (json.loads(a[f"attributes_{s}.json"]) for s in ("train", "val"))
    assert train["train-image-00000"]["shapes"] != val["val-image-00000"]["shapes"]  # splits differ


def test_balanced_and_complete(world: dict[str, Path]) -> None:
    summary = _load(world, "world")
    for split in tw.SPLITS:
        counts: dict[str, Counter] = defaultdict(Counter)
        for r in _load(world, f"instruct_{split}"):
            counts[r["question_type"]][r["answer"]] += 1
        assert set(counts) == set(tw.QUESTION_TYPES)
        for qtype, answers in counts.items():
            choices = tw.QUESTION_TYPES[qtype].choices
            per_answer = [answers[c] for c in choices]
            assert max(per_answer) - min(per_answer) <= 1, (split, qtype, answers)
        assert summary["splits"][split]["answers"] == {q: dict(sorted(c.items())) for q, c in counts.items()}
    for qtype, spec in summary["question_types"].items():
        assert spec["chance"] == pytest.approx(1 / len(spec["choices"]))
        assert spec["modality"] == tw.QUESTION_TYPES[qtype].modality


def test_images_show_their_answers(world: dict[str, Path]) -> None:
    root = world["world"].parent
    for align, instruct, attrs in _records(world, "train", "image") + _records(world, "test", "image"):
        pixels = np.asarray(Image.open(root / attrs["image"]).convert("RGB"))  # (H, W, 3)
        for s in attrs["shapes"]:
            cx, cy = (round(v) for v in s["center"])
            assert _nearest_color(pixels[cy, cx]) == s["color"]
            assert (
                f"{s['size']} {s['color']} {s['shape']} in the {s['position']}"
                in align["conversations"][1]["value"]
            )
        fg = _foreground(pixels)
        half = SIZE // 2
        occupied = sum(fg[r : r + half, c : c + half].any() for r in (0, half) for c in (0, half))
        assert occupied == len(attrs["shapes"])
        kinds = [s["shape"] for s in attrs["shapes"]]
        messages = instruct["conversations"]
        for turn, question, answer in zip(
            instruct.get("turns", [instruct]), messages[::2], messages[1::2], strict=True
        ):
            question, answer = question["value"], answer["value"]
            named = next((k for k in tw.SHAPES if k in question), None)
            if turn["question_type"] == "count_shapes":
                assert answer == str(occupied)
            elif turn["question_type"] == "shape_color":
                assert kinds.count(named) == 1
                s = attrs["shapes"][kinds.index(named)]
                cx, cy = (round(v) for v in s["center"])
                assert _nearest_color(pixels[cy, cx]) == answer
            else:
                assert (named in kinds) == (answer == "yes")


def _count_beeps(wave: np.ndarray) -> int:
    frame = tw.AUDIO_SAMPLE_RATE // 100  # 10 ms
    rms = np.sqrt((wave[: len(wave) // frame * frame].reshape(-1, frame) ** 2).mean(1))
    loud = rms > 0.1
    return int((loud[1:] & ~loud[:-1]).sum() + loud[0])


def test_audio_has_the_stated_beeps(world: dict[str, Path]) -> None:
    root = world["world"].parent
    for align, instruct, attrs in _records(world, "train", "audio"):
        wave, rate = sf.read(root / attrs["audio"])
        assert _count_beeps(wave) == attrs["n_beeps"]
        peak_hz = np.argmax(np.abs(np.fft.rfft(wave))) * rate / len(wave)
        assert ("high" if peak_hz > 800 else "low") == attrs["pitch"]
        caption = align["conversations"][1]["value"]
        assert caption.startswith(f"{tw.NUMBER_WORDS[attrs['n_beeps']]} {attrs['pitch']} {attrs['waveform']}")
        for turn in instruct["turns"]:
            expected = str(attrs["n_beeps"]) if turn["question_type"] == "count_beeps" else attrs["pitch"]
            assert turn["answer"] == expected


def test_video_moves_in_the_stated_direction(world: dict[str, Path]) -> None:
    root = world["world"].parent
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
    for align, instruct, attrs in _records(world, "train", "video"):
        frames = _decode_video(root / attrs["video"])
        centroids = []
        for frame in (frames[0], frames[-1]):
            ys, xs = np.nonzero(_foreground(frame))
            assert _nearest_color(np.median(frame[ys, xs], axis=0)) == attrs["color"]
            centroids.append(np.array([xs.mean(), ys.mean()]))
        moved = centroids[1] - centroids[0]
        assert moved @ np.array(steps[instruct["answer"]]) > 0.3 * SIZE
        assert abs(moved @ np.array(steps[instruct["answer"]][::-1])) < 2
        assert (
            align["conversations"][1]["value"]
            == f"a {attrs['color']} {attrs['shape']} moving {attrs['direction']}"
        )


def test_imu_activities_are_distinct(world: dict[str, Path]) -> None:
    root = world["world"].parent
    variance: dict[str, list[float]] = defaultdict(list)
    for align, instruct, attrs in _records(world, "train", "imu"):
        data = _read_imu(root / attrs["imu"])
        acc = np.linalg.norm(data[:, 1:4], axis=1)  # (T,) m/s^2
        variance[instruct["answer"]].append(acc.var())
        assert instruct["answer"] in align["conversations"][1]["value"] or instruct["answer"] == "standing"
        if instruct["answer"] == "standing":
            assert abs(acc.mean() - tw.GRAVITY) < 0.1 and acc.std() < 0.2
        if instruct["answer"] == "jumping":
            assert acc.min() < 3 and acc.max() > 2.5 * tw.GRAVITY  # free fall and landing impacts
    assert max(variance["standing"]) < min(variance["walking"])
    assert max(variance["walking"]) < min(variance["running"])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = tw.add_toyworld_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--out", str(tmp_path), "--seed", "1", "--n-train", "3", "--n-val", "1", "--n-test", "1"]
        + ["--modalities", "imu", "audio"]
    )
    paths = tw.run_toyworld(args)
    world = json.loads(paths["world"].read_text())
    assert world["modalities"] == ["audio", "imu"]
    assert set(world["question_types"]) == {"count_beeps", "pitch", "activity"}
    assert not (tmp_path / "images").exists()
    assert "train: 6 captions, 6 conversations, 9 questions" in capsys.readouterr().out  # audio: 2 turns


def test_single_turn(tmp_path: Path) -> None:
    paths = tw.generate_toyworld(tmp_path, seed=3, n_train=6, n_val=0, n_test=0, multi_turn=False)
    for record in _load(paths, "instruct_train"):
        assert len(record["conversations"]) == 2 and "turns" not in record
    assert _load(paths, "world")["splits"]["train"]["turns"] == 24


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image, audio, video, imu"):
        tw.generate_toyworld(tmp_path, modalities=["depth"])
    with pytest.raises(ValueError, match="counts"):
        tw.generate_toyworld(tmp_path, n_train=-1)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        tw.generate_toyworld(tmp_path, workers=0)


def test_loads_with_datasets(world: dict[str, Path], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    for name in ("align_train", "instruct_train"):
        ds = datasets.load_dataset(
            "json", data_files=str(world[name]), split="train", cache_dir=str(tmp_path)
        )
        assert len(ds) == 4 * 24
        assert set(tw.MODALITIES) <= set(ds.column_names)


def test_follow_ups_cannot_be_answered_from_the_text(tmp_path: Path) -> None:
    """An existence follow-up never asks about a shape an earlier turn named: a colour question only
    names present shapes, so "is there a X?" after "what colour is the X?" would be a free "yes"."""
    paths = tw.generate_toyworld(tmp_path, seed=1, n_train=60, n_val=0, n_test=0, modalities=["image"])
    asked = 0
    for record in _load(paths, "instruct_train"):
        turns = record["conversations"][0::2]
        for i, (turn, meta) in enumerate(zip(turns, record["turns"])):
            if meta["question_type"] != "shape_exists" or i == 0:
                continue
            shape = next(s for s in tw.SHAPES if s in turn["value"])
            assert all(shape not in earlier["value"] for earlier in turns[:i]), record["id"]
            asked += 1
    assert asked > 20


def test_existence_answers_do_not_depend_on_the_shape_count(tmp_path: Path) -> None:
    """Every existence question says "yes" about half the time whatever the number of shapes: forced
    follow-up answers (one shape, already named: always "no") let a model answer by counting."""
    paths = tw.generate_toyworld(tmp_path, seed=2, n_train=600, n_val=0, n_test=0, modalities=["image"])
    attributes = json.loads(paths["attributes_train"].read_text())
    answers: dict[int, list[bool]] = {1: [], 2: [], 3: []}
    for record in _load(paths, "instruct_train"):
        n = len(attributes[record["id"]]["shapes"])
        answers[n] += [t["answer"] == "yes" for t in record["turns"] if t["question_type"] == "shape_exists"]
    for n, said_yes in answers.items():
        assert len(said_yes) > 80 and abs(np.mean(said_yes) - 0.5) < 0.08, (
            n,
            len(said_yes),
            np.mean(said_yes),
        )
