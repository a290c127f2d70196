"""The Gradio demo on a saved tiny checkpoint: streamed answers, errors shown in the chat, the inputs each
checkpoint gets, the page served on 127.0.0.1 and answering through its API, and the two launchers."""

from __future__ import annotations

import ast
import copy
import html
import importlib.util
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from mm_llama import EncoderConfig, ModalityConfig, MultimodalLM, ProjectorConfig  # noqa: E402
from mm_llama.cli import main as cli_main  # noqa: E402
from mm_llama.demo import Conversation, answer, build_app, media_input  # noqa: E402
from tests.conftest import tiny_config, tiny_image_modality  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_AUDIO: dict[str, Any] = {
    "max_seconds": 1.0,
    "width": 32,
    "depth": 1,
    "heads": 2,
    "stem_channels": 4,
}
HTTP_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image-only tiny model, saved with its random LLM."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo") / "ckpt"
    MultimodalLM(tiny_config()).save_pretrained(path, copy_llm=True)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MultimodalLM:
    return MultimodalLM.from_pretrained(checkpoint).eval()


@pytest.fixture
def image() -> np.ndarray:
    """What gr.Image(type="numpy") hands over: (H, W, 3) uint8."""
    return np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def components(app: gr.Blocks) -> list[gr.components.Component]:
    return [b for b in app.blocks.values() if isinstance(b, gr.components.Component)]


def test_answer_streams_a_growing_reply(model: MultimodalLM, image: np.ndarray) -> None:
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chats = list(answer(model, "What is it?", {"image": image}, earlier, max_new_tokens=12, temperature=0.0))

    assert earlier == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert all(chat[:2] == earlier for chat in chats)
    assert all(chat[2] == {"role": "user", "content": "What is it?\n\n(with image)"} for chat in chats)
    replies = [chat[3]["content"] for chat in chats]
    assert all(chat[3]["role"] == "assistant" for chat in chats) and replies[0] == ""
    assert all(later.startswith(before) for before, later in zip(replies, replies[1:]))
    assert len(set(replies)) >= 3  # the empty bubble, then at least two growing pieces
    expected = model.generate("<image>\nWhat is it?", images=[image], max_new_tokens=12)
    assert replies[-1] == expected and expected


def test_answer_keeps_markers_the_question_places(model: MultimodalLM, image: np.ndarray) -> None:
    last = list(answer(model, "Describe <image> briefly.", {"image": image}, None, 6, 0.0))[-1]
    assert last[0]["content"] == "Describe &lt;image&gt; briefly.\n\n(with image)"
    assert last[1]["content"] == model.generate("Describe <image> briefly.", images=[image], max_new_tokens=6)


def test_answer_samples_with_a_temperature(model: MultimodalLM, image: np.ndarray) -> None:
    torch.manual_seed(1)
    last = list(answer(model, "What?", {"image": image}, [], max_new_tokens=8, temperature=1.5))[-1]
    assert last[1]["role"] == "assistant" and last[1]["content"]
    assert not last[1]["content"].startswith("Error")


def test_errors_become_chat_messages(model: MultimodalLM, image: np.ndarray, tmp_path: Path) -> None:
    mismatch = list(answer(model, "Compare <image> and <image>.", {"image": image}, [], 4, 0.0))[-1]
    assert mismatch[-1]["role"] == "assistant"
    assert html.unescape(mismatch[-1]["content"]) == (
        "Error: prompt 0: 2 <image> marker(s) in the text but 1 image input(s) given; "
        "put one <image> in the prompt for each image"
    )

    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    unreadable = list(answer(model, "What?", {"image": str(bad)}, [], 4, 0.0))[-1]
    assert unreadable[-1]["content"].startswith(f"Error: image {bad}: not an image file that PIL can read")

    missing = list(answer(model, "<image> What?", {"image": None}, [], 4, 0.0))[-1]
    assert "1 &lt;image&gt; marker(s) in the text but 0 image input(s)" in missing[-1]["content"]


def test_follow_up_questions_see_the_earlier_turns(model: MultimodalLM, image: np.ndarray) -> None:
    conversation = Conversation()
    first = list(answer(model, "What is it?", {"image": image}, [], 6, 0.0, conversation))[-1]
    reply = first[1]["content"]
    assert conversation.messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": reply},
    ]
    # the same picture again (a new array, as gradio hands over) is not attached twice
    second = list(answer(model, "And its colour?", {"image": image.copy()}, first, 6, 0.0, conversation))[-1]
    assert second[2] == {"role": "user", "content": "And its colour?"}
    turns = [*conversation.messages[:2], {"role": "user", "content": "And its colour?"}]
    assert second[3]["content"] == model.generate(turns, images=[image], max_new_tokens=6)
    assert len(conversation.messages) == 4 and len(conversation.media["image"]) == 1

    other = np.flipud(image).copy()  # a new picture joins the conversation where it is given
    third = list(answer(model, "And now?", {"image": other}, second, 6, 0.0, conversation))[-1]
    assert third[4] == {"role": "user", "content": "And now?\n\n(with image)"}
    assert conversation.messages[4] == {"role": "user", "content": "<image>\nAnd now?"}
    assert len(conversation.media["image"]) == 2 and conversation.media["image"][1] is other

    before = copy.deepcopy(conversation.messages)  # a failed turn leaves the conversation as it was
    failed = list(
        answer(model, "Compare <image> and <image>.", {"image": other}, third, 4, 0.0, conversation)
    )
    assert failed[-1][-1]["content"].startswith("Error:")
    assert conversation.messages == before and len(conversation.media["image"]) == 2


def test_blank_question_without_media_changes_nothing(model: MultimodalLM) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert list(answer(model, "   ", {"image": None}, history, 4, 0.0)) == [history]


def test_build_app_shows_the_checkpoint_modalities() -> None:
    torch.manual_seed(0)
    audio = ModalityConfig(
        encoder=EncoderConfig(type="audio_transformer", options=copy.deepcopy(TINY_AUDIO)),
        projector=ProjectorConfig(type="linear"),
    )
    config = replace(tiny_config(), modalities={"image": tiny_image_modality(), "audio": audio})
    model = MultimodalLM(config)
    parts = components(build_app(model))

    kinds = [type(c) for c in parts]
    assert kinds.count(gr.Image) == 1 and kinds.count(gr.Audio) == 1
    assert gr.Video not in kinds and gr.File not in kinds
    assert next(c for c in parts if isinstance(c, gr.Audio)).type == "filepath"
    assert kinds.count(gr.Chatbot) == 1 and kinds.count(gr.Textbox) == 1
    sliders = {c.label: c for c in parts if isinstance(c, gr.Slider)}
    assert sliders["Max new tokens"].value == 128 and sliders["Temperature (0 = greedy)"].value == 0.0


@pytest.mark.parametrize(
    ("name", "kind", "file_types"),
    [("video", gr.Video, None), ("imu", gr.File, [".csv", ".npy", ".npz"]), ("depth", gr.File, None)],
)
def test_other_modalities_get_their_input(name: str, kind: type, file_types: list[str] | None) -> None:
    component = media_input(name)
    assert type(component) is kind
    if kind is gr.File:
        assert component.type == "filepath" and component.file_types == file_types


@pytest.fixture
def served(model: MultimodalLM) -> Iterator[str]:
    """The app for the tiny model, launched on 127.0.0.1; yields its URL and closes it afterwards."""
    app = build_app(model).queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_app_serves_the_page_and_answers(
    served: str, model: MultimodalLM, image: np.ndarray, tmp_path: Path
) -> None:
    with urllib.request.urlopen(served, timeout=HTTP_TIMEOUT_S) as response:
        assert response.status == 200
        assert "mm_llama demo" in response.read().decode()

    from gradio_client import Client, handle_file

    Image.fromarray(image).save(tmp_path / "photo.png")
    client = Client(served, verbose=False, download_files=False)
    chat, question = client.predict(
        "What is it?", [], 6, 0.0, handle_file(str(tmp_path / "photo.png")), api_name="/respond"
    )
    assert question == ""
    expected = model.generate("<image>\nWhat is it?", images=[image], max_new_tokens=6)
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert chat[1]["content"][0]["text"] == expected

    # the follow-up sees the first turn: the session keeps the conversation between calls
    chat, _ = client.predict(
        "Why?", chat, 6, 0.0, handle_file(str(tmp_path / "photo.png")), api_name="/respond"
    )
    turns = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "Why?"},
    ]
    assert [m["role"] for m in chat] == ["user", "assistant"] * 2
    assert chat[3]["content"][0]["text"] == model.generate(turns, images=[image], max_new_tokens=6)


def test_cli_and_launcher_serve_the_checkpoint(
    checkpoint: Path, model: MultimodalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[Path] = []
    launched: list[dict[str, Any]] = []

    def fake_load(path: str | Path) -> MultimodalLM:  # the fixture already loaded this checkpoint
        loaded.append(Path(path))
        return model

    def fake_launch(app: gr.Blocks, **kwargs: Any) -> None:
        launched.append({"inputs": [type(c) for c in components(app)], **kwargs})

    monkeypatch.setattr(MultimodalLM, "from_pretrained", fake_load)
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    cli_main(["demo", "--checkpoint", str(checkpoint)])
    spec = importlib.util.spec_from_file_location("demo_app", REPO / "demo" / "app.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.main(["--checkpoint", str(checkpoint), "--port", "7999", "--share"])

    assert loaded == [checkpoint, checkpoint]
    assert [(c["server_name"], c["server_port"], c["share"]) for c in launched] == [
        ("127.0.0.1", 7860, False),
        ("127.0.0.1", 7999, True),
    ]
    assert all(gr.Image in c["inputs"] and gr.Audio not in c["inputs"] for c in launched)


def test_the_demo_does_not_import_the_cli() -> None:
    """No cli <-> demo import cycle: ``mm-llama demo`` imports the demo when it runs, and the demo takes its
    arguments from the light ``mm_llama.cli_args``."""
    tree = ast.parse((REPO / "mm_llama" / "demo.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "mm_llama.cli" not in imported and "mm_llama.cli_args" in imported
