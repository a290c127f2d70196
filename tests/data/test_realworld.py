"""The real-data builders (Fashion-MNIST, espeak-ng speech, BasicMotions) and a few training steps on each
source with the real-data encoders (EfficientNet-Lite0 pretrained, small ones from scratch) and a tiny LLM,
then evaluation and the linear probe."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from mm_llama.config import EncoderConfig, ModalityConfig, ModelConfig, ProjectorConfig
from mm_llama.data import realworld
from mm_llama.data.realworld import build_realworld, read_idx
from mm_llama.encoders.packaged import MissingPackageError
from mm_llama.errors import MMInputError
from mm_llama.eval import evaluate
from mm_llama.model import MultimodalLM
from mm_llama.realworld import CONFIG, _questions_for, linear_probe
from mm_llama.train import TrainConfig, load_train_config, train
from mm_llama.train.config import StageConfig
from tests.conftest import tiny_llm_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realworld")
    build_realworld(out, n_images=20, n_test_images=10, imu_repeats=1, speeds=(160,))
    return out


def test_records_and_held_out_splits(data: Path) -> None:
    meta = json.loads((data / "realworld.json").read_text())
    assert meta["train_records"] == {"image": 20, "audio": 120, "imu": 40}
    # every test item asks each of its question types; BasicMotions' own 40 test recordings
    assert meta["test_questions"] == {
        "clothing_kind": 10,
        "clothing_choice": 10,
        "spoken_digit": 40,
        "voice_sex": 40,
        "activity": 40,
    }
    assert meta["chance"]["spoken_digit"] == 0.1 and meta["chance"]["activity"] == 0.25
    assert 0.25 <= meta["chance"]["clothing_choice"] <= 0.5
    train = json.loads((data / "instruct_train.json").read_text())
    test = json.loads((data / "instruct_test.json").read_text())
    heard = {Path(r["audio"]).stem.split("-")[1] for r in train if "audio" in r}
    tested = {Path(r["audio"]).stem.split("-")[1] for r in test if "audio" in r}
    assert heard and tested and not heard & tested  # test voices are never heard in training
    kinds = [r["answer"] for r in test if r["question_type"] == "clothing_kind"]
    assert sorted(kinds) == sorted(realworld.FASHION_KINDS)  # class-balanced
    for r in test:
        assert (
            r["answer"] in r["choices"]
            and (data / r[next(k for k in ("image", "audio", "imu") if k in r)]).is_file()
        )
        if r["question_type"] == "clothing_choice":
            assert all(c in r["conversations"][0]["value"] for c in r["choices"])


def test_read_idx_checks_the_header(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, *range(6)])))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2])))
    with pytest.raises(ValueError, match=r"header says \(9,\) \(9 bytes\), found 2 bytes"):
        read_idx(short)


def test_missing_sources_name_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingPackageError, match="apt-get install dataset-fashion-mnist"):
        realworld.fashion_mnist("train", root=tmp_path)
    monkeypatch.setattr(realworld.shutil, "which", lambda name: None)
    with pytest.raises(MissingPackageError, match="apt-get install espeak-ng"):
        realworld.speak("one", "m1", 160, tmp_path / "one.wav")


def test_an_image_only_model_gets_the_image_questions(data: Path, tmp_path: Path) -> None:
    assert _questions_for(data, ["image", "audio", "imu"], tmp_path) == data / "instruct_test.json"
    kept = json.loads(_questions_for(data, ["image"], tmp_path).read_text())
    assert len(kept) == 20 and {r["question_type"] for r in kept} == {"clothing_kind", "clothing_choice"}
    with pytest.raises(MMInputError, match=r"no question is about the model's modalities \['video'\]"):
        _questions_for(data, ["video"], tmp_path)


def test_the_from_scratch_preset_matches_the_pretrained_one_but_for_the_image_encoder() -> None:
    pretrained = load_train_config(CONFIG)
    scratch = load_train_config(CONFIG.with_name("realworld_scratch.yaml"))
    assert list(scratch.model.modalities) == ["image"]
    assert pretrained.model.modalities["image"].encoder.type == "efficientnet_lite0"
    assert scratch.model.modalities["image"].encoder.type == "image_cnn"
    assert scratch.model.modalities["image"].projector == pretrained.model.modalities["image"].projector
    for name in ("align", "instruct"):  # the same data and LLM schedule, on the image records only
        mine, theirs = scratch.stages[name], pretrained.stages[name]
        assert (mine.data, mine.max_steps, mine.batch_size, mine.lr) == (
            theirs.data,
            theirs.max_steps,
            theirs.batch_size,
            theirs.lr,
        )
        assert mine.only == ["image"]


def test_a_few_steps_on_each_source_then_evaluation(data: Path, tmp_path: Path) -> None:
    encoders = {
        "image": EncoderConfig("efficientnet_lite0", {"image_size": 64, "crop": False, "grid": 1}),
        "audio": EncoderConfig(
            "audio_transformer", {"max_seconds": 1.0, "width": 32, "depth": 1, "heads": 2, "stem_channels": 4}
        ),
        "imu": EncoderConfig(
            "imu_cnn", {"sample_rate": 10.0, "window": 100, "input_rate": 10.0, "width": 16, "layers": 3}
        ),
    }
    model = ModelConfig(
        llm=tiny_llm_config(),
        modalities={m: ModalityConfig(e, ProjectorConfig("mlp2x_gelu")) for m, e in encoders.items()},
    )
    common = {"batch_size": 12, "micro_batch_size": 12, "max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0}
    stages = {
        "align": StageConfig(
            data=[str(data / "align_train.json")], template="plain", train_encoders="none", **common
        ),
        "instruct": StageConfig(
            data=[str(data / "instruct_train.json")],
            template="chat",
            init_from="align",
            train_encoders="none",
            **common,
        ),
    }
    last: dict[str, MultimodalLM] = {}
    train(
        TrainConfig(model=model, stages=stages, output_dir=str(tmp_path / "run")),
        on_step=lambda info: last.update(model=info.model),  # a random tiny LLM is not reloadable by id
    )
    trained = last["model"].eval()
    assert not any(p.requires_grad for p in trained.encoders["image"].parameters())
    metrics = evaluate(
        trained, "toy", data / "instruct_test.json", batch_size=20, max_new_tokens=2, progress=False
    )
    assert metrics["num_questions"] == 140
    assert set(metrics["per_question_type"]) == set(realworld.QUESTIONS)
    assert metrics["per_question_type"]["activity"]["chance"] == 25.0
    probes = linear_probe(trained, data)
    assert set(probes) == set(realworld.QUESTIONS)
    assert all(0.0 <= p <= 100.0 for p in probes.values())
    assert probes["voice_sex"] > 50.0 and np.isfinite(probes["clothing_kind"])
