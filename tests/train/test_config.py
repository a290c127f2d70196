"""Training configs: every preset loads and validates (types, registry keys, component options) without
building weights; invalid settings fail with the file and the field."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from mm_llama.config import ProjectorConfig
from mm_llama.train.config import (
    ContrastiveOptions,
    TrainConfig,
    load_train_config,
    stage_grad_accumulation,
    validate_train_config,
)
from tests.train.conftest import align_stage, instruct_stage, tiny_train_config

PRESETS_DIR = Path(__file__).resolve().parents[2] / "training" / "configs"
PRESETS = (
    "llava15_stage1",
    "llava15_stage2",
    "llava15_stage2_qlora",
    "anymal_imu",
    "fuyu_patches",
    "quickstart",
    "realworld",
    "realworld_scratch",
)


def test_every_preset_file_is_listed() -> None:
    assert sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name: str) -> None:
    cfg = load_train_config(PRESETS_DIR / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig) and cfg.stages


LLAVA15_SHARED = {  # scripts/v1_5/{pretrain,finetune,finetune_lora}.sh and the README's table
    "epochs": 1.0,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "lr_schedule": "cosine",
    "max_grad_norm": 1.0,
    "train_encoders": "none",
    "train_projectors": True,
    "gradient_checkpointing": True,
    "num_workers": 4,
}
LLAVA15_STAGES = {  # preset -> (stage, its published settings)
    "llava15_stage1": ("align", {"lr": 1e-3, "batch_size": 256, "micro_batch_size": 32, "llm": "frozen",
                                 "template": "plain", "group_by_length": False}),
    "llava15_stage2": ("instruct", {"lr": 2e-5, "projector_lr": 2e-5, "batch_size": 128,
                                    "micro_batch_size": 16, "llm": "full", "template": "chat",
                                    "group_by_length": True, "init_from": "runs/llava15/align"}),
    "llava15_stage2_qlora": ("instruct", {"lr": 2e-4, "projector_lr": 2e-5, "batch_size": 128,
                                          "micro_batch_size": 16, "llm": "qlora", "template": "chat",
                                          "group_by_length": True, "init_from": "runs/llava15/align"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LLAVA15_STAGES))
def test_llava15_presets_carry_the_published_hyperparameters(name: str) -> None:
    cfg = load_train_config(PRESETS_DIR / f"{name}.yaml")
    stage_name, published = LLAVA15_STAGES[name]
    assert list(cfg.stages) == [stage_name]
    stage = cfg.stages[stage_name]
    for field, want in {**LLAVA15_SHARED, **published}.items():
        assert getattr(stage, field) == want, f"{name}: {field}"
    assert cfg.model.max_length == 2048 and stage.max_length in (None, 2048)
    image = cfg.model.modalities["image"]
    assert image.encoder.options == {
        "name_or_path": "openai/clip-vit-large-patch14-336",
        "select_layer": -2,
        "select_feature": "patch",
        "aspect": "crop" if name == "llava15_stage1" else "pad",
    }
    assert image.projector.type == "mlp2x_gelu" and cfg.model.llm.dtype == "bfloat16"
    if stage.llm == "qlora":
        assert (stage.lora.r, stage.lora.alpha, stage.lora.dropout, stage.lora.target_modules) == (
            128,
            256,
            0.05,
            "all-linear",
        )


def test_llava15_presets_cite_a_source_for_each_setting() -> None:
    for name, (_, published) in LLAVA15_STAGES.items():
        lines = [ln.strip() for ln in (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()]
        for field in [*LLAVA15_SHARED, *published, "max_length", "select_layer", "aspect", "dtype"]:
            line = next((ln for ln in lines if ln.startswith(f"{field}: ")), None)
            assert line is not None, f"{name}: {field} is not set"
            assert re.search(r"#.*\[(pretrain|finetune|finetune_lora|train)\.(sh|py)", line), (
                f"{name}: {line!r} names no source"
            )


def test_unknown_fields_and_bad_values_name_the_file(tmp_path: Path) -> None:
    text = (PRESETS_DIR / "llava15_stage1.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("llm: frozen", "llm: half"))
    with pytest.raises(ValueError, match=r"bad\.yaml: stages\.align\.llm: expected one of"):
        load_train_config(bad)
    bad.write_text(text.replace("micro_batch_size: 32", "micro_batch_size: 32\n    learning_rate: 1.0"))
    with pytest.raises(ValueError, match=r"bad\.yaml: stages\.align: unknown field\(s\) 'learning_rate'"):
        load_train_config(bad)
    bad.write_text(text.replace("type: mlp2x_gelu", "type: mlp9x"))
    with pytest.raises(ValueError, match=r"unknown projector 'mlp9x'; valid choices"):
        load_train_config(bad)


def test_cross_field_rules(tmp_path: Path) -> None:
    data = {"align": tmp_path / "a.json", "instruct": tmp_path / "i.json"}
    cfg = tiny_train_config(tmp_path, {"align": align_stage(data, batch_size=6, micro_batch_size=4)})
    with pytest.raises(
        ValueError, match=r"stages\.align: batch_size \(6\) must be a multiple of micro_batch_size"
    ):
        validate_train_config(cfg)
    cfg = tiny_train_config(
        tmp_path, {"instruct": instruct_stage(data, init_from="align"), "align": align_stage(data)}
    )
    with pytest.raises(ValueError, match=r"stages\.instruct\.init_from: stage 'align' does not run before"):
        validate_train_config(cfg)
    cfg = tiny_train_config(tmp_path, {"instruct": instruct_stage(data, llm="full")})
    cfg = replace(cfg, model=replace(cfg.model, llm=replace(cfg.model.llm, quantization="nf4")))
    with pytest.raises(ValueError, match=r"full fine-tuning needs an unquantized LLM"):
        validate_train_config(cfg)
    cfg = tiny_train_config(tmp_path, {"align": align_stage(data, modality_weights={"audio": 2.0})})
    with pytest.raises(
        ValueError, match=r"stages\.align\.modality_weights: unknown modality 'audio'; the model has: image"
    ):
        validate_train_config(cfg)
    cfg = tiny_train_config(tmp_path, {"align": align_stage(data, modality_weights={"image": 0.0})})
    with pytest.raises(ValueError, match=r"stages\.align\.modality_weights\.image: expected > 0"):
        validate_train_config(cfg)
    cfg = tiny_train_config(tmp_path, {"align": align_stage(data, cache_media_mb=-1.0)})
    with pytest.raises(
        ValueError, match=r"stages\.align\.cache_media_mb: expected >= 0 \(0 disables\), got -1"
    ):
        validate_train_config(cfg)
    stage = align_stage(data, batch_size=8, micro_batch_size=2)
    assert stage_grad_accumulation(stage, 1, "x") == 4 and stage_grad_accumulation(stage, 2, "x") == 2
    with pytest.raises(ValueError, match=r"multiple of micro_batch_size x processes \(2 x 3 = 6\)"):
        stage_grad_accumulation(stage, 3, "stages.align")


def test_only_and_contrastive_settings_are_checked(tmp_path: Path) -> None:
    data = {"align": tmp_path / "a.json", "instruct": tmp_path / "i.json"}
    for only in (["audio"], []):
        cfg = tiny_train_config(tmp_path, {"align": align_stage(data, only=only)})
        with pytest.raises(
            ValueError, match=r"stages\.align\.only: expected modalities of the model \(image\)"
        ):
            validate_train_config(cfg)
    validate_train_config(tiny_train_config(tmp_path, {"align": align_stage(data, only=["image"])}))
    cfg = tiny_train_config(
        tmp_path, {"pre": align_stage(data, objective="contrastive", contrastive=ContrastiveOptions(0.0))}
    )
    with pytest.raises(ValueError, match=r"stages\.pre\.contrastive\.temperature: expected > 0, got 0.0"):
        validate_train_config(cfg)


def contrastive_with(data: dict[str, Path], **loss_terms: float) -> TrainConfig:
    stage = align_stage(data, objective="contrastive", loss_terms=loss_terms)
    return tiny_train_config(Path("unused"), {"pre": stage})


def test_loss_terms_are_checked_by_name_and_weight(tmp_path: Path) -> None:
    data = {"align": tmp_path / "a.json", "instruct": tmp_path / "i.json"}
    validate_train_config(contrastive_with(data, word_match=0.5, infonce=0.0))
    with pytest.raises(
        ValueError,
        match=r"stages\.pre\.loss_terms: unknown loss term 'word_count' for objective contrastive; "
        r"valid names: infonce, caption_words, word_match, token_scale$",
    ):  # mlp2x_gelu adds no term: word_count is word_mix's
        validate_train_config(contrastive_with(data, word_count=1.0))
    with pytest.raises(
        ValueError, match=r"stages\.pre\.loss_terms\.caption_words: expected a weight >= 0, got -1"
    ):
        validate_train_config(contrastive_with(data, caption_words=-1.0))
    with pytest.raises(ValueError, match=r"stages\.pre\.loss_terms: every loss term has weight 0"):
        validate_train_config(contrastive_with(data, infonce=0.0, caption_words=0.0, token_scale=0.0))
    cfg = contrastive_with(data, word_count=3.0)
    cfg.model.modalities["image"].projector = ProjectorConfig(type="word_mix")
    validate_train_config(cfg)  # a term of the model's projectors
    lm = tiny_train_config(tmp_path, {"align": align_stage(data, loss_terms={"infonce": 1.0})})
    with pytest.raises(
        ValueError,
        match=r"stages\.align\.loss_terms: unknown loss term 'infonce' for objective lm; valid names: none",
    ):
        validate_train_config(lm)
    lm.model.modalities["image"].projector = ProjectorConfig(type="word_mix")
    lm.stages["align"].loss_terms = {"word_count": 1.0}
    validate_train_config(lm)


def test_loss_terms_load_from_yaml(tmp_path: Path) -> None:
    text = (PRESETS_DIR / "quickstart.yaml").read_text()
    cfg = load_train_config(PRESETS_DIR / "quickstart.yaml")
    stage = cfg.stages["pretrain_image"]
    assert stage.loss_terms == {"word_count": 3.0} and stage.contrastive == ContrastiveOptions(0.07, "idf")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        text.replace("loss_terms: {word_count: 3.0}", "loss_terms: {word_count: 3.0, wordcount: 1}")
    )
    with pytest.raises(
        ValueError, match=r"bad\.yaml: stages\.pretrain_image\.loss_terms: unknown loss term 'wordcount'"
    ):
        load_train_config(bad)
    bad.write_text(text.replace("loss_terms: {word_count: 3.0}", "contrastive: {temperature: 0.1, tau: 1}"))
    with pytest.raises(ValueError, match=r"stages\.pretrain_image\.contrastive: unknown field\(s\) 'tau'"):
        load_train_config(bad)
    bad.write_text(text.replace("loss_terms: {word_count: 3.0}", "contrastive_count_weight: 3.0"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'contrastive_count_weight'"):
        load_train_config(bad)
