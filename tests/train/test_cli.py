"""The functions behind `mm-llama train` and `mm-llama cache-features`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm_llama.config import save_config
from mm_llama.data.feature_cache import INDEX_FILE
from mm_llama.model_io import PROJECTORS_FILE
from mm_llama.train.cli import add_cache_args, add_train_args, run_cache_features, run_train
from mm_llama.train.loop import RUN_CONFIG_FILE
from tests.train.conftest import NUM_RECORDS, align_stage, tiny_train_config


def test_cache_features_then_train_from_the_command_line(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    cache = tmp_path / "cache"
    stage = align_stage(colour_world, max_steps=2, feature_cache=str(cache))
    cfg = tiny_train_config(tmp_path / "from_config", {"align": stage}, freeze_encoder=True)
    config_file = tmp_path / "train.yaml"
    save_config(cfg, config_file)

    cache_args = add_cache_args(argparse.ArgumentParser()).parse_args(["--config", str(config_file)])
    assert run_cache_features(cache_args) == [cache]
    index = json.loads((cache / INDEX_FILE).read_text())
    assert sum(len(entries) for entries in index["entries"].values()) == NUM_RECORDS

    out = tmp_path / "override"
    train_args = add_train_args(argparse.ArgumentParser()).parse_args(
        ["--config", str(config_file), "--stages", "align", "--output-dir", str(out)]
    )
    assert run_train(train_args) == out / "align"
    assert (out / "align" / PROJECTORS_FILE).is_file() and (out / RUN_CONFIG_FILE).is_file()
    assert not (tmp_path / "from_config").exists()
