"""The ``mm-llama`` command line: media flags from the modality registry, ``--plugin`` on every subcommand
that loads a model (imported before parsing), and help that imports nothing heavy."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm_llama import cli_args, modality
from mm_llama.cli import COMMANDS, build_parser, main, parse_media, plugin_files
from mm_llama.errors import MMInputError
from mm_llama.model import MultimodalLM
from mm_llama.plugins import import_plugins

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "bitsandbytes", "timm", "open_clip")


@pytest.fixture
def depth_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """``depth`` registered as a modality for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())
    modality.register_modality("depth")


def test_media_flags_of_any_modality(depth_registered: None) -> None:
    args = build_parser().parse_args(
        ["chat", "--checkpoint", "ck", "--image", "a.png", "--media", "depth=d.npy", "--media", "image=b.png"]
    )
    assert parse_media(args) == {
        "image": ["a.png", "b.png"],
        "audio": [],
        "video": [],
        "imu": [],
        "depth": ["d.npy"],
    }
    args = build_parser().parse_args(["chat", "--checkpoint", "ck", "--depth", "d.npy", "--depth", "e.npy"])
    assert parse_media(args)["depth"] == ["d.npy", "e.npy"]  # the registry gives every modality its flag
    for bad in ("depth", "=d.npy", "depth="):
        args = build_parser().parse_args(["chat", "--checkpoint", "ck", "--media", bad])
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_media(args)
    args = build_parser().parse_args(["chat", "--checkpoint", "ck", "--media", "sonar=s.bin"])
    with pytest.raises(ValueError, match="unknown modality 'sonar'.*--plugin"):
        parse_media(args)


def test_chat_flags_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    def flags() -> set[str]:
        chat = build_parser()._subparsers._group_actions[0].choices["chat"]
        return {option for action in chat._actions for option in action.option_strings}

    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())
    assert {f"--{name}" for name in modality.BUILTIN_MODALITIES} <= flags()
    assert "--depth" not in flags()
    modality.register_modality("depth")
    modality.register_modality("temperature")  # a chat option's name: given with --media only
    assert "--depth" in flags()
    args = build_parser().parse_args(["chat", "--checkpoint", "ck", "--temperature", "0.5"])
    assert args.temperature == 0.5
    assert parse_media(args)["temperature"] == []


def test_main_imports_plugins_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin's modality has its chat flag on the same command line that imports the plugin."""
    plugin = tmp_path / "sonar_plugin.py"
    plugin.write_text("from mm_llama import register_modality\n\nregister_modality('sonar')\n")
    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())
    seen: list[dict[str, list[str]]] = []
    help_text, add_args, _ = COMMANDS["chat"]
    monkeypatch.setitem(COMMANDS, "chat", (help_text, add_args, lambda args: seen.append(parse_media(args))))
    try:
        main(
            ["chat", "--checkpoint", "ck", "--sonar", "ping.bin", "--plugin", str(plugin), "Anything there?"]
        )
    finally:
        sys.modules.pop("mm_llama_plugin_sonar_plugin", None)
    assert seen[0]["sonar"] == ["ping.bin"]
    assert plugin_files(["eval", "--plugin", "a.py", "--task", "toy", "--plugin=b.py"]) == [
        Path("a.py"),
        Path("b.py"),
    ]


def test_help_defaults_are_the_library_defaults() -> None:
    """The light argument definitions state defaults that live in heavy modules; they must agree."""
    from mm_llama.data import feature_cache, toyworld

    toy = " ".join(cli_args.add_toyworld_args(argparse.ArgumentParser()).format_help().split())
    for option, value in (
        ("--n-train", toyworld.DEFAULT_N_TRAIN),
        ("--n-val", toyworld.DEFAULT_N_VAL),
        ("--n-test", toyworld.DEFAULT_N_TEST),
    ):
        assert re.search(rf"{option} N_\w+ \w+ samples per modality \(default: {value}\)", toy), option
    assert toyworld.MODALITIES == modality.BUILTIN_MODALITIES  # the --modalities choices
    cache = " ".join(cli_args.add_cache_args(argparse.ArgumentParser()).format_help().split())
    assert f"(default: {feature_cache.DEFAULT_BATCH_SIZE})" in cache


def test_help_imports_nothing_heavy() -> None:
    """``mm-llama --help`` and every subcommand's ``--help``: no torch, transformers, ... and no warnings."""
    script = f"""
import contextlib, io, sys
import mm_llama.cli
parser = mm_llama.cli.build_parser()
for command in [[], *([name] for name in mm_llama.cli.COMMANDS)]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            parser.parse_args([*command, "--help"])
        except SystemExit as stop:
            assert stop.code == 0, command
    assert "usage: mm-llama" in out.getvalue(), command
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported by --help: {result.stdout}"
    assert result.stderr == ""


@pytest.mark.parametrize("command", ["train", "chat", "eval", "cache-features", "export", "demo"])
def test_every_model_command_takes_plugins(command: str) -> None:
    required = {
        "train": ["--config", "c.yaml"],
        "chat": ["--checkpoint", "ck"],
        "eval": ["--checkpoint", "ck", "--task", "toy", "--data", "d.json"],
        "cache-features": ["--config", "c.yaml"],
        "export": ["--checkpoint", "ck", "--out", "o"],
        "demo": ["--checkpoint", "ck"],
    }[command]
    args = build_parser().parse_args([command, *required, "--plugin", "a.py", "--plugin", "b.py"])
    assert args.plugin == [Path("a.py"), Path("b.py")]


def test_a_plugin_runs_once_and_a_broken_one_is_not_kept(tmp_path: Path) -> None:
    plugin = tmp_path / "counting_plugin.py"
    plugin.write_text(
        "import builtins\nbuiltins.mm_llama_test_imports = getattr(builtins, 'mm_llama_test_imports', 0) + 1\n"
    )
    import builtins

    try:
        import_plugins([plugin, plugin])
        import_plugins([plugin])
        assert builtins.mm_llama_test_imports == 1
        other = tmp_path / "other" / "counting_plugin.py"
        other.parent.mkdir()
        other.write_text("")
        with pytest.raises(ValueError, match="same file name"):
            import_plugins([other])
        broken = tmp_path / "broken_plugin.py"
        broken.write_text("raise RuntimeError('bad plugin')\n")
        with pytest.raises(RuntimeError, match="bad plugin"):
            import_plugins([broken])
        assert "mm_llama_plugin_broken_plugin" not in sys.modules
        with pytest.raises(MMInputError, match="--plugin: file not found"):
            import_plugins([tmp_path / "nowhere.py"])
    finally:
        del builtins.mm_llama_test_imports
        sys.modules.pop("mm_llama_plugin_counting_plugin", None)


def test_interactive_chat_follows_up_on_earlier_turns(
    tiny_model: MultimodalLM,
    rgb_image: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    photo = tmp_path / "photo.png"
    Image.fromarray(rgb_image).save(photo)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nWhy?\n\n"))
    main(["chat", "--checkpoint", str(checkpoint), "--image", str(photo), "--max-new-tokens", "5"])
    printed = capsys.readouterr().out.splitlines()
    first = tiny_model.generate("<image>\nWhat is it?", images=[photo], max_new_tokens=5)
    turns = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Why?"},
    ]
    second = tiny_model.generate(turns, images=[photo], max_new_tokens=5)
    assert [line.strip() for line in printed[1:]] == [first, second]


def test_input_errors_exit_2_with_one_line(tmp_path, capsys) -> None:
    from mm_llama.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--checkpoint", str(tmp_path / "nowhere"), "What is it?"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mm-llama: error: checkpoint ") and "nowhere" in err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "--plugin",
                str(tmp_path / "missing.py"),
                "--checkpoint",
                "x",
                "--task",
                "vqav2",
                "--data",
                "y",
            ]
        )
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == f"mm-llama: error: --plugin: file not found: {tmp_path / 'missing.py'}\n"
    )
    with pytest.raises(MMInputError):  # --debug: the traceback
        main(["--debug", "chat", "--checkpoint", str(tmp_path / "nowhere"), "What is it?"])
    with pytest.raises(SystemExit) as exit_info:  # a bad toy-world argument, before anything is written
        main(["toyworld", "--out", str(tmp_path / "toy"), "--workers", "0"])
    assert exit_info.value.code == 2 and not (tmp_path / "toy").exists()
    assert capsys.readouterr().err == "mm-llama: error: workers must be >= 1, got 0\n"


@pytest.mark.parametrize("problem", ["missing", "folder", "not_an_image", "missing_audio"])
def test_chat_checks_media_before_loading_the_model(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing, folder or unreadable media file is reported (exit 2, one line naming it) before the
    checkpoint is loaded."""

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the media were checked")

    monkeypatch.setattr(MultimodalLM, "from_pretrained", must_not_load)
    flag, path = "--image", tmp_path / "x.png"
    if problem == "folder":
        path.mkdir()
    elif problem == "not_an_image":
        path.write_bytes(b"this is not a PNG")
    elif problem == "missing_audio":
        flag, path = "--audio", tmp_path / "talk.wav"
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--checkpoint", str(tmp_path / "nowhere"), flag, str(path), "What is it?"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mm-llama: error: ") and str(path) in err
    assert {"missing": "not found", "folder": "expected a file", "not_an_image": "not an image"}.get(
        problem, "not found"
    ) in err
