"""The plugin example (examples/new_modality.py) end to end, and ``mm-llama train --plugin``.

The example runs in subprocesses: importing it registers the ``depth`` modality and the ``depth_cnn``
encoder, which must not leak into the registries of this test process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mm_llama.config import from_dict
from mm_llama.errors import MMInputError
from mm_llama.model_io import CONFIG_FILE, ENCODERS_DIR, PROJECTORS_FILE
from mm_llama.train.cli import add_train_args, run_train
from mm_llama.train.config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "new_modality.py"
DOC = REPO / "docs" / "new_modality.md"
TIMEOUT_S = 300


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the venv's Python from the repository root on one thread (tiny models run faster on one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def printed(pattern: str, stdout: str) -> str:
    match = re.search(pattern, stdout, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in the example's output:\n{stdout}"
    return match.group(1)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The example with the tiny LLM, 4 steps: its output folder and its stdout."""
    out = tmp_path_factory.mktemp("depth")
    result = run_python(str(EXAMPLE), "--out", str(out), "--llm", "tiny", "--steps", "4")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return out, result.stdout


def test_the_example_trains_loads_and_answers(example_run: tuple[Path, str]) -> None:
    out, stdout = example_run
    before = float(printed(r"^eval loss before training: ([\d.]+)$", stdout))
    after = float(printed(r"^eval loss after training: ([\d.]+)$", stdout))
    assert after < before
    printed(r"^answer: (.*)$", stdout)
    checkpoint = Path(printed(r"^checkpoint: (.+)$", stdout))
    assert checkpoint == out / "run" / "align"
    for name in (CONFIG_FILE, PROJECTORS_FILE, f"{ENCODERS_DIR}/depth.safetensors"):
        assert (checkpoint / name).is_file(), name
    assert len(list((out / "data" / "maps").glob("*.npy"))) > 0


def test_train_from_the_command_line_with_the_example_as_plugin(
    example_run: tuple[Path, str], tmp_path: Path
) -> None:
    config = example_run[0] / "train.yaml"
    with pytest.raises(ValueError, match="unknown encoder 'depth_cnn'"):
        load_train_config(config)  # without the plugin, the config names an encoder nobody registered

    out = tmp_path / "cli"
    args = ["--plugin", str(EXAMPLE), "--config", str(config), "--output-dir", str(out)]
    result = run_python("-m", "mm_llama.train", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "align" / PROJECTORS_FILE).is_file()
    assert (out / "align" / ENCODERS_DIR / "depth.safetensors").is_file()


def test_chat_with_the_plugin_modality_from_the_command_line(example_run: tuple[Path, str]) -> None:
    out, stdout = example_run
    checkpoint = printed(r"^checkpoint: (.+)$", stdout)
    depth_map = sorted((out / "data" / "maps").glob("*.npy"))[0]
    args = ["chat", "--checkpoint", checkpoint, "--media", f"depth={depth_map}", "--max-new-tokens", "3"]
    without = run_python("-m", "mm_llama.cli", *args, "Is it near or far?")
    assert without.returncode != 0 and "depth" in without.stderr  # the checkpoint names an unknown modality
    result = run_python("-m", "mm_llama.cli", *args, "--plugin", str(EXAMPLE), "Is it near or far?")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip()  # the tiny random LLM's answer: any text


def test_a_missing_plugin_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.py"
    args = add_train_args(argparse.ArgumentParser()).parse_args(
        ["--plugin", str(missing), "--config", str(tmp_path / "train.yaml")]
    )
    with pytest.raises(MMInputError, match="--plugin: file not found: .*nowhere.py"):
        run_train(args)


def test_the_documented_training_yaml_has_the_train_config_layout() -> None:
    block = re.search(r"^## 3\. The config$.*?^```yaml$(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert block, f"no YAML block under '## 3. The config' in {DOC}"
    cfg = from_dict(TrainConfig, yaml.safe_load(block.group(1)))
    assert cfg.model.modalities["depth"].encoder.type == "depth_cnn"
    assert list(cfg.stages) == ["align"]


def test_the_documented_encoder_is_the_example_encoder() -> None:
    block = re.search(
        r"^(class DepthPreprocessor\(MediaPreprocessor\):$.*?)^```$",
        DOC.read_text(),
        re.MULTILINE | re.DOTALL,
    )
    assert block, f"no DepthPreprocessor and DepthEncoder code block in {DOC}"
    assert "class DepthEncoder(ModalityEncoder):" in block.group(1)
    example_lines = {line.strip() for line in EXAMPLE.read_text().splitlines()}
    stale = [
        line for line in block.group(1).splitlines() if line.strip() and line.strip() not in example_lines
    ]
    assert not stale, f"{DOC} shows lines that examples/new_modality.py no longer has: {stale}"
