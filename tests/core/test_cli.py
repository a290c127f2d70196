"""The ``mm-llama`` command line: media flags, and ``--plugin`` on every subcommand that loads a model."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm_llama.cli import build_parser, main, parse_media
from mm_llama.model import MultimodalLM
from mm_llama.plugins import import_plugins


def test_media_flags_of_any_modality() -> None:
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
    for bad in ("depth", "=d.npy", "depth="):
        args = build_parser().parse_args(["chat", "--checkpoint", "ck", "--media", bad])
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_media(args)


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
        with pytest.raises(FileNotFoundError, match="--plugin: file not found"):
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
