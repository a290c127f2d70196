"""The Gradio demo on a saved tiny checkpoint: streamed answers, errors shown in the chat, the inputs each
checkpoint gets, the page served on 127.0.0.1 and answering through its API, and the two launchers."""

from __future__ import annotations

import ast
import copy
import html
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

gr = pytest.importorskip("gradio")

from mm_llama import EncoderConfig, ModalityConfig, MultimodalLM, ProjectorConfig  # noqa: E402
from mm_llama.cli import main as cli_main  # noqa: E402
from mm_llama.demo import (  # noqa: E402
    MAX_UPLOAD_SIZE,
    Conversation,
    answer,
    build_app,
    describe_checkpoint,
    examples_from,
    media_input,
    toy_examples,
    uploaded,
)
from tests.conftest import tiny_config, tiny_image_modality  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_AUDIO: dict[str, Any] = {
    "max_seconds": 1.0,
    "width": 32,
    "depth": 1,
    "heads": 2,
    "stem_channels": 4,
}


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
        "Error: 2 <image> marker(s) in the text but 1 image input(s) given; "
        "put one <image> in the prompt for each image"
    )

    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    unreadable = list(answer(model, "What?", {"image": str(bad)}, [], 4, 0.0))[-1]
    assert unreadable[-1]["content"].startswith("Error: image photo.png: not an image file that PIL can read")

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
    assert all(c.type == "filepath" for c in parts if isinstance(c, (gr.Image, gr.Audio)))
    assert kinds.count(gr.Chatbot) == 1 and kinds.count(gr.Textbox) == 1
    sliders = {c.label: c for c in parts if isinstance(c, gr.Slider)}
    assert sliders["Max new tokens"].value == 128 and sliders["Temperature (0 = greedy)"].value == 0.0
    assert sliders["Top-p (with temperature > 0)"].value == 1.0
    buttons = [c.value for c in parts if isinstance(c, gr.Button)]
    assert buttons == ["Send", "Stop", "New chat"]  # none named "Clear", the chat's own trash icon


@pytest.mark.parametrize(
    ("name", "kind", "file_types"),
    [("video", gr.Video, None), ("imu", gr.File, [".csv", ".npy", ".npz"]), ("depth", gr.File, None)],
)
def test_other_modalities_get_their_input(name: str, kind: type, file_types: list[str] | None) -> None:
    component = media_input(name)
    assert type(component) is kind and component.elem_id == f"input-{name}"
    if kind is gr.File:
        assert component.type == "filepath" and component.file_types == file_types


def test_cli_and_launcher_serve_the_checkpoint(
    checkpoint: Path, model: MultimodalLM, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
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
    monkeypatch.setattr("mm_llama.demo.EXAMPLES_DIR", tmp_path / "examples")
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
    assert all(c["max_file_size"] == MAX_UPLOAD_SIZE == "20mb" for c in launched)
    assert all(gr.Image in c["inputs"] and gr.Audio not in c["inputs"] for c in launched)


def test_the_demo_does_not_import_the_cli() -> None:
    """No cli <-> demo import cycle: ``mm-llama demo`` imports the demo when it runs, and the demo takes its
    arguments from the light ``mm_llama.cli_args``."""
    tree = ast.parse((REPO / "mm_llama" / "demo.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "mm_llama.cli" not in imported and "mm_llama.cli_args" in imported


# ---- issue 15: what a person saw in the browser, each checked here without one -------------------------
TINY_IMU: dict[str, Any] = {"window": 256, "width": 16, "layers": 3}


def reply_parts(content: str) -> tuple[list[str], str]:
    """An assistant message's header notes and its reply text."""
    parts = content.split("\n\n")
    notes = [part[len("*Note: ") : -1] for part in parts if part.startswith("*Note: ")]
    return notes, "\n\n".join(part for part in parts if not part.startswith("*Note: "))


@pytest.fixture(scope="module")
def media_model() -> MultimodalLM:
    """The tiny model with an image, a 1-second audio and an IMU encoder."""
    torch.manual_seed(0)
    audio = ModalityConfig(
        encoder=EncoderConfig(type="audio_transformer", options=copy.deepcopy(TINY_AUDIO)),
        projector=ProjectorConfig(type="pool", options={"output_tokens": 4}),
    )
    imu = ModalityConfig(
        encoder=EncoderConfig(type="imu_cnn", options=copy.deepcopy(TINY_IMU)),
        projector=ProjectorConfig(type="pool", options={"output_tokens": 4}),
    )
    config = replace(tiny_config(), modalities={"image": tiny_image_modality(), "audio": audio, "imu": imu})
    return MultimodalLM(config).eval()


def test_long_chats_drop_the_oldest_turns_and_say_so(
    model: MultimodalLM, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Problem 1: at max_length 96 the fifth turn was cut silently, and every later one answered blank."""
    monkeypatch.setattr(model.processor, "max_length", 96)
    conversation: Conversation = Conversation()
    chat: list[dict[str, Any]] = []
    said = []
    for i in range(7):
        chat = list(answer(model, f"And question {i}?", {"image": image}, chat, 8, 0.0, conversation))[-1]
        notes, reply = reply_parts(chat[-1]["content"])
        assert reply and not reply.startswith("Error"), chat[-1]
        said += [n for n in notes if "oldest turn" in n]
    assert conversation.dropped_turns > 0 and len(conversation.messages) == 14
    assert said and said[0].startswith("This chat is longer than the model reads: its ")
    assert said[0].endswith(" oldest turn(s) are left out (max_length 96 tokens); New chat starts afresh.")
    assert len(said) <= conversation.dropped_turns  # said when it grows, not on every turn

    before = copy.deepcopy(conversation.messages)
    long = list(answer(model, "why " * 900, {"image": image}, chat, 8, 0.0, conversation))[-1]
    error = html.unescape(long[-1]["content"])
    assert re.fullmatch(
        r"Error: \d+ tokens exceed max_length=96 even with the newest turn alone; raise max_length or shorten it",
        error,
    )
    assert conversation.messages == before
    after = list(answer(model, "Still there?", {"image": image}, long, 8, 0.0, conversation))[-1]
    assert reply_parts(after[-1]["content"])[1] and not after[-1]["content"].startswith("Error")


def test_slider_numbers_of_any_type_sample(model: MultimodalLM, image: np.ndarray) -> None:
    """Problem 4: temperature 2, the slider's maximum, arrived as an int and always failed."""
    torch.manual_seed(0)
    last = list(answer(model, "What?", {"image": image}, [], 8.0, 2, top_p=1))[-1]
    assert last[-1]["content"] and not last[-1]["content"].startswith("Error")


def test_inputs_cut_to_the_encoder_window_are_noted_without_server_paths(
    media_model: MultimodalLM, tmp_path: Path
) -> None:
    """Problem 5: a 10 s recording was answered from its first second without a word; an IMU error showed
    the server's temporary path."""
    upload = tmp_path / "gradio" / "3f9a"
    upload.mkdir(parents=True)
    wav = upload / "beeps.wav"
    sf.write(wav, np.random.default_rng(0).uniform(-0.5, 0.5, 3 * 16000).astype(np.float32), 16000)
    expected = "audio beeps.wav: 3.0 s, the encoder reads the first 1.0 s (set chunk: true / max_seconds to read more)"
    for _ in range(2):  # the same upload in a new chat (gradio keeps it at the same path) is noted again
        conversation = Conversation()
        chat = list(answer(media_model, "How many beeps?", {"audio": str(wav)}, [], 4, 0.0, conversation))[-1]
        notes, reply = reply_parts(html.unescape(chat[-1]["content"]))
        assert notes == [expected] and str(upload) not in chat[-1]["content"]
    follow_up = list(answer(media_model, "Sure?", {"audio": str(wav)}, chat, 4, 0.0, conversation))[-1]
    assert reply_parts(follow_up[-1]["content"])[0] == []  # said once, where the input is given

    bad = upload / "walk.csv"
    bad.write_text("timestamp,acc_x\n0,1\n")
    error = list(answer(media_model, "Activity?", {"imu": str(bad)}, [], 4, 0.0))[-1][-1]["content"]
    assert error.startswith(
        "Error: IMU walk.csv: expected 6 channels (accelerometer x/y/z + gyroscope x/y/z)"
    )
    assert str(upload) not in error and "\n" not in error


def test_an_unreadable_image_upload_reaches_the_chat(media_model: MultimodalLM, tmp_path: Path) -> None:
    """Problem 3: gr.Image opened the upload with PIL before the handler ran, so the page showed only red
    "Error" badges; the reply handler takes the uploads unprocessed and the chat names the bad one."""
    bad = tmp_path / "gradio" / "photo.png"
    bad.parent.mkdir()
    bad.write_text("not an image")
    payload = gr.Image.data_model(path=str(bad), orig_name="photo.png")
    with pytest.raises(OSError):
        gr.Image(type="filepath").preprocess(payload)
    respond = [f for f in build_app(media_model).fns.values() if f.name == "respond"]
    assert len(respond) == 2 and not any(f.preprocess for f in respond)  # Send and Enter
    path = uploaded(payload.model_dump())
    assert path == str(bad) and uploaded(None) is None
    error = list(answer(media_model, "What?", {"image": path}, [], 4, 0.0))[-1][-1]["content"]
    assert error.startswith("Error: image photo.png: not an image file that PIL can read")
    assert str(bad.parent) not in error and "\n" not in error


def test_stop_ends_the_reply_and_keeps_what_was_written(model: MultimodalLM, image: np.ndarray) -> None:
    """Problem 6: Stop. The conversation keeps the reply up to where it stopped."""
    stopped = {"now": False}
    conversation = Conversation()
    chats = []
    for chat in answer(
        model, "Go on", {"image": image}, [], 300, 0.0, conversation, stop=lambda: stopped["now"]
    ):
        chats.append(chat)
        stopped["now"] = stopped["now"] or bool(chat[-1]["content"])
    assert chats[-1][-1]["content"].endswith(" *(stopped)*")
    reply = conversation.messages[-1]["content"]
    assert reply and chats[-1][-1]["content"] == f"{html.escape(reply, quote=False)} *(stopped)*"
    full = model.generate("<image>\nGo on", images=[image], max_new_tokens=300)
    assert full.startswith(reply) and len(reply) < len(full)


def test_examples_fill_the_inputs(model: MultimodalLM, tmp_path: Path) -> None:
    """Problem 6: examples. A run's own held-out questions (one per question type), else the toy world's."""
    data = tmp_path / "run" / "data"
    (data / "images" / "test").mkdir(parents=True)
    records = [
        {
            "id": "a",
            "image": "images/test/0.png",
            "question_type": "kind",
            "conversations": [{"value": "<image>\nKind?"}],
        },
        {
            "id": "b",
            "image": "images/test/1.png",
            "question_type": "kind",
            "conversations": [{"value": "Kind? <image>"}],
        },
        {
            "id": "c",
            "audio": "audio/test/0.wav",
            "question_type": "digit",
            "conversations": [{"value": "<audio> Digit?"}],
        },
        {
            "id": "d",
            "image": "images/test/1.png",
            "question_type": "choice",
            "conversations": [{"value": "<image>Which?"}],
        },
    ]
    (data / "instruct_test.json").write_text(json.dumps(records))
    (data.parent / "train_config.yaml").write_text(
        f"stages:\n  align:\n    data: [{data / 'align_train.json'}]\n"
    )
    (data.parent / "align").mkdir()
    assert examples_from(data / "instruct_test.json", ["image"]) == [
        ["Kind?", str(data / "images/test/0.png")],
        ["Which?", str(data / "images/test/1.png")],
    ]
    page = build_app(model, data.parent / "align", tmp_path / "toy")
    dataset = next(c for c in components(page) if isinstance(c, gr.Dataset))
    assert dataset.label == "Examples (held-out questions of this run)" and len(dataset.samples) == 2
    assert not (tmp_path / "toy").exists()

    rows = toy_examples(["image", "depth", "audio"], tmp_path)
    assert len(rows) == 2 and all(len(row) == 4 for row in rows)
    for row, column in zip(rows, (1, 3)):
        assert row[0] and "<" not in row[0]  # the question, its marker left to the demo
        assert Path(row[column]).is_file() and row[2] is None
        assert [i for i, v in enumerate(row[1:], 1) if v is not None] == [column]
    assert toy_examples(["depth"], tmp_path / "none") == []


def test_the_page_says_what_the_checkpoint_is(model: MultimodalLM, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "instruct").mkdir(parents=True)
    (run / "train_config.yaml").write_text("stages:\n  align: {}\n  instruct: {}\n  later: {}\n")
    metrics = {"checkpoint": "runs/x/instruct", "accuracy": 97.25, "per_modality": {"image": 98.0}}
    (run / "metrics.json").write_text(json.dumps({**metrics, "num_questions": 400}))
    assert describe_checkpoint(model, run / "instruct") == (
        "**Checkpoint:** `instruct` · **Modalities:** image · **Stages:** align → instruct · "
        "**Held-out accuracy:** 97.2% (400 questions; image 98.0%)"
    )
    (run / "metrics.json").write_text(json.dumps({**metrics, "checkpoint": "runs/x/align"}))
    assert describe_checkpoint(model, run / "instruct").endswith(
        "**Held-out accuracy:** not measured (no metrics.json beside the checkpoint)"
    )
    assert describe_checkpoint(model, None) == "**Modalities:** image"
    assert "**Stages:** not recorded" in describe_checkpoint(model, tmp_path)
