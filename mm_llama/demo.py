"""The Gradio demo: ask a checkpoint about an image, a sound, a video, an IMU recording or a plugin
modality's file, in a chat.

The page shows what the checkpoint is (its modalities, the training stages that made it and its held-out
accuracy, from the ``train_config.yaml`` and ``metrics.json`` the quickstart and ``mm-llama train`` write
beside it), one input per modality it has (``model.config.modalities``; a plugin modality gets a file
upload), a question box, sampling controls (max new tokens, temperature, top-p), Send / Stop / New chat,
examples that fill the inputs in one click (the run's own held-out questions, the real-data run's
recordings among them, else toy-world files), and a chat whose last reply grows token by token.

The logic lives in :func:`answer`, a plain generator that needs no browser; :func:`build_app` only lays out
components and wires them to it. The chat is multi-turn: the model sees the earlier questions and replies
(a :class:`Conversation` kept per browser session), so "And how many are there?" refers to the image
already given. A media item is attached (its marker added) in the turn where it is first given; the same
item given again is not attached twice. When a chat outgrows the model's ``max_length``, its oldest turns
are left out whole and the reply says so; inputs the encoder reads only part of (a recording longer than
its window) are said in the reply's header too. Every error (an unreadable upload, a question too long to
fit) is one line in the chat naming the input by its file name, never by a server path.

Only the public API is used: ``MultimodalLM.from_pretrained`` and ``model.generate(..., stream=True)``.
Run it with ``mm-llama demo --checkpoint DIR`` or ``python demo/app.py --checkpoint DIR``; it binds to
127.0.0.1 unless ``--host`` says otherwise, and makes a public share link only with ``--share``.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import StoppingCriteria, StoppingCriteriaList

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
MAX_UPLOAD_SIZE = "20mb"
"""Larger uploads are refused by the page before they reach the server (gradio's ``max_file_size``)."""
METRICS_FILE = "metrics.json"
"""Written by the quickstart beside the stage folders: held-out accuracy and the checkpoint it measured."""
RUN_CONFIG_FILE = "train_config.yaml"
"""Written by training beside the stage folders: the stages, in order (``mm_llama.train.loop``)."""
EXAMPLES_DIR = Path(tempfile.gettempdir()) / "mm_llama_demo_examples"
"""Where the toy-world example files are written (seeded: the same bytes every time)."""
EXAMPLE_SEED = 0
MAX_EXAMPLES = 8
HELD_OUT_FILE = "instruct_test.json"
"""The held-out questions the quickstart and the real-data run evaluate on, beside their training data."""
BUSY_MESSAGE = (
    "Still writing the last reply: your question stays in the box. Send it when the reply is done, "
    "or press Stop."
)
STOPPED_MARK = "*(stopped)*"

MediaItem = str | Path | np.ndarray | None
"""What an input component hands over: a file path, or an (H, W, 3) image array from Python callers."""
History = list[dict[str, Any]]
"""The chat in Gradio's messages format: ``{"role": "user" | "assistant", "content": ...}`` dicts."""


@dataclass
class Conversation:
    """What the model sees of a chat: the turns with their media markers, and the media in marker order."""

    messages: list[dict[str, str]] = field(default_factory=list)
    media: dict[str, list[MediaItem]] = field(default_factory=dict)
    dropped_turns: int = 0
    """How many oldest turns the last prompt left out to fit ``max_length`` (said again only when it grows)."""

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


class _StopWhen(StoppingCriteria):
    """Ends generation (in transformers' thread) as soon as ``stop()`` is true: the Stop button."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)


class _Notices(logging.Handler):
    """Collects the warnings mm_llama logs in one thread (clipped inputs, dropped turns) while it is
    attached, so they reach the reply of the request that caused them and no other."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)


_NOTES_BY_INPUT: dict[str, list[str]] = {}
"""The encoders' clip notices by input path: they log once per file per process, but a file uploaded
again (gradio stores the same content at the same path) must be noted in its new chat too."""


def _public(text: str, media: dict[str, list[MediaItem]]) -> str:
    """``text`` on one line, with each media file named by its file name instead of its server path."""
    for items in media.values():
        for item in items:
            if isinstance(item, (str, Path)):
                text = text.replace(str(item), Path(item).name)
    return " ".join(text.split())


def _notes(
    records: list[logging.LogRecord],
    new: dict[str, list[MediaItem]],
    conversation: Conversation,
    max_length: int,
) -> list[str]:
    """The reply header's lines: inputs the encoders read only part of, and oldest turns newly left out."""
    paths = [str(i) for items in new.values() for i in items if isinstance(i, (str, Path))]
    notes: list[str] = []
    for record in records:
        dropped = getattr(record, "dropped_turns", None)
        if dropped is None:
            notes.append(record.getMessage())
            for path in (p for p in paths if p in notes[-1]):
                _NOTES_BY_INPUT.setdefault(path, []).append(notes[-1])
        elif dropped > conversation.dropped_turns:
            notes.append(
                f"This chat is longer than the model reads: its {dropped} oldest turn(s) are left out "
                f"(max_length {max_length} tokens); New chat starts afresh."
            )
    for path in paths:
        notes += [n for n in dict.fromkeys(_NOTES_BY_INPUT.get(path, [])) if n not in notes]
    return [_public(n, new) for n in notes]


def _content(notes: list[str], reply: str, stopped: bool = False) -> str:
    """An assistant message: the notes in italics above the reply (HTML-escaped: the chat renders
    Markdown and would take ``<image>`` for a tag)."""
    head = "".join(f"*Note: {html.escape(n, quote=False)}*\n\n" for n in notes)
    tail = f" {STOPPED_MARK}" if stopped else ""
    return f"{head}{html.escape(reply, quote=False)}{tail}".strip()


def answer(
    model: MultimodalLM,
    question: str,
    media: dict[str, MediaItem],
    history: History | None,
    max_new_tokens: float = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    conversation: Conversation | None = None,
    top_p: float = 1.0,
    stop: Callable[[], bool] | None = None,
) -> Iterator[History]:
    """Append the question and a streamed reply to the chat, yielding the whole chat after each piece.

    ``media`` maps a modality to its one item, or ``None`` when not given. ``conversation`` holds the
    earlier turns the model sees; it gains this question and its reply once the reply is complete or
    stopped (a failed turn leaves it unchanged). An item it already holds (the last one of its modality) is
    not attached again, unless the question places its marker itself; a new item gets a marker
    (``<image>``, ...) added to the question. ``temperature`` 0 is greedy decoding; numbers may arrive as
    ints or floats (sliders send either). ``stop()`` true ends the reply where it is (the Stop button).

    The reply's header notes what the model does not see: inputs cut to the encoder's window, and oldest
    turns left out to fit ``max_length``. Any error (an unreadable file, a question too long to fit,
    markers that do not match the media, ...) becomes the assistant's message, one line naming the input
    by file name, so the page never breaks; its traceback goes to the log. Each yield is a new list, so a
    caller may keep them. A blank question with no new media yields the chat unchanged.
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
    stop = stop or (lambda: False)
    reply, notes = "", []
    try:
        temperature, top_p = float(temperature), float(top_p)
        notices = _Notices()
        logging.getLogger("mm_llama").addHandler(notices)
        try:  # the media are read here, in this thread; the pieces come from transformers' thread
            pieces = model.generate(
                [*conversation.messages, turn],
                media=all_media,
                max_new_tokens=int(max_new_tokens),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
                top_p=top_p,
                stopping_criteria=StoppingCriteriaList([_StopWhen(stop)]),
                stream=True,
            )
        finally:
            logging.getLogger("mm_llama").removeHandler(notices)
        notes = _notes(notices.records, new, conversation, model.processor.max_length)
        if notes:
            yield [*history, {"role": "assistant", "content": _content(notes, "")}]
        for piece in pieces:
            reply += piece
            yield [*history, {"role": "assistant", "content": _content(notes, reply.strip())}]
    except Exception as e:  # the UI boundary: show the error in the chat instead of failing the request
        logger.exception("demo: could not answer %r", question)
        # generate() names its one prompt "prompt 0"; the chat has one question at a time
        error = _public(f"Error: {e}", all_media).replace("Error: prompt 0: ", "Error: ")
        yield [*history, {"role": "assistant", "content": _content(notes, error)}]
        return
    if stop():
        yield [*history, {"role": "assistant", "content": _content(notes, reply.strip(), stopped=True)}]
    dropped = [getattr(r, "dropped_turns", None) for r in notices.records]
    conversation.dropped_turns = next((d for d in dropped if d is not None), 0)
    conversation.messages += [turn, {"role": "assistant", "content": reply.strip()}]
    conversation.media = all_media


def uploaded(value: Any) -> MediaItem:
    """An input's value as the reply handler gets it: the uploaded file's path, or ``None``.

    The handler runs with ``preprocess=False``: ``gr.Image`` opens every upload with PIL before a handler
    runs, so a bad file only showed red "Error" badges; unprocessed, each input is its upload's file data
    (already moved to gradio's upload folder and checked to be there), and :func:`answer` says in the chat
    what is wrong with a bad one."""
    return value.get("path") if isinstance(value, dict) else value


def media_input(name: str) -> gr.components.Component:
    """The input component for one modality, each with its own label; plugin modalities get a file upload.
    Every one hands over a file path."""
    if name == "image":
        return gr.Image(type="filepath", label="Image", elem_id="input-image")
    if name == "audio":
        return gr.Audio(type="filepath", label="Audio", elem_id="input-audio")
    if name == "video":
        return gr.Video(label="Video", elem_id="input-video")
    if name == "imu":
        return gr.File(
            type="filepath",
            file_types=IMU_FILE_TYPES,
            label="IMU recording (CSV / NPY / NPZ)",
            elem_id="input-imu",
        )
    return gr.File(type="filepath", label=f"{name} file", elem_id=f"input-{name}")


def _stage_names(checkpoint: Path) -> list[str]:
    """The stages that made ``checkpoint`` (a stage folder ``<output_dir>/<stage>``): those of the run's
    ``train_config.yaml`` up to it, in order; empty when there is none."""
    config = checkpoint.parent / RUN_CONFIG_FILE
    if not config.is_file():
        return []
    stages = list((yaml.safe_load(config.read_text()) or {}).get("stages") or {})
    return stages[: stages.index(checkpoint.name) + 1] if checkpoint.name in stages else []


def _metrics(checkpoint: Path) -> dict[str, Any] | None:
    """``metrics.json`` in the checkpoint folder, or beside it when it names this checkpoint."""
    for path in (checkpoint / METRICS_FILE, checkpoint.parent / METRICS_FILE):
        if path.is_file():
            metrics = json.loads(path.read_text())
            named = metrics.get("checkpoint")
            if path.parent == checkpoint or (named and Path(named).name == checkpoint.name):
                return metrics
    return None


def describe_checkpoint(model: MultimodalLM, checkpoint: Path | None) -> str:
    """The page's Markdown line about the model: its folder, modalities, stages and held-out accuracy."""
    names = ", ".join(model.config.modalities) or "text only"
    parts = [f"**Modalities:** {names}"]
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        parts.insert(0, f"**Checkpoint:** `{checkpoint.name}`")
        stages = _stage_names(checkpoint)
        parts.append(f"**Stages:** {' → '.join(stages)}" if stages else "**Stages:** not recorded")
        metrics = _metrics(checkpoint)
        if metrics is not None and "accuracy" in metrics:
            per = metrics.get("per_modality") or {}
            detail = ", ".join(f"{m} {a:.1f}%" for m, a in per.items())
            count = f"{metrics['num_questions']} questions" if "num_questions" in metrics else ""
            extra = "; ".join(x for x in (count, detail) if x)
            parts.append(
                f"**Held-out accuracy:** {metrics['accuracy']:.1f}%" + (f" ({extra})" if extra else "")
            )
        else:
            parts.append(f"**Held-out accuracy:** not measured (no {METRICS_FILE} beside the checkpoint)")
    return " · ".join(parts)


def examples_from(records_file: Path, names: Sequence[str]) -> list[list[Any]]:
    """The first question of each question type in a LLaVA-format records file (media paths relative to
    it), as rows ``[question, *items]`` for the inputs ``names`` (``None`` for the others); the question
    without its marker, which the demo adds. Records of modalities the model lacks are skipped."""
    rows: list[list[Any]] = []
    types: set[str] = set()
    for record in json.loads(records_file.read_text()):
        name = next((n for n in names if n in record), None)
        kind = record.get("question_type", name)
        if name is None or kind in types or len(rows) == MAX_EXAMPLES:
            continue
        types.add(kind)
        question = record["conversations"][0]["value"].replace(marker(name), "").strip()
        rows.append(
            [question, *(str(records_file.parent / record[name]) if n == name else None for n in names)]
        )
    return rows


def toy_examples(names: Sequence[str], folder: Path) -> list[list[Any]]:
    """One toy-world question per built-in modality of ``names`` (see :func:`examples_from`); the files
    are written once under ``folder``, in a subfolder per set of modalities."""
    from mm_llama.data.toyworld import MODALITIES, generate_toyworld

    toy = [n for n in names if n in MODALITIES]
    if not toy:
        return []
    world = folder / "-".join(toy)
    if not (world / "instruct_test.json").is_file():
        generate_toyworld(world, seed=EXAMPLE_SEED, n_train=0, n_val=0, n_test=1, modalities=toy)
    return examples_from(world / "instruct_test.json", names)


def held_out_records(checkpoint: Path) -> Path | None:
    """The run's own held-out questions, when they are there: ``instruct_test.json`` beside the training
    data that the run's ``train_config.yaml`` names (the quickstart's toy world, the real-data run's
    recordings; the paths as training was given them, so relative ones from the folder it ran in)."""
    config = checkpoint.parent / RUN_CONFIG_FILE
    if not config.is_file():
        return None
    for stage in ((yaml.safe_load(config.read_text()) or {}).get("stages") or {}).values():
        for data in (stage or {}).get("data") or []:
            records = Path(data).parent / HELD_OUT_FILE
            if records.is_file():
                return records
    return None


UPLOAD_LABELS_JS = """
(labels) => {
  // gradio names every file input "File upload" and every upload button "Upload file": give each the
  // name of its input, now and whenever gradio re-renders it (after a clear, say)
  const name = () => {
    for (const [id, label] of Object.entries(labels)) {
      const root = document.getElementById(id);
      if (!root) continue;
      root.querySelectorAll('input[type="file"]').forEach((e) => e.setAttribute("aria-label", label));
      root.querySelectorAll('button[aria-label="Upload file"]').forEach(
        (e) => e.setAttribute("aria-label", "Upload: " + label)
      );
    }
  };
  name();
  new MutationObserver(name).observe(document.body, { childList: true, subtree: true });
}
"""


@dataclass
class Session:
    """One browser session: what the model sees, the chat shown, and the send in flight. A send while a
    reply is being written is refused (the question stays in the box); New chat and Stop act at once."""

    conversation: Conversation = field(default_factory=Conversation)
    history: History = field(default_factory=list)
    pending: str | None = None
    """The question taken from the box by the last accepted send, until its reply starts."""
    busy: bool = False
    stop: bool = False
    epoch: int = 0
    """Bumped by New chat, so a reply still streaming into the old chat stops showing."""

    def reset(self) -> None:
        self.conversation, self.history, self.pending, self.stop = Conversation(), [], None, True
        self.epoch += 1


def build_app(
    model: MultimodalLM, checkpoint: Path | None = None, examples_dir: Path | None = None
) -> gr.Blocks:
    """The demo page for ``model``: what it is, its media inputs, a question box, sampling controls, the
    chat and examples: the run's own held-out questions when ``checkpoint`` has them beside it, else
    toy-world ones written under ``examples_dir`` (when given)."""
    names = list(model.config.modalities)
    records = held_out_records(Path(checkpoint)) if checkpoint is not None else None
    if records is not None:
        examples, source = examples_from(records, names), "held-out questions of this run"
    else:
        examples = toy_examples(names, examples_dir) if examples_dir is not None else []
        source = "toy world"
    if examples:
        gr.set_static_paths([Path(item).parent for row in examples for item in row[1:] if item])
    with gr.Blocks(title="mm_llama demo", analytics_enabled=False) as app:
        gr.Markdown(
            "# mm_llama demo\n"
            f"{describe_checkpoint(model, checkpoint)}\n\n"
            "Give media, ask a question; a marker is added for each item unless your question places "
            "`<image>`, `<audio>`, ... itself. Follow-up questions see the earlier turns; New chat starts "
            "a new conversation."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):  # first: on a phone the chat and the box come first
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                question = gr.Textbox(
                    label="Question", placeholder="What is in the picture?", elem_id="question", max_lines=6
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    new_chat = gr.Button("New chat", elem_id="new-chat")
            with gr.Column(scale=1, min_width=320):
                inputs = [media_input(name) for name in names]
                max_new_tokens = gr.Slider(
                    1, MAX_NEW_TOKENS_LIMIT, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"
                )
                temperature = gr.Slider(
                    0.0, MAX_TEMPERATURE, value=0.0, step=0.05, label="Temperature (0 = greedy)"
                )
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (with temperature > 0)")
        if examples:
            gr.Examples(
                examples, [question, *inputs], label=f"Examples ({source})", examples_per_page=MAX_EXAMPLES
            )

        labels = json.dumps({c.elem_id: c.label for c in inputs})
        app.load(None, None, None, js=f"() => ({UPLOAD_LABELS_JS})({labels})")
        state = gr.State(None)  # this browser session's Session

        def take(text: str, session: Session | None) -> tuple[Any, Session, Any]:
            session = session or Session()
            if session.busy:
                gr.Warning(BUSY_MESSAGE)
                return gr.skip(), session, gr.skip()
            session.busy, session.pending, session.stop = True, text, False
            return "", session, gr.update(interactive=False)

        def respond(
            session: Session, tokens: float, temp: float, p: float, *items: dict[str, Any] | None
        ) -> Iterator[History | Any]:
            if session.pending is None:  # a send refused while the reply before it was written
                yield gr.skip()
                return
            text, session.pending, epoch = session.pending, None, session.epoch
            try:
                chats = answer(
                    model,
                    text,
                    {name: uploaded(item) for name, item in zip(names, items)},
                    session.history,
                    tokens,
                    temp,
                    session.conversation,
                    top_p=p,
                    stop=lambda: session.stop,
                )
                for chat in chats:
                    if session.epoch != epoch:  # New chat was pressed: this reply belongs to no chat now
                        return
                    session.history = chat
                    yield chat
            finally:
                session.busy = False

        def stop_reply(session: Session | None) -> None:
            if session is not None:
                session.stop = True

        def reset(session: Session | None) -> Session:
            session = session or Session()
            session.reset()
            return session

        for trigger in (send.click, question.submit):
            # take is queued, so that its warning reaches the page, but it never waits: no concurrency limit
            trigger(
                take,
                [question, state],
                [question, state, send],
                concurrency_limit=None,
                api_visibility="private",
            ).then(
                respond,
                [state, max_new_tokens, temperature, top_p, *inputs],
                [chatbot],
                preprocess=False,  # the uploads' paths as they are: see uploaded()
                concurrency_id="generate",
                api_visibility="private",
            ).then(lambda: gr.update(interactive=True), None, [send], queue=False, api_visibility="private")
        stop.click(stop_reply, [state], None, queue=False, api_visibility="private")
        new_chat.click(reset, [state], [state], queue=False, api_visibility="private").then(
            lambda: ([], "", *(None for _ in inputs)), None, [chatbot, question, *inputs], queue=False
        )
        chatbot.clear(reset, [state], [state], queue=False, api_visibility="private")
    return app


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
    examples_dir: Path | None = None,
) -> gr.Blocks:
    """Load a checkpoint and serve its demo (one generation runs at a time, uploads up to
    ``MAX_UPLOAD_SIZE``, examples written to ``examples_dir``, default ``EXAMPLES_DIR``); until
    interrupted, or with ``block=False`` in the background (``close()`` the app it returns)."""
    model = MultimodalLM.from_pretrained(checkpoint).eval()
    examples_dir = EXAMPLES_DIR if examples_dir is None else examples_dir
    app = build_app(model, Path(checkpoint), examples_dir).queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD_SIZE,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return app


def run_demo(args: argparse.Namespace) -> None:
    """``mm-llama demo``: serve the checkpoint of the parsed ``add_demo_args`` options (their ``--plugin``
    files imported first)."""
    import_plugins(args.plugin)
    serve(args.checkpoint, host=args.host, port=args.port, share=args.share)


def main(argv: Sequence[str] | None = None) -> None:
    """``python demo/app.py ARGS`` runs exactly ``mm-llama demo ARGS``."""
    parser = add_demo_args(argparse.ArgumentParser(prog="mm-llama demo"))
    run_demo(parser.parse_args(sys.argv[1:] if argv is None else argv))
