"""The Gradio demo: ask a checkpoint about an image, a sound, a video or an IMU recording, in a chat.

The page shows one input per modality the checkpoint has (``model.config.modalities``), a question box,
sampling controls and a chat whose last reply grows token by token. The logic lives in :func:`answer`, a
plain generator that needs no browser; :func:`build_app` only lays out components and wires them to it.
The chat is multi-turn: the model sees the earlier questions and replies (a :class:`Conversation` kept per
browser session), so "And how many are there?" refers to the image already given. A media item is attached
(its marker added) in the turn where it is first given; the same item given again is not attached twice,
and a new one joins the conversation where it appears. Clearing the chat starts a new conversation.
Only the public API is used: ``MultimodalLM.from_pretrained`` and ``model.generate(..., stream=True)``.

Run it with ``mm-llama demo --checkpoint DIR`` or ``python demo/app.py --checkpoint DIR``; it binds to
127.0.0.1 unless ``--host`` says otherwise, and makes a public share link only with ``--share``.
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import gradio as gr
except ModuleNotFoundError as e:  # gradio is the optional "demo" extra
    raise ModuleNotFoundError("the demo needs gradio: pip install 'mm_llama[demo]'") from e

from mm_llama.cli_args import add_demo_args
from mm_llama.modality import marker, with_markers
from mm_llama.model import MultimodalLM
from mm_llama.plugins import import_plugins

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 1024
MAX_TEMPERATURE = 2.0
IMU_FILE_TYPES = [".csv", ".npy", ".npz"]

MediaItem = str | Path | np.ndarray | None
"""What an input component hands over: a file path (audio, video, IMU, plugins) or an (H, W, 3) image."""
History = list[dict[str, Any]]
"""The chat in Gradio's messages format: ``{"role": "user" | "assistant", "content": ...}`` dicts."""


@dataclass
class Conversation:
    """What the model sees of a chat: the turns with their media markers, and the media in marker order."""

    messages: list[dict[str, str]] = field(default_factory=list)
    media: dict[str, list[MediaItem]] = field(default_factory=dict)

    def attached(self, name: str, item: MediaItem) -> bool:
        """Whether ``item`` is the last ``name`` item already in the conversation."""
        if not self.media.get(name):
            return False
        last = self.media[name][-1]
        if isinstance(item, np.ndarray) or isinstance(last, np.ndarray):
            return (
                isinstance(item, np.ndarray) and isinstance(last, np.ndarray) and np.array_equal(item, last)
            )
        return str(item) == str(last)


def answer(
    model: MultimodalLM,
    question: str,
    media: dict[str, MediaItem],
    history: History | None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    conversation: Conversation | None = None,
) -> Iterator[History]:
    """Append the question and a streamed reply to the chat, yielding the whole chat after each piece.

    ``media`` maps a modality to its one item, or ``None`` when not given. ``conversation`` holds the
    earlier turns the model sees; it gains this question and its reply once the reply is complete (a
    failed turn leaves it unchanged). An item it already holds (the last one of its modality) is not
    attached again, unless the question places its marker itself; a new item gets a marker (``<image>``,
    ...) added to the question. ``temperature`` 0 is greedy decoding. Any error (an unreadable file,
    markers that do not match the media, ...) becomes the assistant's message, so the page never breaks;
    its traceback goes to the log. The question and error texts are HTML-escaped, since the chat renders
    Markdown and would take ``<image>`` or ``<video>`` for a tag. Each yield is a new list, so a caller
    may keep them. A blank question with no new media yields the chat unchanged.
    """
    history = list(history or [])
    conversation = conversation if conversation is not None else Conversation()
    question = question.strip()
    new = {
        name: [item]
        for name, item in media.items()
        if item is not None and (marker(name) in question or not conversation.attached(name, item))
    }
    if not question and not new:
        yield history
        return
    shown = f"{question}\n\n(with {', '.join(new)})" if new else question
    history.append({"role": "user", "content": html.escape(shown, quote=False)})
    yield [*history, {"role": "assistant", "content": ""}]
    turn = {"role": "user", "content": with_markers(question, new)}
    all_media = {
        name: conversation.media.get(name, []) + new.get(name, []) for name in {*conversation.media, *new}
    }
    reply = ""
    try:
        pieces = model.generate(
            [*conversation.messages, turn],
            media=all_media,
            max_new_tokens=int(max_new_tokens),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            stream=True,
        )
        for piece in pieces:
            reply += piece
            yield [*history, {"role": "assistant", "content": reply.strip()}]
    except Exception as e:  # the UI boundary: show the error in the chat instead of failing the request
        logger.exception("demo: could not answer %r", question)
        yield [*history, {"role": "assistant", "content": html.escape(f"Error: {e}", quote=False)}]
        return
    conversation.messages += [turn, {"role": "assistant", "content": reply.strip()}]
    conversation.media = all_media


def media_input(name: str) -> gr.components.Component:
    """The input component for one modality; plugin modalities get a file upload."""
    if name == "image":
        return gr.Image(type="numpy", label="Image")
    if name == "audio":
        return gr.Audio(type="filepath", label="Audio")
    if name == "video":
        return gr.Video(label="Video")
    if name == "imu":
        return gr.File(type="filepath", file_types=IMU_FILE_TYPES, label="IMU recording (CSV / NPY / NPZ)")
    return gr.File(type="filepath", label=f"{name} file")


def build_app(model: MultimodalLM) -> gr.Blocks:
    """The demo page for ``model``: its media inputs, a question box, sampling controls and the chat."""
    names = list(model.config.modalities)
    with gr.Blocks(title="mm_llama demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"# mm_llama demo\nModalities: {', '.join(names) or 'text only'}. Give media, ask a question; "
            "a marker is added for each item unless your question places `<image>`, `<audio>`, ... itself. "
            "Follow-up questions see the earlier turns; Clear starts a new conversation."
        )
        with gr.Row():
            with gr.Column(scale=1):
                inputs = [media_input(name) for name in names]
                max_new_tokens = gr.Slider(
                    1, MAX_NEW_TOKENS_LIMIT, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"
                )
                temperature = gr.Slider(
                    0.0, MAX_TEMPERATURE, value=0.0, step=0.05, label="Temperature (0 = greedy)"
                )
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=480)
                question = gr.Textbox(label="Question", placeholder="What is in the picture?")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    gr.ClearButton([question, chatbot, *inputs], value="Clear")

        state = gr.State(None)  # this browser session's Conversation

        def respond(
            question_text: str,
            history: History,
            tokens: float,
            temp: float,
            conversation: Conversation | None,
            *items: MediaItem,
        ) -> Iterator[tuple[History, str, Conversation]]:
            if conversation is None or not history:  # a new session, or the chat was cleared
                conversation = Conversation()
            chats = answer(
                model, question_text, dict(zip(names, items)), history, int(tokens), temp, conversation
            )
            for chat in chats:
                yield chat, "", conversation

        wiring: dict[str, Any] = {
            "fn": respond,
            "inputs": [question, chatbot, max_new_tokens, temperature, state, *inputs],
            "outputs": [chatbot, question, state],
        }
        send.click(**wiring)
        question.submit(**wiring)
    return app


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Load a checkpoint and serve its demo until interrupted; one generation runs at a time."""
    model = MultimodalLM.from_pretrained(checkpoint).eval()
    app = build_app(model).queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=share)


def run_demo(args: argparse.Namespace) -> None:
    """``mm-llama demo``: serve the checkpoint of the parsed ``add_demo_args`` options (their ``--plugin``
    files imported first)."""
    import_plugins(args.plugin)
    serve(args.checkpoint, host=args.host, port=args.port, share=args.share)


def main(argv: Sequence[str] | None = None) -> None:
    """``python demo/app.py ARGS`` runs exactly ``mm-llama demo ARGS``."""
    parser = add_demo_args(argparse.ArgumentParser(prog="mm-llama demo"))
    run_demo(parser.parse_args(sys.argv[1:] if argv is None else argv))
