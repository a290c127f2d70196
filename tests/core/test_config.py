"""Typed configs and registries: strict loading, YAML round trip, errors that list the choices."""

from __future__ import annotations

import pytest

from mm_llama.config import ModelConfig, from_dict, load_config, save_config
from mm_llama.encoders import ENCODERS
from mm_llama.modality import marker, register_modality
from mm_llama.projectors import PROJECTORS
from mm_llama.registry import Registry
from tests.conftest import tiny_config


def test_yaml_round_trip(tmp_path) -> None:
    config = tiny_config()
    save_config(config, tmp_path / "model.yaml")
    assert load_config(ModelConfig, tmp_path / "model.yaml") == config
    save_config(config, tmp_path / "model.json")
    assert load_config(ModelConfig, tmp_path / "model.json") == config


def test_unknown_field_names_path_and_choices(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  llm:\n    name_or_pth: x\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*llm.*'name_or_pth'.*valid fields: name_or_path"):
        load_config(ModelConfig, path, section="model")


def test_wrong_types_and_literals() -> None:
    with pytest.raises(ValueError, match=r"llm\.dtype: expected one of \['float32', 'bfloat16', 'float16'\]"):
        from_dict(ModelConfig, {"llm": {"dtype": "fp8"}})
    with pytest.raises(ValueError, match=r"max_length: expected int, got str"):
        from_dict(ModelConfig, {"max_length": "long"})
    with pytest.raises(ValueError, match=r"modalities.image: missing required field 'encoder'"):
        from_dict(ModelConfig, {"modalities": {"image": {}}})


def test_missing_config_file_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config(ModelConfig, tmp_path / "nothere.yaml")


def test_registries_exact_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'hf-vision'; valid choices: .*hf_vision"):
        ENCODERS.get("hf-vision")
    with pytest.raises(ValueError, match=r"unknown projector 'mlp'; valid choices: .*linear.*mlp2x_gelu"):
        PROJECTORS.get("mlp")
    registry: Registry[type] = Registry("widget")
    registry.register("a", int)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a", float)


def test_unknown_encoder_option_is_named() -> None:
    from mm_llama import MultimodalLM

    config = tiny_config()
    config.modalities["image"].encoder.options["selct_layer"] = -1
    with pytest.raises(ValueError, match=r"modalities.image.encoder.options.*'selct_layer'.*select_layer"):
        MultimodalLM(config)


def test_register_modality(monkeypatch: pytest.MonkeyPatch) -> None:
    from mm_llama import modality

    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())  # restored after the test
    assert register_modality("thermal") == "<thermal>" == marker("thermal")
    with pytest.raises(ValueError, match="must match"):
        register_modality("Bad Name")
    with pytest.raises(ValueError, match="unknown modality 'sonar'"):
        marker("sonar")


def test_yaml_exponent_numbers_are_floats(tmp_path) -> None:
    from mm_llama.train.config import load_train_config

    file = tmp_path / "train.yaml"
    file.write_text(
        "model: {}\nstages:\n  a: {data: [x.json], lr: 1e-3, projector_lr: 2E-5, weight_decay: .5e+1}\n"
    )
    stage = load_train_config(file).stages["a"]
    assert (stage.lr, stage.projector_lr, stage.weight_decay) == (1e-3, 2e-5, 5.0)
    file.write_text("model: {}\nstages:\n  a: {data: [x.json], lr: fast}\n")
    with pytest.raises(ValueError, match=r"stages\.a\.lr: expected float, got str 'fast'"):
        load_train_config(file)
